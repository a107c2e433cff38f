"""Training speed and memory, each figure against a baseline measured in the same run; fastai as a peer.

    python bench/training.py                  # hymenoptera, every section (about 20 min on 2 cores)
    python bench/training.py --quick          # 8+4 photos a class at 64 px, under a minute
    python bench/training.py --sections fit,precompute
    python bench/training.py --peer-recipe    # also the whole default recipe against fastai's fine_tune

Sections, all on the same images and split:

- fit: one epoch of ConvLearner.fit as the recipe's unfrozen stage trains (all layer groups,
  bn_freeze, label smoothing) against a hand-written loop over the same network, loader and
  optimizer (forward, loss, backward, step; then the same validation pass by hand).
- precompute: an epoch of the head on cached pooled activations against an epoch with the frozen
  backbone run on every batch (what the head trains on without precompute); and the one-off cost of
  the cache.
- pipeline: images/s of the training loader (decode + augment, with its workers) against decode +
  resize to the centre view through the same loader, and the loader over the resized-image cache
  (`trainer run --resize`) against the original photos.
- memory: peak memory of `trainer run` at the size and batch (a subprocess, polled through /proc:
  the process's RSS, and the PSS of it and its loader workers together), against the peak of
  training steps alone in a fresh process: the floor the network's saved activations set.
- fastai: bench/fastai_peer.py in its own virtualenv (--fastai-python): our network and loaders
  trained one epoch by fastai's Learner against ours, interleaved; with --peer-recipe, `trainer run`
  against fastai's fine_tune (fastai's own data pipeline) on the same split, wall time and accuracy.

Timings on a shared 2-core machine drift by half within a minute, so the two sides of every
comparison alternate (A, B, A, B, with a short pause between) and the ratios are of medians from
the same run. Prints a table, then the ratios; --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the table

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"
FASTAI_PYTHON = ROOT / "bench" / ".venv-fastai" / "bin" / "python"
SECTIONS = ("fit", "precompute", "pipeline", "memory", "fastai")
LR = 3e-3  # of the head; earlier groups 10x and 100x lower, as the recipe spreads them
PAUSE_S = 1.0  # between the timed runs of an interleaved comparison


@dataclass(frozen=True)
class Setup:
    """What every section trains on."""

    data: Path
    val_name: str
    size: int  # input side, pixels
    bs: int
    reps: int  # timed runs of each side of a comparison
    quick: bool = False
    csv: str | None = None  # a labels CSV under data (its random fifth validates), else train/ and val_name/

    def flags(self) -> list[str]:
        """The `trainer run` flags that choose this data, size and batch."""
        split = ["--csv", self.csv] if self.csv else ["--val-name", self.val_name]
        return ["--data", str(self.data), *split, "--size", str(self.size), "--bs", str(self.bs)]


@dataclass
class Row:
    section: str
    measure: str
    value: float
    unit: str
    runs: list[float] = field(default_factory=list)
    detail: str = ""


@dataclass
class Ratio:
    name: str
    value: float
    target: str  # e.g. "<= 1.05", or "" where there is none
    note: str = ""


# --- shared set-up


def tiny_subset(src: Path, dst: Path, train: int, valid: int) -> Path:
    """Symlinks to the first `train` / `valid` photos of every class (the data is never copied)."""
    for split, n in (("train", train), ("val", valid)):
        for cls in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
            folder = dst / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                (folder / f.name).symlink_to(f.resolve())
    return dst


def run_config(setup: Setup, out: Path):
    """The RunConfig `trainer run` builds from the setup's flags: defaults for everything else."""
    from trainer.cli import config, parser

    return config(parser().parse_args(["run", *setup.flags(), "--out", str(out)]))


def make_learner(setup: Setup, work: Path, *, precompute: bool = False):
    """A ConvLearner as `trainer run` makes one (pretrained, bn_freeze, label smoothing), its caches under `work`."""
    import torch

    from trainer.data.assemble import make_data
    from trainer.learn.learner import ConvLearner

    cfg = run_config(setup, work / "run")
    data = make_data(cfg, cfg.size, cfg.out)
    torch.manual_seed(cfg.seed)
    learn = ConvLearner.pretrained(
        cfg.arch, data, precompute=precompute, work_dir=work / "cache", log=lambda _: None, weights=cfg.weights
    )
    learn.bn_freeze(cfg.bn_freeze)
    learn.label_smoothing = cfg.label_smoothing
    return learn


