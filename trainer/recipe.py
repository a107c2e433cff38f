"""The lesson's recipe as a plan of stages, and its run: train, evaluate with TTA, export."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trainer import memory, threads
from trainer.config import Log, RunConfig
from trainer.data.assemble import make_data
from trainer.data.loaders import DataError
from trainer.evaluate.scoring import evaluate
from trainer.learn import training_state
from trainer.learn.distributed import Dist
from trainer.learn.history import stage_label
from trainer.learn.learner import ConvLearner
from trainer.learn.schedule import lr_spread
from trainer.outputs.run_folder import RunFolder

BEST = "best"  # models/best.pt: the weights of the best validated epoch at the final size


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

    @property
    def label(self) -> str:
        """What the stage trains, in words: the `stage` of its epochs' rows."""
        return stage_label(self.size, precompute=self.precompute, unfrozen=self.unfrozen)


def stages(cfg: RunConfig) -> list[Stage]:
    """The lesson's 8 steps at the first size, then all layers again at each larger size."""
    sizes = cfg.train_sizes
    first = sizes[0]
    plan = [] if cfg.lr else [Stage("lr_find", first, "lr_find", precompute=True)]  # steps 1-2
    if cfg.head_epochs != 0:  # None: as many as head_epochs() finds for the data
        plan.append(Stage("head", first, "fit", cfg.head_epochs or 0, precompute=True))  # step 3
    if cfg.aug_cycles:
        plan.append(Stage("head_aug", first, "fit", cfg.aug_cycles))  # step 4
    if cfg.unfreeze_cycles:
        if not cfg.lr and cfg.lr_find_unfrozen:
            plan.append(Stage("lr_find_unfrozen", first, "lr_find", unfrozen=True))  # steps 5-7
        for size in sizes:  # step 8, once per size: progressive resizing
            plan.append(Stage(f"unfrozen_{size}", size, "fit", cfg.unfreeze_cycles, 2, unfrozen=True))
    elif len(sizes) > 1:
        plan += [Stage(f"head_aug_{size}", size, "fit", max(cfg.aug_cycles, 1)) for size in sizes[1:]]
    return plan


def run(
    cfg: RunConfig, log: Log = print, *, resume: bool = False, dist: Dist | None = None
) -> tuple[ConvLearner | None, dict[str, float]]:
    """Train as configured, evaluate with TTA, export the run's bundle; return the learner and metrics.

    Every epoch ends with an atomically written checkpoint; with resume=True a run that was
    interrupted (Ctrl-C, a killed process) continues from its last completed epoch.

    `dist`: this process's place in distributed training (trainer.learn.distributed.init under torchrun).
    Every rank trains its share; rank 0 alone reads the checkpoint (and sends it to the others),
    writes the run folder and exports; the others return the same metrics, and no learner when
    the run was already complete (rank 0 reads it from its run folder, which they may not see)."""
    recipe = Recipe(cfg, log, dist or Dist())
    if (finished := recipe.start(resume)) is not None:
        return finished
    for i, stage in enumerate(recipe.plan):
        if i >= recipe.progress.stage:
            recipe.train(i, stage)
            recipe.checkpoint(i + 1, 0)
    return recipe.learner, recipe.finish()


@dataclass
class Progress:
    """Where a run stands, as its checkpoint records it: the stages done, the epochs done of the
    next, the lr lr_find chose (or --lr) and the best epoch validated at the final size."""

    stage: int = 0
    epochs: int = 0
    lr: float | None = None
    best: dict[str, Any] | None = None


