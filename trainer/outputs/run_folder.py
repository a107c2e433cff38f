"""A run's folder: the one owner of its files (configuration, history, checkpoint, weights, metrics,
figures, report, bundle) and of rebuilding a learner from them.

Everything else asks a RunFolder for a path or a record instead of joining names itself, so the
layout is written down once:

    <run>/config.json        the resolved RunConfig
    <run>/history.csv        one row per epoch (history.COLUMNS)
    <run>/checkpoint.pt      the state after the last completed epoch (training_state)
    <run>/models/final.pt    the trained weights; snapshot_<size>_cyc_<n>.pt (+ .json: their size)
    <run>/metrics.json       validation scores, and whether they are held out
    <run>/*.png, report.html the figures and the page that shows them
    <run>/bundle/            the export for `serving`
"""

from __future__ import annotations

import csv
import io
import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.bundle.files import write_atomic
from serving.bundle.manifest import MANIFEST_NAME
from trainer.config import RunConfig
from trainer.learn.history import COLUMNS, EpochStats

if TYPE_CHECKING:  # annotations only; torch loads when a learner is needed
    import numpy as np

    from trainer.learn.distributed import Dist
    from trainer.learn.learner import ConvLearner

FINAL = "final"  # the trained weights: models/final.pt
# The figures a run draws, in the report's order, with their captions.
FIGURES = {
    "lr_find.png": "lr_find: smoothed loss against the head's lr",
    "lr_find_unfrozen.png": "lr_find again, all layers unfrozen (the last group's lr)",
    "schedule.png": "the learning rates used, per batch and layer group (SGDR)",
    "losses.png": "training and validation loss per epoch",
    "confusion_matrix.png": "confusion matrix on the validation set (with TTA)",
    "most_incorrect.png": "most confidently wrong validation images",
    "most_uncertain.png": "most uncertain validation images",
    "most_correct.png": "most confidently right validation images",
    "calibration.png": "reliability diagram: confidence against accuracy (with TTA), before and after the temperature",
}
HELD_OUT = "held_out"  # metrics.json's key saying whether the scores are on images the model never trained on


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # --- where things are

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    @property
    def bundle_dir(self) -> Path:
        return self.path / "bundle"

    @property
    def report_file(self) -> Path:
        return self.path / "report.html"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def checkpoint_file(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def history_file(self) -> Path:
        return self.path / "history.csv"

    @property
    def final_weights(self) -> Path:
        return self.models_dir / f"{FINAL}.pt"

    def figure(self, name: str) -> Path:
        """The path of one of FIGURES (or of an lr_find plot named after its stage)."""
        return self.path / name

    # --- configuration

    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / "config.json", (cfg.model_dump_json(indent=2) + "\n").encode())

    def has_config(self) -> bool:
        return (self.path / "config.json").is_file()

    def read_config(self) -> RunConfig:
        path = self.path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; pass the folder a `trainer run` wrote (it holds config.json)")
        return RunConfig.model_validate_json(path.read_text())

    # --- history

    def write_history(self, history: list[EpochStats]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(s.row() for s in history)
        write_atomic(self.history_file, buf.getvalue().encode())

    def read_history(self) -> list[EpochStats]:
        if not self.history_file.is_file():
            return []
        with open(self.history_file, newline="") as f:
            return [EpochStats.from_row(r) for r in csv.DictReader(f)]

    # --- checkpoint: what `trainer run --resume` continues from

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(self.checkpoint_file, buf.getvalue())

    def read_checkpoint(self, cfg: RunConfig) -> dict[str, Any] | None:
        """The checkpoint, None when there is none; refused when it was made with other settings."""
        import torch

        path = self.checkpoint_file
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: atomic writes make this unlikely, but never crash on it
            # Not torch's own message: it suggests weights_only=False, which would run code from the file.
            raise ValueError(
                f"{path}: cannot read the checkpoint ({type(e).__name__}: damaged, or not written by `trainer run`); "
                "delete it to start the run afresh"
            ) from None
        saved = RunConfig.model_validate(state["config"])
        if saved.model_dump(exclude={"out"}) != cfg.model_dump(exclude={"out"}):
            raise ValueError(
                f"{path}: the checkpoint was made with other settings; resume with the same flags, or use another --out"
            )
        return state

    # --- metrics

    def write_metrics(self, metrics: Mapping[str, float], *, held_out: bool) -> None:
        record = {**metrics, HELD_OUT: held_out}
        write_atomic(self.metrics_file, (json.dumps(record, indent=2) + "\n").encode())

    def read_metrics(self) -> tuple[dict[str, float], bool]:
        """(the scores, whether they are held out); metrics.json from before HELD_OUT counts as held out."""
        record = json.loads(self.metrics_file.read_text())
        held_out = bool(record.pop(HELD_OUT, True))
        return {k: float(v) for k, v in record.items()}, held_out

    # --- weights and learners

    def snapshots(self) -> list[str]:
        """The SGDR snapshots saved by the run, in training order (size, then cycle)."""
        return sorted(
            (p.stem for p in self.models_dir.glob("snapshot_*_cyc_*.pt")),
            key=lambda n: (int(n.split("_")[1]), int(n.rsplit("_", 1)[1])),
        )

    def new_learner(
        self, cfg: RunConfig, size: int, *, precompute: bool, log: Callable[[str], None], dist: Dist | None = None
    ) -> ConvLearner:
        """A learner with the pretrained backbone and a new head, on the run's data at `size` px;
        `dist`: its place in distributed training (trainer.learn.distributed)."""
        from trainer.data.assemble import make_data
        from trainer.learn.learner import ConvLearner

        data = make_data(cfg, size, self.path, dist)
        learn = ConvLearner.pretrained(
            cfg.arch, data, precompute=precompute, weights=cfg.weights, models_dir=self.models_dir, log=log, dist=dist
        )
        learn.bn_freeze(cfg.bn_freeze)
        learn.label_smoothing = cfg.label_smoothing
        return learn

    def learner(self, log: Callable[[str], None] = print, *, require_final: bool = True) -> ConvLearner:
        """The run's learner at its final size with its final weights, history and snapshots, so that
        further epochs extend them. Without final weights: an error (require_final), or a fresh
        pretrained learner (`trainer lr-find` made the folder; `trainer fit` trains it)."""
        from trainer.data.assemble import make_data
        from trainer.learn.learner import ConvLearner
        from trainer.learn.model import build_net

        cfg = self.read_config()
        if not self.final_weights.is_file():
            if require_final:
                raise FileNotFoundError(
                    f"{self.final_weights}: missing; the run did not finish (finish it with `trainer run --resume "
                    f"--out {shlex.quote(str(self.path))}`)"
                )
            return self.new_learner(cfg, cfg.train_sizes[-1], precompute=False, log=log)
        data = make_data(cfg, cfg.train_sizes[-1], self.path)
        learn = ConvLearner(data, build_net(cfg.arch, data.c, pretrained=False), models_dir=self.models_dir, log=log)
        learn.load(FINAL)
        learn.bn_freeze(cfg.bn_freeze)  # as the run trained: unfrozen BatchNorm layers keep their statistics
        learn.label_smoothing = cfg.label_smoothing
        learn.history = self.read_history()
        learn.snapshots = self.snapshots()
        learn.temperature = self.temperature()
        return learn

    def temperature(self) -> float:
        """The calibration temperature of the final weights (see trainer.evaluate.calibrate): metrics.json's,
        unless the weights were trained further since it was written (1.0: not calibrated)."""
        if not (self.metrics_file.is_file() and self.final_weights.is_file()):
            return 1.0
        if self.metrics_file.stat().st_mtime < self.final_weights.stat().st_mtime:
            return 1.0
        return float(self.read_metrics()[0].get("temperature", 1.0))

    def save_final(self, learn: ConvLearner) -> None:
        """The final weights and the history; in distributed training, every rank calls it and rank 0 writes."""
        learn.save(FINAL)
        if learn.dist.is_main:
            self.write_history(learn.history)

    # --- figures and report

    def write_figures(
        self,
        learn: ConvLearner,
        probs: np.ndarray,
        y: np.ndarray,
        k: int = 8,
        *,
        uncalibrated: np.ndarray | None = None,
    ) -> None:
        """The run's pictures: schedule, losses, confusion matrix and the lesson's image grids; with
        `uncalibrated` (probs before the temperature), the reliability diagram of both."""
        from trainer.evaluate.metrics import confusion_matrix
        from trainer.outputs import plots

        classes, files = learn.data.classes, learn.data.val_files
        if learn.lr_history:
            plots.plot_schedule(learn.lr_history, self.figure("schedule.png"))
        plots.plot_losses([vars(h) for h in learn.history], self.figure("losses.png"))
        plots.plot_confusion_matrix(
            confusion_matrix(probs, y, len(classes)), classes, self.figure("confusion_matrix.png")
        )
        if uncalibrated is not None and len(y):
            plots.plot_reliability(
                {"before (T = 1)": uncalibrated, f"after (T = {learn.temperature:.2f})": probs},
                y,
                self.figure("calibration.png"),
            )
        for name, idx in [
            ("most_incorrect", plots.most_incorrect(probs, y, k)),
            ("most_uncertain", plots.most_uncertain(probs, k)),
            ("most_correct", plots.most_correct(probs, y, k)),
        ]:
            titles = plots.image_grid_titles(probs, y, classes, list(idx))
            plots.plot_image_grid([files[i] for i in idx], titles, self.figure(f"{name}.png"))

    def write_report(
        self, cfg: RunConfig, learn: ConvLearner, metrics: Mapping[str, float], probs: np.ndarray, y: np.ndarray
    ) -> Path:
        from trainer.audit.check import read_check
        from trainer.outputs.report import write_report

        data = learn.data
        n_train = len(data.trn_files) - (len(data.val_files) if cfg.full else 0)
        images = {"train": n_train, "valid": len(data.val_files)}
        if data.test_files:
            images["test"] = len(data.test_files)
        found = read_check(self.path)
        left_out = [["file", "why"], *([f, why] for f, why in sorted(cfg.skipped.items()))]
        return write_report(
            self.path,
            title=f"{cfg.name}: {cfg.arch} at {data.tfms.sz} px",
            warnings=[f.message for f in found.warnings] if found else [],
            tables={"Left out of training and validation (--skip-bad)": left_out} if cfg.skipped else None,
            config=cfg.model_dump(mode="json"),
            metrics=metrics,
            history=[vars(h) for h in learn.history],
            images=[(caption, png) for png, caption in FIGURES.items() if self.figure(png).is_file()],
            data_summary={
                "classes": data.classes,
                "images": images,
                "held_out": not cfg.full,
                **({"unreadable, left out (--skip-bad)": len(cfg.skipped)} if cfg.skipped else {}),
                **({"left out of training (--exclude)": str(cfg.exclude)} if cfg.exclude else {}),
            },
            most_confused=_most_confused(probs, y, data.classes),
            summary=self.served_summary(metrics, len(data.val_files), held_out=not cfg.full),
        )

    def served_summary(self, metrics: Mapping[str, float], n_valid: int, *, held_out: bool) -> str | None:
        """The report's first line: what the bundle serves to a call that does not say, scored on
        validation, e.g. "served accuracy 94.8% without TTA (the bundle's default), calibrated: log
        loss 0.145, ECE 0.035, on 153 held-out validation images". The temperature was fitted to
        that default (temperature_for_tta, the export's own rule); None for uncalibrated metrics."""
        if "temperature_for_tta" not in metrics:
            return None
        tta = bool(metrics["temperature_for_tta"])
        k = "_tta" if tta else ""
        where = "held-out validation images" if held_out else "validation images it also trained on (--full)"
        return (
            f"served accuracy {100 * metrics[f'accuracy{k}']:.1f}% {'with' if tta else 'without'} TTA (the bundle's "
            f"default), calibrated: log loss {metrics[f'log_loss{k}']:.3f}, ECE {metrics[f'ece{k}']:.3f}, "
            f"on {n_valid} {where}"
        )

    # --- what is out of date

    def outdated_note(self, after: str, *, metrics_too: bool = False) -> str | None:
        """After `trainer fit` or `trainer tta`: which files still describe an earlier model, and the
        commands that refresh them; None when none does."""
        manifest = self.bundle_dir / MANIFEST_NAME
        stale = [
            name
            for name, path in [("bundle/", manifest), ("report.html", self.report_file)]
            if path.is_file()
            and self.final_weights.is_file()
            and path.stat().st_mtime < self.final_weights.stat().st_mtime
        ]
        if metrics_too and self.metrics_file.is_file():
            stale.insert(0, "metrics.json")
        if not stale:
            return None
        run = shlex.quote(str(self.path))
        fixes = [f"the bundle with `trainer export --run {run}`"] if "bundle/" in stale else []
        if "metrics.json" in stale:
            fixes.append(f"metrics.json with `trainer tta --run {run}`")
        note = f"note: {', '.join(stale)} in {self.path} still describe the model before `{after}`"
        if fixes:
            note += "; refresh " + " and ".join(fixes)
        if "report.html" in stale:
            note += " (report.html is written only by `trainer run`)"
        return note


def _most_confused(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> list[tuple[str, str, int]] | None:
    """The most-confused pairs, where a confusion matrix stops being readable (many classes)."""
    from trainer.evaluate.metrics import most_confused

    return most_confused(probs, y, classes)[:20] if len(classes) > 2 else None
