"""The lesson's recipe as one function over a typed configuration: train, evaluate with TTA, export."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from serving.files import write_atomic
from trainer import augment, plots
from trainer.config import RunConfig
from trainer.data import ImageClassifierData
from trainer.learner import ConvLearner, EpochStats, seed_everything
from trainer.metrics import accuracy, confusion_matrix, log_loss
from trainer.report import write_report
from trainer.schedule import lr_spread

FINAL = "final"  # the trained weights, saved as <run>/models/final.pt

AUGMENTATIONS = {
    "side_on": augment.transforms_side_on,
    "top_down": augment.transforms_top_down,
    "basic": augment.transforms_basic,
    "none": [],
}


CHECKPOINT = "checkpoint.pt"


def make_data(cfg: RunConfig, size: int, run_dir: Path) -> ImageClassifierData:
    """The run's data at `size` pixels: a folder dataset, a labels CSV, or the embedded digits."""
    from trainer.digits import materialise_digits

    tfms = augment.tfms_from_model(
        cfg.arch, size, aug_tfms=AUGMENTATIONS[cfg.aug], max_zoom=cfg.max_zoom, crop_pct=cfg.crop_pct
    )
    common = dict(bs=cfg.bs, num_workers=cfg.num_workers, seed=cfg.seed)
    if cfg.data is None:
        return ImageClassifierData.from_paths(materialise_digits(run_dir / "digits"), tfms, **common)
    if cfg.csv:
        return ImageClassifierData.from_csv(
            cfg.data, cfg.folder, cfg.csv, tfms, suffix=cfg.suffix, id_col=cfg.id_col, label_col=cfg.label_col, **common
        )
    return ImageClassifierData.from_paths(cfg.data, tfms, val_name=cfg.val_name, **common)


def train_on_validation_too(data: ImageClassifierData) -> ImageClassifierData:
    """--full: the final model also learns from the validation images (its scores are then not
    held out; the held-out ones come from the run before it)."""
    return dataclasses.replace(data, trn_files=data.trn_files + data.val_files, trn_y=data.trn_y + data.val_y)


@dataclass
class Stage:
    """One step of the recipe: an lr_find, or a fit whose epochs are checkpointed one by one."""

    name: str
    size: int
    kind: Literal["lr_find", "fit"]
    cycles: int = 0
    cycle_mult: int = 1
    unfrozen: bool = False
    precompute: bool = False


def stages(cfg: RunConfig) -> list[Stage]:
    """The lesson's 8 steps at the first size, then all layers again at each larger size."""
    sizes = cfg.sizes or [cfg.size]
    first = sizes[0]
    plan = [] if cfg.lr else [Stage("lr_find", first, "lr_find", precompute=True)]  # steps 1-2
    if cfg.head_epochs:
        plan.append(Stage("head", first, "fit", cfg.head_epochs, precompute=True))  # step 3
    if cfg.aug_cycles:
        plan.append(Stage("head_aug", first, "fit", cfg.aug_cycles))  # step 4
    if cfg.unfreeze_cycles:
        if not cfg.lr:
            plan.append(Stage("lr_find_unfrozen", first, "lr_find", unfrozen=True))  # steps 5-7
        for size in sizes:  # step 8, once per size: progressive resizing
            plan.append(Stage(f"unfrozen_{size}", size, "fit", cfg.unfreeze_cycles, 2, unfrozen=True))
    elif len(sizes) > 1:
        plan += [Stage(f"head_aug_{size}", size, "fit", max(cfg.aug_cycles, 1)) for size in sizes[1:]]
    return plan