class Recipe:
    """One run of the plan (`stages`): its learner, its progress, and the steps `run` takes:
    `start` (resume or begin), `train` a stage, `checkpoint` after each epoch and stage, `finish`
    (the best epoch kept, TTA, export). Rank 0 alone writes; every rank trains."""

    def __init__(self, cfg: RunConfig, log: Log, dist: Dist):
        self.cfg = cfg
        self.dist = dist
        self.main = dist.is_main
        self.log = log if self.main else _quiet
        self.folder = RunFolder(cfg.out)
        self.plan = stages(cfg)
        self.swept_unfrozen = any(s.kind == "lr_find" and s.unfrozen for s in self.plan)  # else its lr is derived
        self.progress = Progress(lr=cfg.lr)
        self._learn: ConvLearner | None = None

    @property
    def learner(self) -> ConvLearner:
        assert self._learn is not None, "start() makes the learner"
        return self._learn

    def start(self, resume: bool) -> tuple[ConvLearner | None, dict[str, float]] | None:
        """Make the learner, from the last checkpoint when resuming; returns the run's result
        instead when it was already complete."""
        folder, log = self.folder, self.log
        threads.configure(log)
        if self.main:
            folder.path.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg = self._checked()
        state = self.dist.from_main(lambda: folder.read_checkpoint(cfg) if resume else None)
        if state and state.get("finished"):
            log(
                f"{folder.path}: the run is already complete ({len(state['learner']['history'])} epochs, bundle in "
                f"{folder.bundle_dir}); nothing to resume. Train it further with `trainer fit --run {folder.path}`, "
                "or run without --resume to start afresh"
            )
            metrics = self.dist.from_main(lambda: folder.read_metrics()[0])
            return (folder.learner(log) if self.main else None), metrics
        if state is None:
            training_state.seed_everything(cfg.seed)
            if self.main:
                folder.write_config(cfg)
        else:
            self.progress = Progress(state["stage"], state["epochs"], state["lr"], state.get("best"))
        done = self.progress.stage
        size = self.plan[min(done, len(self.plan) - 1)].size if self.plan else cfg.size
        learn = self._learn = folder.new_learner(cfg, size, precompute=not state, log=log, dist=self.dist)
        data = learn.data
        held = (
            f"{len(data.val_files)} valid" if not cfg.full else f"{len(data.val_files)} valid (also trained on: --full)"
        )
        log(f"data: {len(data.trn_files)} train, {held} images, {data.c} classes")
        if self.dist.active:
            log(
                f"distributed: {self.dist.world_size} processes of {data.bs} images a step each: an effective "
                f"batch of {data.bs * self.dist.world_size}, {learn.steps_per_epoch()} steps an epoch"
            )
        if state:
            training_state.restore(learn, state["learner"])
            if done < len(self.plan):
                log(f"resumed: stage {done + 1}/{len(self.plan)}, {len(learn.history)} epochs done")
            else:  # interrupted while evaluating or exporting
                log(f"resumed: training is complete ({len(learn.history)} epochs); evaluating and exporting")
        return None

    def _checked(self) -> RunConfig:
        """The data check, on rank 0 (trainer.audit.check): every unreadable file reported at once,
        and the configuration to train with (--skip-bad records what it leaves out)."""
        from trainer.audit.check import checked_config

        def check() -> RunConfig | str:
            try:
                return checked_config(self.cfg, self.folder.path, self.log)
            except DataError as e:  # every rank must stop, not only the one that read the data
                return str(e)

        found = self.dist.from_main(check)
        if isinstance(found, str):
            raise DataError(found)
        return found

    def train(self, i: int, stage: Stage) -> None:
        """Stage `i` of the plan: an lr_find, or a fit checkpointed epoch by epoch (from the epoch
        the run stopped at, when it is the stage a resumed run stopped in)."""
        cfg, learn, log = self.cfg, self.learner, self.log
        if stage.size != learn.data.tfms.sz:
            learn.set_data(make_data(cfg, stage.size, self.folder.path, self.dist))
            log(f"progressive resizing: now {stage.size} px")
        if stage.unfrozen:
            learn.unfreeze()  # step 5
        learn.precompute = stage.precompute
        # Step 6: earlier groups train lr_ratio times slower than the next.
        ratios = lr_spread(1.0, cfg.lr_ratio if stage.unfrozen else 1.0, len(learn.layer_groups()))
        lr = self.progress.lr
        if stage.kind == "lr_find":
            # Rank 0 sweeps alone, on its share of the data (a sweep exchanges no gradients and
            # restores the weights it changed), while the others wait for its suggestion.
            found = self.dist.from_main(
                lambda: find_lr(
                    learn,
                    self.folder.figure(f"{stage.name}.png"),
                    log,
                    start_lr=[1e-5 * r for r in ratios],
                    # On precomputed activations a sweep is cheap (100 batches, cycling a small
                    # dataset); unfrozen, every batch runs the whole network: 30 are enough.
                    num_it=max(100 if stage.precompute else 30, learn.steps_per_epoch()),
                )
            )
            # Step 7 may lower the lr (a whole network is more fragile than a head on fixed
            # activations) but never raises it.
            self.progress.lr = found if lr is None else min(lr, found)
            return
        assert lr is not None, "the plan starts with lr_find when no lr is given"
        derived = stage.unfrozen and not self.swept_unfrozen
        lrs = [lr * (UNFROZEN_LR_SHARE if derived else 1.0) * r for r in ratios]
        cycles = stage.cycles or head_epochs(learn)
        how = f" (the head's {lr:.2e} halved, as fastai's fine_tune does)" if derived else ""
        log(f"{stage.label}: {cycles} cycle(s), lrs {', '.join(f'{x:.2e}' for x in lrs)}{how}")
        learn.fit(
            lrs,
            cycles,
            cycle_len=1,
            cycle_mult=stage.cycle_mult,
            cycle_save_name=f"snapshot_{stage.size}" if stage.unfrozen else None,
            start_epoch=self.progress.epochs if i == self.progress.stage else 0,
            on_epoch_end=functools.partial(self.checkpoint, i),
            wds=cfg.wd,
            stage=stage.label,
        )

    def checkpoint(self, stage: int, epochs: int, *, finished: bool = False) -> None:
        """Record `epochs` done of stage `stage` (0: the stage is next), after keeping the last
        epoch's weights if they are the best yet. finished: every output is written, so resuming
        has nothing left to do."""
        if epochs and not finished:
            self._keep_if_best()
        if not self.main:
            return
        p = self.progress
        self.folder.write_checkpoint(
            {
                "stage": stage,
                "epochs": epochs,
                "best": p.best,
                "lr": p.lr,
                "config": self.cfg.model_dump(mode="json"),
                "learner": training_state.capture(self.learner),
                "finished": finished,
            }
        )
        self.folder.write_history(self.learner.history)

    def _keep_if_best(self) -> None:
        """The last epoch's weights become models/best.pt when they validate better than every
        earlier epoch at the final size: higher accuracy, or as accurate with a lower loss."""
        learn, best = self.learner, self.progress.best
        last = learn.history[-1]
        if learn.data.tfms.sz != self.cfg.train_sizes[-1] or not math.isfinite(last.val_loss):
            return
        if best is None or (last.accuracy, -last.val_loss) > (best["accuracy"], -best["val_loss"]):
            learn.save(BEST)
            self.progress.best = {"epoch": last.epoch, "accuracy": last.accuracy, "val_loss": last.val_loss}

    def finish(self) -> dict[str, float]:
        """Keep the best epoch's weights, evaluate with TTA (every rank: TTA is shared), and on rank
        0 export the bundle and write the metrics, figures, report and a finished checkpoint."""
        from trainer.outputs.export import export

        cfg, learn, folder, log, best = self.cfg, self.learner, self.folder, self.log, self.progress.best
        learn.precompute = False
        last = learn.history[-1] if learn.history else None
        if best is not None and last is not None and best["epoch"] != last.epoch:
            # Never end worse than the best model validated on the way: SGDR's last cycle can overshoot.
            log(
                f"keeping epoch {best['epoch']} (accuracy {best['accuracy']:.4f}, val loss {best['val_loss']:.4f}), "
                f"which validated better than the last, epoch {last.epoch} (accuracy {last.accuracy:.4f}, "
                f"val loss {last.val_loss:.4f})"
            )
            learn.load(BEST)
        folder.save_final(learn)
        memory.trim()  # training's freed pages back to the system before TTA and export add their own
        metrics, probs, uncalibrated, y = evaluate(learn, log, held_out=not cfg.full)
        if self.main:
            with learn.alone():  # the other ranks wait at the barrier below
                export(
                    learn,
                    folder.bundle_dir,
                    name=cfg.name,
                    metrics=metrics,
                    recipe=bundle_recipe(cfg, len(learn.history), self.progress.lr),
                    held_out=not cfg.full,
                    log=log,
                )
                folder.write_metrics(metrics, held_out=not cfg.full)
                folder.write_figures(learn, probs, y, uncalibrated=uncalibrated)
                folder.write_report(cfg, learn, metrics, probs, y)
                self.checkpoint(len(self.plan), 0, finished=True)
            log(f"bundle: {folder.bundle_dir}; report: {folder.report_file}")
        self.dist.barrier()
        return metrics