def recipe_lrs(learn) -> list[float]:
    from trainer.learn.schedule import lr_spread

    return [LR * r for r in lr_spread(1.0, 10.0, len(learn.layer_groups()))]


def interleave(
    sides: dict[str, Callable[[], object]], reps: int, prepare: dict[str, Callable[[], object]] | None = None
) -> dict[str, list[float]]:
    """Seconds of each call of each side, the sides alternating: A, B, A, B, ... `prepare[name]`,
    where given, runs untimed before each call of that side."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, run in sides.items():
            if prepare and name in prepare:
                prepare[name]()
            time.sleep(PAUSE_S)
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- 1. our fit loop against a hand-written one


def bare_epoch(learn, lrs: list[float], epoch: int) -> float:
    """One epoch written by hand over the learner's network, loader and optimizer: the training pass
    (in the recipe's mode: training, the backbone's BatchNorm on its ImageNet statistics), then the
    validation pass. Returns the validation accuracy."""
    import torch
    from torch.nn import functional as F

    net, opt, data = learn.net, learn.opt, learn.data
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    loader = data.loader("train", augment=True, shuffle=True)
    loader.sampler.set_epoch(epoch)
    net.train()
    for m in net.backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    for xb, yb in loader:
        if len(xb) < 2:  # BatchNorm1d in the head cannot train on one image (fit skips it too)
            continue
        loss = F.cross_entropy(net(xb.float()), yb, label_smoothing=learn.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in data.loader("valid"):
            correct += int((net(xb.float()).argmax(1) == yb).sum())
    return correct / len(data.val_files)


def bench_fit(setup: Setup, work: Path) -> tuple[list[Row], list[Ratio]]:
    learn = make_learner(setup, work)
    learn.precompute = False
    learn.unfreeze()
    lrs = recipe_lrs(learn)
    wd = run_config(setup, work / "run").wd
    epoch = iter(range(10**6))
    bare_epoch(learn, lrs, next(epoch))  # warm-up: starts the loaders' workers, fills the page cache
    times = interleave(
        {
            "fit": lambda: learn.fit(lrs, 1, wds=wd),
            "bare": lambda: bare_epoch(learn, lrs, next(epoch)),
        },
        setup.reps,
    )
    n = len(learn.data.trn_files)
    detail = f"{n} train + {len(learn.data.val_files)} valid images, {setup.size} px, batch {setup.bs}, unfrozen"
    rows = [
        Row("fit", "ConvLearner.fit, one epoch", median(times["fit"]), "s", times["fit"], detail),
        Row("fit", "hand-written loop, one epoch", median(times["bare"]), "s", times["bare"], detail),
    ]
    return rows, [Ratio("fit epoch / hand-written epoch", median(times["fit"]) / median(times["bare"]), "<= 1.05")]


# --- 2. precompute


def bench_precompute(setup: Setup, work: Path) -> tuple[list[Row], list[Ratio]]:
    learn = make_learner(setup, work)  # frozen: the head trains
    started = time.perf_counter()
    learn.precompute = True  # computes the pooled activations of train and valid, once
    once = time.perf_counter() - started

    def use_cache(on: bool) -> None:  # untimed: the setter checks the cache against the backbone's weights
        learn.precompute = on

    use_cache(False)
    learn.fit(LR, 1)  # warm-up of the loaders' workers
    times = interleave(
        {"cached": lambda: learn.fit(LR, 1), "backbone": lambda: learn.fit(LR, 1)},
        setup.reps,
        prepare={"cached": lambda: use_cache(True), "backbone": lambda: use_cache(False)},
    )
    cached, backbone = median(times["cached"]), median(times["backbone"])
    detail = f"{len(learn.data.trn_files)} train + {len(learn.data.val_files)} valid images, {setup.size} px"
    rows = [
        Row("precompute", "head epoch on cached activations", cached, "s", times["cached"], detail),
        Row("precompute", "head epoch, frozen backbone every batch", backbone, "s", times["backbone"], detail),
        Row("precompute", "computing the cache (train + valid, once)", once, "s", [once], detail),
    ]
    note = f"the cache pays for itself after {once / max(backbone - cached, 1e-9):.1f} epochs"
    return rows, [Ratio("backbone epoch / cached epoch", backbone / cached, ">= 50", note)]


# --- 3. input pipeline


def decode_pass(files: list[Path]) -> None:
    from trainer.data.loaders import read_image

    for f in files:
        read_image(f).load()


def loader_pass(loader) -> None:
    from trainer.data.loaders import EpochSampler

    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(0)
    for _ in loader:
        pass


def bench_pipeline(setup: Setup, work: Path) -> tuple[list[Row], list[Ratio]]:
    from trainer.data.resize import cache_dir

    learn = make_learner(setup, work)
    data = learn.data
    target = round(setup.size * 340 / 224)  # the lesson's data.resize(340) for 224 px
    tmp_name = f"bench-training-{os.getpid()}"
    started = time.perf_counter()
    resized = data.resize(target, tmp_name)
    once = time.perf_counter() - started
    try:
        files = list(data.trn_files)
        sides: dict[str, Callable[[], object]] = {
            "decode": lambda: decode_pass(files),
            "resize": lambda: loader_pass(data.loader("train")),
            "augment": lambda: loader_pass(data.loader("train", augment=True, shuffle=True)),
            "augment_cached": lambda: loader_pass(resized.loader("train", augment=True, shuffle=True)),
        }
        for run in sides.values():
            run()  # warm-up: the workers start, the files enter the page cache
        times = interleave(sides, max(setup.reps, 3))
    finally:
        shutil.rmtree(cache_dir(data.path, target, tmp_name).parent, ignore_errors=True)
    n = len(files)
    rate = {name: n / median(ts) for name, ts in times.items()}
    workers = f"{data.num_workers} workers, batch {setup.bs}"
    rows = [
        Row("pipeline", "decode only (main process)", rate["decode"], "img/s", times["decode"], f"{n} photos"),
        Row("pipeline", "decode + resize, centre view (loader)", rate["resize"], "img/s", times["resize"], workers),
        Row("pipeline", "decode + augment (training loader)", rate["augment"], "img/s", times["augment"], workers),
        Row(
            "pipeline",
            f"decode + augment, resized cache ({target} px)",
            rate["augment_cached"],
            "img/s",
            times["augment_cached"],
            workers,
        ),
        Row(
            "pipeline",
            f"making the resized cache ({target} px, once)",
            once,
            "s",
            [once],
            f"{n} + {len(data.val_files)} photos",
        ),
    ]
    ratios = [
        Ratio("training loader / decode + resize, img/s", rate["augment"] / rate["resize"], ""),
        Ratio("resized cache / original photos, training img/s", rate["augment_cached"] / rate["augment"], ""),
    ]
    return rows, ratios


# --- 4. memory


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _proc_bytes(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class MemoryPeak:
    seconds: float
    returncode: int
    main_rss: float  # bytes: the largest RSS of the process itself
    tree_pss: float  # bytes: the largest sum of PSS over the process and its descendants (workers)
    workers_pss: float  # bytes: the descendants' share of tree_pss at that moment
    processes: int  # the most processes in the tree at once
    maxrss: float  # bytes: ru_maxrss from wait4, the largest RSS of the process or a descendant it waited for
    at: str  # the last line the command printed before tree_pss peaked
    output: str = field(default="", repr=False)


def peak_memory(cmd: list[str], *, interval: float = 0.2, env: dict | None = None) -> MemoryPeak:
    """Run `cmd`, polling /proc: the peaks of its RSS and of the PSS of its whole process tree.

    PSS (proportional set size) counts a page shared by n processes as 1/n in each, so forked loader
    workers are not counted n times over, as a sum of RSS would."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    peak = {"main": 0, "tree": 0, "workers": 0, "procs": 0}
    at = ["start"]  # the last line printed before the tree's peak

    ended = threading.Event()

    def poll() -> None:
        while not ended.is_set():
            pids, todo = [], [proc.pid]
            while todo:
                pid = todo.pop()
                pids.append(pid)
                todo += _children(pid)
            pss = {pid: _proc_bytes(pid, "smaps_rollup", "Pss:") for pid in pids}
            tree = sum(pss.values())
            peak["main"] = max(peak["main"], _proc_bytes(proc.pid, "status", "VmRSS:"))
            peak["procs"] = max(peak["procs"], len(pids))
            if tree > peak["tree"]:
                peak.update(tree=tree, workers=tree - pss[proc.pid])
                at[0] = lines[-1].strip() if lines else "start"
            time.sleep(interval)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
    # wait4, not proc.wait(): its rusage is this child's alone, where getrusage(RUSAGE_CHILDREN)
    # would report the largest of every child this process has had.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    ended.set()
    poller.join()
    return MemoryPeak(
        time.perf_counter() - started,
        proc.returncode,
        peak["main"],
        peak["tree"],
        peak["workers"],
        int(peak["procs"]),
        usage.ru_maxrss * 1024,
        at[0][:100],
        "".join(lines),
    )