def run(cfg: RunConfig, log=print, *, resume: bool = False) -> tuple[ConvLearner, dict[str, float]]:
    """Train as configured, evaluate with TTA, export `cfg.out / "bundle"`; return the learner and metrics.

    Every epoch ends with an atomically written checkpoint; with resume=True a run that was
    interrupted (Ctrl-C, a killed process) continues from its last completed epoch."""
    from trainer.export import export

    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / CHECKPOINT
    state = _load_checkpoint(checkpoint_path, cfg) if resume else None
    if state and state.get("finished"):
        log(
            f"{out}: the run is already complete ({len(state['learner']['history'])} epochs, bundle in "
            f"{out / 'bundle'}); nothing to resume. Train it further with `trainer fit --run {out}`, "
            "or run without --resume to start afresh"
        )
        return learner_from_run(out, log), json.loads((out / "metrics.json").read_text())
    if not resume or state is None:
        seed_everything(cfg.seed)
        write_atomic(out / "config.json", (cfg.model_dump_json(indent=2) + "\n").encode())
    plan = stages(cfg)
    done_stage, done_epochs = (state["stage"], state["epochs"]) if state else (0, 0)
    lr = state["lr"] if state else cfg.lr
    size = plan[min(done_stage, len(plan) - 1)].size if plan else cfg.size
    data = make_data(cfg, size, out)
    if cfg.full:
        data = train_on_validation_too(data)
    log(f"data: {len(data.trn_files)} train, {len(data.val_files)} valid images, {data.c} classes")
    learn = ConvLearner.pretrained(
        cfg.arch, data, precompute=not state, weights=cfg.weights, models_dir=out / "models", log=log
    )
    learn.bn_freeze(cfg.bn_freeze)
    if state:
        learn.load_training_state(state["learner"])
        if done_stage < len(plan):
            log(f"resumed: stage {done_stage + 1}/{len(plan)}, {len(learn.history)} epochs done")
        else:  # interrupted while evaluating or exporting
            log(f"resumed: training is complete ({len(learn.history)} epochs); evaluating and exporting")

    def checkpoint(stage: int, epochs: int, *, finished: bool = False) -> None:
        """finished: every output is written, so resuming has nothing left to do."""
        blob = {
            "stage": stage,
            "epochs": epochs,
            "lr": lr,
            "config": cfg.model_dump(mode="json"),
            "learner": learn.training_state(),
            "finished": finished,
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        write_atomic(checkpoint_path, buf.getvalue())
        write_history(out / "history.csv", learn)

    log("epoch, trn_loss, val_loss, accuracy")
    for i, stage in enumerate(plan):
        if i < done_stage:
            continue
        if stage.size != learn.data.tfms.sz:
            new = make_data(cfg, stage.size, out)
            learn.set_data(train_on_validation_too(new) if cfg.full else new)
            log(f"progressive resizing: now {stage.size} px")
        if stage.unfrozen:
            learn.unfreeze()  # step 5
        learn.precompute = stage.precompute
        # Step 6: earlier groups train lr_ratio times slower than the next.
        ratios = lr_spread(1.0, cfg.lr_ratio if stage.unfrozen else 1.0, len(learn.layer_groups()))
        if stage.kind == "lr_find":
            found = find_lr(
                learn,
                out / f"{stage.name}.png",
                log,
                start_lr=[1e-5 * r for r in ratios],
                # On precomputed activations a sweep is cheap (100 batches, cycling a small
                # dataset); unfrozen, every batch runs the whole network: 30 are enough.
                num_it=max(100 if stage.precompute else 30, learn.steps_per_epoch()),
            )
            # Step 7 may lower the lr (a whole network is more fragile than a head on fixed
            # activations) but never raises it.
            lr = found if lr is None else min(lr, found)
        else:
            lrs = [lr * r for r in ratios]
            if stage.unfrozen and i == done_stage and done_epochs == 0:
                log(f"{stage.name}: lrs {', '.join(f'{x:.2e}' for x in lrs)}")
            learn.fit(
                lrs,
                stage.cycles,
                cycle_len=1,
                cycle_mult=stage.cycle_mult,
                cycle_save_name=f"snapshot_{stage.size}" if stage.unfrozen else None,
                start_epoch=done_epochs if i == done_stage else 0,
                on_epoch_end=lambda epochs, i=i: checkpoint(i, epochs),
            )
        checkpoint(i + 1, 0)
    learn.precompute = False
    learn.save(FINAL)
    write_history(out / "history.csv", learn)
    metrics, probs, y = evaluate(learn, log)
    recipe = cfg.model_dump(mode="json", exclude={"out", "data", "weights"})
    recipe.update(epochs=len(learn.history), lr=lr, stages=[s.name for s in plan])
    export(learn, out / "bundle", name=cfg.name, metrics=metrics, recipe=recipe, log=log)
    write_atomic(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    write_figures(learn, out, probs, y)
    write_report(
        out,
        title=f"{cfg.name}: {cfg.arch} at {learn.data.tfms.sz} px",
        config=cfg.model_dump(mode="json"),
        metrics=metrics,
        history=[vars(h) for h in learn.history],
        images=[(caption, png) for png, caption in FIGURES.items() if (out / png).is_file()],
    )
    checkpoint(len(plan), 0, finished=True)
    log(f"bundle: {out / 'bundle'}; report: {out / 'report.html'}")
    return learn, metrics


FIGURES = {
    "lr_find.png": "lr_find: smoothed loss against the head's lr",
    "lr_find_unfrozen.png": "lr_find again, all layers unfrozen (the last group's lr)",
    "schedule.png": "the learning rates used, per batch and layer group (SGDR)",
    "losses.png": "training and validation loss per epoch",
    "confusion_matrix.png": "confusion matrix on the validation set (with TTA)",
    "most_incorrect.png": "most confidently wrong validation images",
    "most_uncertain.png": "most uncertain validation images",
    "most_correct.png": "most confidently right validation images",
}


def write_figures(learn: ConvLearner, out: Path, probs: np.ndarray, y: np.ndarray, k: int = 8) -> None:
    """The run's pictures: schedule, losses, confusion matrix and the lesson's image grids."""
    classes, files = learn.data.classes, learn.data.val_files
    if learn.lr_history:
        plots.plot_schedule(learn.lr_history, out / "schedule.png")
    plots.plot_losses([vars(h) for h in learn.history], out / "losses.png")
    plots.plot_confusion_matrix(confusion_matrix(probs, y, len(classes)), classes, out / "confusion_matrix.png")
    for name, idx in [
        ("most_incorrect", plots.most_incorrect(probs, y, k)),
        ("most_uncertain", plots.most_uncertain(probs, k)),
        ("most_correct", plots.most_correct(probs, y, k)),
    ]:
        titles = plots.image_grid_titles(probs, y, classes, idx)
        plots.plot_image_grid([files[i] for i in idx], titles, out / f"{name}.png")


def evaluate(learn: ConvLearner, log) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Validation metrics with and without TTA; also the TTA probabilities and the labels."""
    plain = learn.predict("valid")
    tta, y = learn.TTA()
    metrics = {
        "accuracy": accuracy(plain, y),
        "log_loss": log_loss(plain, y),
        "accuracy_tta": accuracy(tta, y),
        "log_loss_tta": log_loss(tta, y),
    }
    log("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics, tta, y


def _load_checkpoint(path: Path, cfg: RunConfig) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file: atomic writes make this unlikely, but never crash on it
        raise ValueError(f"{path}: cannot read the checkpoint ({e}); delete it to start the run afresh") from None
    saved = RunConfig.model_validate(state["config"])
    if saved.model_dump(exclude={"out"}) != cfg.model_dump(exclude={"out"}):
        raise ValueError(
            f"{path}: the checkpoint was made with other settings; resume with the same flags, or use another --out"
        )
    return state


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; pass the folder a `trainer run` wrote (it holds config.json)")
    return RunConfig.model_validate_json(path.read_text())


def learner_from_run(run_dir: Path, log=print) -> ConvLearner:
    """The learner of a finished run, rebuilt from its config.json with its final weights loaded."""
    from trainer.model import build_net

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    weights = run_dir / "models" / f"{FINAL}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; the run did not finish (finish it with --resume)")
    data = make_data(cfg, (cfg.sizes or [cfg.size])[-1], run_dir)
    learn = ConvLearner(data, build_net(cfg.arch, data.c, pretrained=False), models_dir=run_dir / "models", log=log)
    learn.load(FINAL)
    learn.history = _read_history(run_dir / "history.csv")  # so that further epochs extend it
    learn.snapshots = sorted(
        (p.stem for p in (run_dir / "models").glob("snapshot_*_cyc_*.pt")),
        key=lambda n: (int(n.split("_")[1]), int(n.rsplit("_", 1)[1])),
    )
    return learn


def find_lr(learn: ConvLearner, png: Path, log, *, num_it: int, start_lr=1e-5) -> float:
    """Run lr_find, save its plot, and return the lesson's pick (one decade below the minimum)."""
    sched = learn.lr_find(start_lr=start_lr, num_it=num_it)
    try:
        suggestion = sched.suggestion()
        sched.plot(png)
    except ValueError as e:  # too few batches for a curve (a tiny dataset): fall back, say so
        log(f"lr_find: {e}; using lr 1e-2")
        return 1e-2
    log(f"lr_find: suggests lr {suggestion.lr:.2e} (steepest descent at {suggestion.lr_steep:.2e}); plot {png}")
    return suggestion.lr


def _read_history(path: Path) -> list[EpochStats]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            EpochStats(int(r["epoch"]), float(r["trn_loss"]), float(r["val_loss"]), float(r["accuracy"]))
            for r in csv.DictReader(f)
        ]


def write_history(path: Path, learn: ConvLearner) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["epoch", "trn_loss", "val_loss", "accuracy"])
    for s in learn.history:
        writer.writerow([s.epoch, f"{s.trn_loss:.6f}", f"{s.val_loss:.6f}", f"{s.accuracy:.6f}"])
    write_atomic(path, buf.getvalue().encode())


def digits_demo_config(out: Path) -> RunConfig:
    """Small settings that train the digits on a 2-core CPU in about a minute. Digits are never
    flipped (a mirrored 2 is not a 2): rotation, lighting and zoom only."""
    return RunConfig(out=out, size=64, crop_pct=1.0, aug="basic", bs=64, head_epochs=3, aug_cycles=1, unfreeze_cycles=0)


def served_accuracy(target: str, files: list[Path], labels: list[int], classes: list[str]) -> tuple[float, list]:
    """Accuracy of a running server on image files, and its replies."""
    from serving.client import Client

    replies = []
    with Client(target) as client:
        for f in files:
            replies.append(client.predict_file(f, top_k=1))
    hits = [classes.index(r.predictions[0].label) == y for r, y in zip(replies, labels, strict=True)]
    return float(np.mean(hits)), replies