def _quiet(message: str) -> None:
    """The log of ranks other than 0: the run speaks with one voice."""


# The last group's lr once all layers train, as a share of the head's, when no second lr_find
# measured it: a whole network is more fragile than a head on fixed activations. fastai's
# fine_tune halves its base lr at the same point.
UNFROZEN_LR_SHARE = 0.5

HEAD_STEPS = 200  # mini-batches the head trains on precomputed activations unless --head-epochs says


def head_epochs(learn: ConvLearner) -> int:
    """Epochs of the head on precomputed activations when --head-epochs is not given: enough for
    HEAD_STEPS mini-batches, at least 2 (the lesson's). On catbreeds (796 images, 13 batches an
    epoch, lr 2e-3 from lr_find) the lesson's 2 epochs left the head at 55% validation accuracy;
    15 reached 71-73%, the linear probe's level, in under two seconds."""
    return max(2, math.ceil(HEAD_STEPS / learn.steps_per_epoch()))


def bundle_recipe(cfg: RunConfig, epochs: int, lr: float | None) -> dict[str, Any]:
    """What the manifest records of how the model was trained: the settings (less paths and file lists), the
    epochs trained, the lr lr_find chose (or --lr) and the stages of the plan."""
    recipe = cfg.model_dump(mode="json", exclude={"out", "data", "weights", "exclude", "skipped"})
    recipe.update(epochs=epochs, lr=lr, stages=[s.name for s in stages(cfg)])
    return recipe


def find_lr(learn: ConvLearner, png: Path, log: Log, *, num_it: int, start_lr: float | list[float] = 1e-5) -> float:
    """Run lr_find, save its plot, and return its suggestion (trainer.learn.lr_finder.Suggestion.lr)."""
    sched = learn.lr_find(start_lr=start_lr, num_it=num_it)
    try:
        suggestion = sched.suggestion()
        sched.plot(png)
    except ValueError as e:  # too few batches for a curve (a tiny dataset): fall back, say so
        log(f"lr_find: {e}; using lr 1e-2")
        return 1e-2
    log(
        f"lr_find: suggests lr {suggestion.lr:.2e}, the middle of the loss's longest descent (the minimum/10 "
        f"rule reads {suggestion.lr_min_div10:.2e}, the steepest point {suggestion.lr_steep:.2e}); plot {png}"
    )
    return suggestion.lr