def training_steps(size: int, bs: int, steps: int = 3) -> dict[str, float]:
    """The floor: a few training steps of the unfrozen network alone (random pixels, no loader, no
    validation), in this process. Bytes after building the network, of the tensors autograd keeps
    for one backward pass, and the process's peak RSS."""
    import torch
    from torch.nn import functional as F

    from trainer.learn.model import build_net

    torch.manual_seed(0)
    net = build_net("efficientnet_lite0", 2)
    built = _proc_bytes(os.getpid(), "status", "VmRSS:")
    net.train()
    for m in net.backbone.modules():  # as the recipe trains: bn_freeze
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8).float()
    y = torch.randint(0, 2, (bs,))
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for step in range(steps):
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = F.cross_entropy(net(x), y)
        else:
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"built": built, "saved": sum(saved.values()), "peak": peak}


def bench_memory(setup: Setup, work: Path) -> tuple[list[Row], list[Ratio]]:
    script = Path(__file__).resolve()
    steps_cmd = [sys.executable, str(script), "--training-steps", f"{setup.size},{setup.bs}"]
    steps = peak_memory(steps_cmd)
    if steps.returncode:
        raise SystemExit(f"{' '.join(steps_cmd)} failed:\n{steps.output}")
    floor = json.loads(steps.output.strip().splitlines()[-1])
    cmd = recipe_cmd(setup, work / "run", short=True)
    run = peak_memory(cmd, env=cold_cache(work))
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.output[-3000:]}")
    gb = 1e9
    where = f"{setup.size} px, batch {setup.bs}"
    rows = [
        Row("memory", "training steps alone: network built", floor["built"] / gb, "GB", [], where),
        Row("memory", "training steps alone: kept for backward", floor["saved"] / gb, "GB", [], where),
        Row("memory", "training steps alone: peak RSS", floor["peak"] / gb, "GB", [], where),
        Row("memory", "trainer run: peak RSS", run.main_rss / gb, "GB", [], _cmd_text(cmd)),
        Row(
            "memory",
            "trainer run: peak PSS with workers",
            run.tree_pss / gb,
            "GB",
            [],
            f"workers {run.workers_pss / gb:.2f} GB of it, {run.processes} processes at most; at: {run.at}",
        ),
        Row("memory", "trainer run: ru_maxrss (wait4)", run.maxrss / gb, "GB", [], "of its largest process"),
    ]
    ratios = [
        Ratio("trainer run peak RSS / training steps' peak", run.main_rss / floor["peak"], ""),
        Ratio("trainer run peak PSS with workers / training steps' peak", run.tree_pss / floor["peak"], ""),
    ]
    return rows, ratios


