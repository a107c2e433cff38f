"""ConvLearner: a pretrained network, its data and an optimizer, trained with SGDR as in the lesson.

Over 400 lines: fit, freezing, precomputed activations, prediction and saving share the learner's
state, and their distributed steps (gathering predictions, broadcasting caches, rank-0 writes) are
still written inline beside them."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import numbers
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from serving.bundle.files import write_atomic
from trainer.data.loaders import EpochSampler, ImageClassifierData
from trainer.data.workdir import default_work_dir
from trainer.evaluate.metrics import accuracy, log_loss
from trainer.evaluate.tta import predict_views
from trainer.learn import precompute as activations
from trainer.learn.distributed import Dist
from trainer.learn.history import EpochStats, header, stage_label
from trainer.learn.lr_finder import lr_find
from trainer.learn.model import ClassifierNet, InferenceNet, build_net
from trainer.learn.precompute import cache_key, weights_digest
from trainer.learn.schedule import cycle_boundaries, sgdr_lrs


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ConvLearner:
    """Train a ClassifierNet on ImageClassifierData.

    With `precompute=True` the backbone's pooled activations are computed once (no augmentation)
    and only the head trains on them; set `learn.precompute = False` to train end to end on
    augmented images.

    `dist`: this process's place in distributed training under torchrun (trainer.learn.distributed.init);
    each rank then trains on its share of every pass with DistributedDataParallel (a batch of `bs`
    per rank: an effective batch of bs * world_size), computes its share of the activations,
    predictions and TTA, which are gathered so that every rank sees the whole set's, and only rank 0
    writes files.
    """

    def __init__(
        self,
        data: ImageClassifierData,
        net: ClassifierNet,
        *,
        precompute: bool = False,
        device: torch.device | None = None,
        opt: str = "sgd",
        momentum: float = 0.9,
        work_dir: Path | str | None = None,
        models_dir: Path | str | None = None,
        log=None,
        dist: Dist | None = None,
    ):
        self.dist = dist or Dist()
        self.data = data
        self._share_seed(data)
        self.work_dir = Path(work_dir) if work_dir is not None else default_work_dir(data.path)
        self._models_dir = Path(models_dir) if models_dir is not None else self.work_dir / "models"
        self.device = device or (self.dist.device() if self.dist.active else default_device())
        # channels_last on every device: on a CPU it trains EfficientNet-Lite0 1.5-1.9x faster and
        # precomputes 1.8x faster than the default layout (bench/README.md, "Model quality").
        self.net = net.to(self.device).to(memory_format=torch.channels_last)
        self.opt_name = opt
        self.momentum = momentum
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        if not self.dist.is_main:  # one voice for the run: rank 0's
            self.log = lambda msg: None
        self.history: list[EpochStats] = []
        self.lr_history: list[list[float]] = []  # the lr of every layer group at every training step
        self.snapshots: list[str] = []  # names saved by fit(cycle_save_name=...), in order
        # Divides the logits of inference_net (and so of TTA and the export): trainer.evaluate.scoring fits it
        # on validation (see trainer.evaluate.calibrate); 1.0 until then.
        self.temperature = 1.0
        self.label_smoothing = 0.0  # of the training loss's targets (F.cross_entropy's label_smoothing)
        self._features: dict[str, torch.Tensor] = {}
        self._features_weights: str | None = None  # digest of the backbone they were computed with
        self._last_pass = (-1, 0)  # (epoch, repeat) of the last training pass: see batches
        self.opt = self._make_optimizer()
        self.bn_frozen = False
        self.freeze()
        self.precompute = precompute

    @classmethod
    def pretrained(
        cls,
        arch: str,
        data: ImageClassifierData,
        precompute: bool = True,
        ps: tuple[float, ...] = (0.25, 0.5),
        xtra_fc: tuple[int, ...] = (512,),
        weights: Path | str | None = None,
        **kwargs,
    ) -> ConvLearner:
        net = build_net(arch, data.c, weights=weights, ps=ps, xtra_fc=xtra_fc)
        return cls(data, net, precompute=precompute, **kwargs)

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """The learner as one process over whole sets, for rank 0's own work while the other ranks
        wait (exporting, plotting): nothing in the block may wait for them."""
        dist, self.dist = self.dist, Dist()
        try:
            yield
        finally:
            self.dist = dist

    # --- mixed precision: bf16 where the GPU has it, else fp16 with a grad scaler; off on CPU.

    @property
    def amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast(self):
        dtype = self.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    # --- layer groups and freezing

    def layer_groups(self) -> list[nn.Module]:
        return self.net.layer_groups()

    def freeze_to(self, n: int) -> None:
        """Train layer groups n and later; groups before n keep their weights and BN statistics."""
        for i, group in enumerate(self.layer_groups()):
            for p in group.parameters():
                p.requires_grad_(i >= n)
        self.frozen_groups = n

    def freeze(self) -> None:
        self.freeze_to(len(self.layer_groups()) - 1)

    def unfreeze(self) -> None:
        self.freeze_to(0)

    def bn_freeze(self, frozen: bool = True) -> None:
        """The lesson's bn_freeze: keep every backbone BatchNorm on its ImageNet statistics even
        when unfrozen (its weights still train). For small datasets of ImageNet-like photos, batch
        statistics of a few dozen images are a noisier estimate than the ones shipped."""
        self.bn_frozen = frozen

    def train_mode(self) -> None:
        """Training mode, except the BatchNorm layers of frozen groups (and of the whole backbone
        after bn_freeze), which keep their running statistics."""
        self.net.train()
        groups = self.layer_groups()[:-1] if self.bn_frozen else self.layer_groups()[: self.frozen_groups]
        for group in groups:
            for m in group.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": list(g.parameters()), "lr": 1e-3, "weight_decay": 0.0} for g in self.layer_groups()]
        if self.opt_name == "sgd":
            return torch.optim.SGD(groups, lr=1e-3, momentum=self.momentum)
        if self.opt_name == "adamw":
            return torch.optim.AdamW(groups, lr=1e-3, betas=(self.momentum, 0.99))
        raise ValueError(f"unknown optimizer {self.opt_name!r}; use 'sgd' or 'adamw'")

    def group_values(self, values: float | Sequence[float], name: str) -> list[float]:
        """One value per layer group: `values` itself, or the one value repeated."""
        n = len(self.layer_groups())
        if isinstance(values, numbers.Real):  # NumPy's scalars count too
            return [float(values)] * n
        per_group = [float(v) for v in cast(Sequence[float], values)]  # a list or a NumPy array
        if len(per_group) != n:
            raise ValueError(f"{name} needs one value or {n} (one per layer group), got {len(per_group)}")
        return per_group

    def set_lrs(self, lrs: list[float]) -> None:
        for g, lr in zip(self.opt.param_groups, lrs, strict=True):
            g["lr"] = lr

    # --- precomputed activations

    @property
    def precompute(self) -> bool:
        return self._precompute

    @precompute.setter
    def precompute(self, value: bool) -> None:
        self._precompute = bool(value)
        if value:
            self._ensure_features()

    def _ensure_features(self) -> None:
        tfms, weights = self.data.tfms, weights_digest(self.net.backbone)
        if weights != self._features_weights:  # the backbone was trained since: activations are stale
            self._features, self._features_weights = {}, weights
        names = ["train", "valid"] + (["test"] if self.data.test_files else [])
        for name in [n for n in names if n not in self._features]:
            files = self._files(name)
            arch = f"{self.net.arch_name} ({self.net.arch_definition})"
            key = cache_key(arch, weights, tfms.prep, tfms.tta_views[0], files)
            path = self.work_dir / "tmp" / "precompute" / f"{self.net.arch_name}_{tfms.sz}_{name}.pt"
            self._features[name] = self._cached(path, key, len(files), functools.partial(self.compute_features, name))

    def _cached(self, path: Path, key, n: int, compute) -> torch.Tensor:
        """Activations from the cache when valid, else computed (each rank its share) and written by rank 0.
        Rank 0 alone reads the cache and says whether it hit, so that all ranks compute, or none does."""
        if not self.dist.active:
            return activations.cached(path, key, n, compute, log=self.log)
        found = self.dist.from_main(lambda: activations.load(path, key, n, log=self.log))
        if found is not None:
            return found
        features = compute()
        self.dist.main_writes(lambda: activations.save(path, key, features))
        return features

    def _files(self, name: str) -> list[Path]:
        return {"train": self.data.trn_files, "valid": self.data.val_files, "test": self.data.test_files or []}[name]

    def features(self, name: str) -> torch.Tensor:
        """A dataset's pooled backbone activations of its plain centre views, (n, n_pooled) float32 on
        the CPU, in the order of its files: the ones precompute uses, from the cache when it is valid."""
        self._ensure_features()
        return self._features[name]

    def labels(self, name: str) -> list[int]:
        """A dataset's labels; -1 for each unlabelled (test) image."""
        return {"train": self.data.trn_y, "valid": self.data.val_y}.get(name) or [-1] * len(self._files(name))

    def set_data(self, data: ImageClassifierData) -> None:
        """Continue with other data, keeping the weights: progressive resizing (128 px, then 224 px)."""
        if data.classes != self.data.classes:
            raise ValueError(f"set_data: classes {data.classes} differ from the learner's {self.data.classes}")
        self.data = data
        self._share_seed(data)
        self._features = {}
        if self.precompute:
            self._ensure_features()

    def _share_seed(self, data: ImageClassifierData) -> None:
        """Every rank must draw the same passes: a run without a seed gets rank 0's random one."""
        if self.dist.active and data.seed is None:
            # Drawn on every rank, so that each rank's random state moves as one process's would.
            data.seed = self.dist.broadcast(int(torch.randint(2**62, ()).item()))

    @property
    def _shard(self) -> tuple[int, int]:
        return self.dist.rank, self.dist.world_size

    @torch.no_grad()
    def compute_features(self, name: str) -> torch.Tensor:
        """Pooled backbone activations of a dataset's plain centre views, on the CPU, float32 (each
        rank computes its share; every rank gets them all)."""
        self.net.eval()
        out = []
        loader = self.data.loader(name, once=True, shard=self._shard)
        bar = tqdm(loader, desc=f"precompute {name}", unit="batch", leave=False, disable=not self.dist.is_main)
        for xb, _ in bar:
            with self.autocast():
                out.append(self.net.features(self._to_device(xb)).float())
        mine = torch.cat(out) if out else torch.empty(0, self.net.n_pooled, device=self.device)
        return self.dist.gather(mine, len(self._files(name)))

    def _to_device(self, xb: torch.Tensor) -> torch.Tensor:
        xb = xb.to(self.device, non_blocking=True).float()
        return xb.contiguous(memory_format=torch.channels_last) if xb.dim() == 4 else xb  # images: NCHW

    # --- batches

    def batches(self, name: str, *, train: bool, repeat: int | None = None):
        """(inputs, targets, forward) for every mini-batch of a dataset.

        Training batches from the loader are pass `repeat` over the set at epoch len(history): fit's
        epoch n is always pass (n, 0), so its order and augmentation follow from (seed, n) alone and
        a resumed run needs no loader state (see data.EpochSampler). repeat=None: the pass after
        the last one at this epoch (lr_find cycling a small training set sees it reshuffled)."""
        if self.precompute:
            # Training on activations draws its passes as the image loader does (data.EpochSampler);
            # evaluation runs the whole set on every rank: the head is cheap.
            x = self._features[name]
            y = torch.tensor(self.labels(name))
            if train:
                passes = EpochSampler(
                    len(x), seed=self.data.seed, shuffle=True, rank=self.dist.rank, world_size=self.dist.world_size
                )
                passes.set_epoch(*self._next_pass(repeat))
                order = torch.tensor([i for i, _ in passes], dtype=torch.long)
            else:
                order = torch.arange(len(x))
            bs = self.data.bs
            for i in range(0, len(order), bs):
                idx = order[i : i + bs]
                if train and len(idx) < 2 < len(order):
                    continue  # BatchNorm cannot train on a batch of one
                yield x[idx].to(self.device), y[idx].to(self.device), self.net.head
        else:
            # Evaluation: this rank's share (predict gathers them); training: its share of the pass.
            loader = self.data.loader(name, augment=train, shuffle=train, shard=self._shard)
            sampler = getattr(loader, "sampler", None)
            if train and isinstance(sampler, EpochSampler):
                sampler.set_epoch(*self._next_pass(repeat))
            for xb, yb in loader:
                if train and len(xb) < 2:
                    continue
                yield self._to_device(xb), yb.to(self.device, non_blocking=True), self.net

    def _next_pass(self, repeat: int | None) -> tuple[int, int]:
        """(epoch, repeat) of the training pass about to start; see `batches`."""
        epoch = len(self.history)
        if repeat is None:
            last_epoch, last_repeat = self._last_pass
            repeat = last_repeat + 1 if last_epoch == epoch else 0
        self._last_pass = (epoch, repeat)
        return epoch, repeat

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for float16 autocast; a no-op for bfloat16 and float32."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, forward, scaler: torch.amp.GradScaler) -> float:
        """One optimizer step on a mini-batch at the optimizer's current lrs; returns the loss.
        The only training step: fit and lr_find both call it."""
        with self.autocast():
            loss = F.cross_entropy(forward(xb), yb, label_smoothing=self.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(self.opt)
        scaler.update()
        return loss.item()

    def lr_find(self, start_lr=1e-5, end_lr=10, num_it: int | None = None, **kwargs):
        """The lesson's lr finder (see trainer.learn.lr_finder.lr_find); its result is kept as `self.sched`
        so that `learn.sched.plot(path)` works as in the lesson. Weights and optimizer state are
        exactly as they were afterwards."""
        self.sched = lr_find(self, start_lr, end_lr, num_it, **kwargs)
        return self.sched

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch, on every rank alike (each takes a padded share of the set)."""
        n, bs = -(-len(self.data.trn_files) // self.dist.world_size), self.data.bs
        full, rest = divmod(n, bs)
        return full + (1 if rest >= 2 or (rest == 1 and full == 0) else 0)

    # --- training

    def fit(
        self,
        lrs,
        n_cycle: int,
        cycle_len: int | None = None,
        cycle_mult: int = 1,
        wds=None,
        cycle_save_name: str | None = None,
        *,
        start_epoch: int = 0,
        on_epoch_end: Callable[[int], None] | None = None,
        stage: str | None = None,
    ) -> list[EpochStats]:
        """SGDR: n_cycle cosine cycles of cycle_len * cycle_mult**i epochs (cycle_len=None: one
        epoch per cycle). `lrs` and `wds` are one value or one per layer group.

        start_epoch skips epochs already trained (resuming a checkpoint: the schedule continues
        where it stopped); on_epoch_end(epochs_done) runs after every epoch, e.g. to checkpoint.
        `stage` labels the epochs' rows (default: what trains, from precompute and the freeze level)."""
        stage = stage or self.describe_stage()
        lrs = self.group_values(lrs, "lrs")
        for g, wd in zip(self.opt.param_groups, self.group_values(wds or 0.0, "wds"), strict=True):
            g["weight_decay"] = wd
        cycle_len = cycle_len or 1
        spe = self.steps_per_epoch()
        bounds = cycle_boundaries(n_cycle, cycle_len, cycle_mult, spe)
        n_epochs = bounds[-1] // spe
        scaler = self.grad_scaler()
        # Each trained module (the head on activations, or the whole net) wrapped once per fit, after
        # freezing, so that its backward averages the gradients over the ranks.
        replicas: dict[nn.Module, nn.Module] = {}
        new: list[EpochStats] = []
        if start_epoch < n_epochs:
            self.log(header())
        for epoch in range(start_epoch, n_epochs):
            started = time.perf_counter()
            step = epoch * spe
            self.train_mode()
            losses = []
            # Counted in images, so the bar shows throughput (img/s) and its ETA.
            bar = tqdm(
                total=len(self.data.trn_files),
                desc=f"epoch {len(self.history)}",
                unit="img",
                leave=False,
                disable=not self.dist.is_main,
            )
            for xb, yb, forward in self.batches("train", train=True, repeat=0):
                if forward not in replicas:
                    replicas[forward] = self.dist.replicate(forward)
                step_lrs = sgdr_lrs(
                    step, lrs, n_cycle=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult, steps_per_epoch=spe
                )
                self.set_lrs(step_lrs)
                self.lr_history.append(step_lrs)
                losses.append(self.train_step(xb, yb, replicas[forward], scaler))
                bar.update(len(xb) * self.dist.world_size)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                step += 1
            bar.close()
            self.dist.sync_buffers(self.net)
            val_loss, acc = self.validate()
            trn_loss = self.dist.mean(float(np.mean(losses)) if losses else math.nan)
            stats = EpochStats(len(self.history), trn_loss, val_loss, acc, stage, time.perf_counter() - started)
            self.history.append(stats)
            new.append(stats)
            self.log(stats.line())
            if cycle_save_name and step in bounds[1:]:
                self._save_snapshot(f"{cycle_save_name}_cyc_{bounds.index(step) - 1}")
            if on_epoch_end:
                on_epoch_end(epoch + 1)
        return new

    def _save_snapshot(self, snapshot: str) -> None:
        """The weights at the end of an SGDR cycle, as models/<snapshot>.pt. Weights load at any input
        size, but a snapshot ensemble is only valid at the size its members were trained at
        (progressive resizing changes it): that size is recorded beside them."""
        if self.dist.is_main:
            self.models_dir().mkdir(parents=True, exist_ok=True)
            write_atomic(self.models_dir() / f"{snapshot}.json", json.dumps({"size": self.data.tfms.sz}).encode())
        self.save(snapshot)  # rank 0 writes both, and then the other ranks go on
        self.snapshots.append(snapshot)

    def describe_stage(self) -> str:
        """What a fit now trains, in words, for the epochs' rows."""
        size = self.data.tfms.sz
        if self.precompute or self.frozen_groups == 0 or self.frozen_groups >= len(self.layer_groups()) - 1:
            return stage_label(size, precompute=self.precompute, unfrozen=self.frozen_groups == 0)
        return f"layer groups {self.frozen_groups}+ at {size} px"

    @torch.no_grad()
    def predict(self, name: str = "valid") -> np.ndarray:
        """Probabilities of a dataset's plain centre views (no TTA), (n, classes), at the learner's
        temperature."""
        self.net.eval()
        out = []
        for xb, _, forward in self.batches(name, train=False):
            with self.autocast():
                out.append(torch.softmax(forward(xb).float() / self.temperature, dim=1))
        probs = torch.cat(out) if out else torch.empty((0, self.data.c), device=self.device)
        if self.precompute:  # every rank ran the whole set
            return probs.cpu().numpy()
        return self.dist.gather(probs, len(self._files(name))).numpy()

    def validate(self) -> tuple[float, float]:
        probs = self.predict("valid")
        y = np.asarray(self.data.val_y)
        return log_loss(probs, y), accuracy(probs, y)

    def TTA(self, name: str = "valid", *, views=None) -> tuple[np.ndarray, np.ndarray]:
        """Test-time augmentation: (mean probability over the bundle's views (n, classes), labels).

        Uses the exported graph's own wrapper and `serving.bundle.preprocess`, the code the server runs."""
        return self.view_probs(name, views=views).mean(axis=1), np.asarray(self.labels(name))

    def view_probs(self, name: str = "valid", *, views=None, temperature: float | None = None) -> np.ndarray:
        """Every TTA view's probabilities, (n, views, classes), view 0 the plain centre view; at the
        learner's temperature unless another is given (1.0: uncalibrated)."""
        views = list(views or self.data.tfms.tta_views)
        net = self.inference_net(temperature)
        files = self._files(name)
        mine = self.dist.shard(files)
        probs = predict_views(net, mine, self.data.tfms.prep, views, device=self.device, progress=self.dist.is_main)
        if not self.dist.active:
            return probs
        if not mine:  # fewer images than ranks: an empty share still has a width
            probs = np.empty((0, len(views), self.data.c), np.float32)
        return self.dist.gather(torch.from_numpy(probs), len(files)).numpy()

    def predict_files(self, name: str = "valid") -> np.ndarray:
        """Probabilities of the plain centre views read from the files (no precomputed activations)."""
        return self.TTA(name, views=self.data.tfms.tta_views[:1])[0]

    def inference_net(self, temperature: float | None = None) -> InferenceNet:
        t = self.temperature if temperature is None else temperature
        return InferenceNet(self.net, t).to(self.device).eval()

    # --- save / load: state dicts of tensors only, so loading never unpickles arbitrary objects.

    def models_dir(self) -> Path:
        """Where save(name) writes name.pt: work_dir/models unless the learner was given another."""
        return self._models_dir

    def save(self, name: str) -> Path:
        """Write the weights to models_dir()/name.pt: rank 0 writes (every rank holds the same
        weights), and the others wait until it has, so that any rank may load it next."""
        path = self.models_dir() / f"{name}.pt"

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, buf)
            write_atomic(path, buf.getvalue())

        self.dist.main_writes(write)
        return path

    def snapshot_size(self, name: str) -> int | None:
        """The input side (pixels) snapshot `name` was trained at, as fit recorded it; None when
        unrecorded (saved by a version that did not record it)."""
        path = self.models_dir() / f"{name}.json"
        return int(json.loads(path.read_text())["size"]) if path.is_file() else None

    def load(self, name: str) -> None:
        """Load models_dir()/name.pt: rank 0 reads it and sends it to the others, whose disks need not hold it."""
        path = self.models_dir() / f"{name}.pt"
        self.net.load_state_dict(self.dist.from_main(lambda: torch.load(path, map_location="cpu", weights_only=True)))
        self.net.to(self.device)