def recipe_cmd(setup: Setup, out: Path, *, short: bool) -> list[str]:
    """`trainer run` on the setup's data. short: every stage once (a fixed lr instead of lr_find's
    sweeps, one epoch of the head with augmentation, one unfrozen): the same peaks, in
    minutes; else the default recipe."""
    cmd = [sys.executable, "-m", "trainer.cli", "run", *setup.flags(), "--out", str(out)]
    if short:
        cmd += ["--lr", str(LR), "--aug-cycles", "1", "--unfreeze-cycles", "1"]
    if setup.quick:
        cmd += ["--head-epochs", "2"]
    return cmd


def cold_cache(work: Path) -> dict[str, str]:
    """The environment for a `trainer run` that starts as a user's first does: a read-only dataset's
    caches (precomputed activations) go under the user's cache folder, here an empty one in `work`."""
    return {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}


def _cmd_text(cmd: list[str]) -> str:
    shown = ["trainer" if c == sys.executable else c for c in cmd]
    return " ".join(shown).replace("trainer -m trainer.cli", "trainer")


# --- 5. fastai as a peer


def bench_fastai(setup: Setup, work: Path, python: Path, *, recipe: bool) -> tuple[list[Row], list[Ratio]]:
    rows: list[Row] = []
    ratios: list[Ratio] = []
    peer = Path(__file__).resolve().with_name("fastai_peer.py")
    data = ["--data", str(setup.data), "--val-name", setup.val_name, "--size", str(setup.size), "--bs", str(setup.bs)]
    out = work / "fastai_fit.json"
    _run(
        [str(python), str(peer), "fit", *data, "--reps", str(setup.reps), "--work", str(work / "fit"), f"--json={out}"]
    )
    fit = json.loads(out.read_text())
    detail = f"same network and loaders, {setup.size} px, batch {setup.bs}, unfrozen; {fit['versions']}"
    rows += [
        Row("fastai", "fastai Learner.fit, one epoch", median(fit["fastai"]), "s", fit["fastai"], detail),
        Row("fastai", "ConvLearner.fit, one epoch", median(fit["ours"]), "s", fit["ours"], detail),
    ]
    ratios.append(Ratio("our fit epoch / fastai's", median(fit["ours"]) / median(fit["fastai"]), "<= 1.0"))
    if recipe:
        cmd = recipe_cmd(setup, work / "recipe", short=False)
        ours = peak_memory(cmd, env=cold_cache(work))
        if ours.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({ours.returncode}):\n{ours.output[-3000:]}")
        metrics = json.loads((work / "recipe" / "metrics.json").read_text())
        out = work / "fastai_recipe.json"
        epochs = 1 if setup.quick else 4
        started = time.perf_counter()
        _run(
            [str(python), str(peer), "recipe", *data, f"--epochs={epochs}", f"--work={work / 'tune'}", f"--json={out}"]
        )
        peer_seconds = time.perf_counter() - started  # from start to exit, as `trainer run`'s
        peer_run = json.loads(out.read_text())
        rows += [
            Row(
                "fastai",
                "trainer run (default recipe): wall",
                ours.seconds,
                "s",
                [],
                f"accuracy {metrics['accuracy']:.4f}, with TTA {metrics['accuracy_tta']:.4f}; "
                f"peak RSS {ours.main_rss / 1e9:.2f} GB; {_cmd_text(cmd)}",
            ),
            Row(
                "fastai",
                f"fastai fine_tune({epochs}): wall",
                peer_seconds,
                "s",
                [],
                f"accuracy {peer_run['accuracy']:.4f} (per epoch: "
                + ", ".join(f"{a:.3f}@{t:.0f}s" for a, t in peer_run["curve"])
                + ")",
            ),
        ]
        ratios += [
            Ratio("trainer run wall / fastai fine_tune wall", ours.seconds / peer_seconds, ""),
            Ratio(
                "trainer run accuracy - fastai's, points",
                100 * (metrics["accuracy"] - peer_run["accuracy"]),
                "",
                f"with TTA {100 * (metrics['accuracy_tta'] - peer_run['accuracy']):+.1f}",
            ),
        ]
    return rows, ratios


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


# --- the report


def machine() -> str:
    return f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, no GPU used (CPU training)"


def table(rows: list[Row]) -> str:
    lines = ["| section | measure | median | unit | runs | detail |", "|---|---|---:|---|---|---|"]
    for r in rows:
        runs = " ".join(f"{x:.3g}" for x in r.runs)
        lines.append(f"| {r.section} | {r.measure} | {r.value:.4g} | {r.unit} | {runs} | {r.detail} |")
    return "\n".join(lines)


def ratio_line(r: Ratio) -> str:
    met = ""
    if r.target:
        op, bound = r.target.split()
        ok = r.value <= float(bound) if op == "<=" else r.value >= float(bound)
        met = f" (target {r.target}: {'met' if ok else 'NOT met'})"
    return f"{r.name}: {r.value:.3g}{met}" + (f"; {r.note}" if r.note else "")


def main(argv: list[str] | None = None) -> int:
    # `python bench/training.py` puts bench/ first on sys.path, where bench/serving.py would hide the
    # serving package that trainer imports.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="8+4 photos a class at 64 px, batch 8 (under a minute)")
    parser.add_argument("--data", type=Path, default=HYMENOPTERA, help="folder dataset (default: %(default)s)")
    parser.add_argument("--val-name", default="val", help="its validation folder (default: %(default)s)")
    parser.add_argument("--size", type=int, help="input side, pixels (default: 224; 64 with --quick)")
    parser.add_argument("--bs", type=int, help="batch size (default: 64; 8 with --quick)")
    parser.add_argument("--reps", type=int, help="timed runs of each side (default: 3; 2 with --quick)")
    parser.add_argument(
        "--fastai-python",
        type=Path,
        default=FASTAI_PYTHON,
        help="python of the fastai virtualenv (default: %(default)s)",
    )
    parser.add_argument("--peer-recipe", action="store_true", help="also the default recipe against fastai's fine_tune")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--training-steps",
        metavar="SIZE,BS",
        help="only the memory section's floor: a few training steps at SIZE px and batch BS in this process; "
        "prints their bytes as JSON",
    )
    args = parser.parse_args(argv)
    if args.training_steps:
        size, bs = (int(x) for x in args.training_steps.split(","))
        print(json.dumps(training_steps(size, bs)))
        return 0
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not (args.data / "train").is_dir():
        raise SystemExit(
            f"{args.data}: no train/ folder; pass --data, a folder dataset with train/ and {args.val_name}/"
        )
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    data = tiny_subset(args.data, work / "data", 8, 4) if args.quick else args.data
    setup = Setup(
        data,
        args.val_name,
        args.size or (64 if args.quick else 224),
        args.bs or (8 if args.quick else 64),
        args.reps or (2 if args.quick else 3),
        args.quick,
    )
    print(f"machine: {machine()}", flush=True)
    rows: list[Row] = []
    ratios: list[Ratio] = []
    runners: dict[str, Callable[[Path], tuple[list[Row], list[Ratio]]]] = {
        "fit": lambda w: bench_fit(setup, w),
        "precompute": lambda w: bench_precompute(setup, w),
        "pipeline": lambda w: bench_pipeline(setup, w),
        "memory": lambda w: bench_memory(setup, w),
        "fastai": lambda w: bench_fastai(setup, w, args.fastai_python, recipe=args.peer_recipe),
    }
    skipped: list[str] = []
    try:
        for name in names:
            if name == "fastai" and not args.fastai_python.is_file():
                skipped.append(
                    f"fastai: skipped, {args.fastai_python} is absent (make it: see bench/README.md, "
                    "or pass --fastai-python)"
                )
                print(skipped[-1], flush=True)
                continue
            print(f"{name} ...", flush=True)
            started = time.perf_counter()
            (work / name).mkdir(parents=True)
            new_rows, new_ratios = runners[name](work / name)
            rows += new_rows
            ratios += new_ratios
            print(table(new_rows), flush=True)
            print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    print()
    for r in ratios:
        print(ratio_line(r))
    if args.json:
        figures: dict[str, object] = {"machine": machine(), "setup": asdict(setup), "skipped": skipped}
        figures.update(rows=[asdict(r) for r in rows], ratios=[asdict(r) for r in ratios])
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
