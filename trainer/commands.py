"""What the subcommands other than `run` and `demo` do: each works on a run folder (or a dataset)
and reports through `log`. The CLI parses flags and calls these; nothing here parses."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from serving.bundle.manifest import BundleError, read_manifest
from serving.repository.layout import publish, staging_dir
from trainer.config import Log, RunConfig
from trainer.data.assemble import make_data
from trainer.data.loaders import DataError, ImageClassifierData, list_images
from trainer.evaluate.scoring import evaluate
from trainer.evaluate.submission import write_submission
from trainer.learn.learner import ConvLearner
from trainer.learn.schedule import lr_spread
from trainer.outputs.export import ExportError, export, snapshots_at_input_size
from trainer.outputs.run_folder import RunFolder
from trainer.recipe import bundle_recipe, find_lr


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def dataset(cfg: RunConfig) -> ImageClassifierData:
    """The configured dataset at the first training size, validation images kept apart (for
    statistics and caches, --full must not count them twice)."""
    cfg = cfg.model_copy(update={"full": False})
    return make_data(cfg, cfg.train_sizes[0], cfg.out)


def lr_find(cfg: RunConfig, log: Log = print) -> float:
    """The lr finder on precomputed activations of a new head, after the data check `trainer run`
    makes: the run folder gets config.json and lr_find.png (then `trainer fit --run` trains from there)."""
    from trainer.audit.check import checked_config

    folder = RunFolder(cfg.out)
    cfg = checked_config(cfg, folder.path, log)  # every unreadable file at once, as `trainer run` checks
    folder.write_config(cfg)
    learn = folder.new_learner(cfg, cfg.train_sizes[0], precompute=True, log=log)
    lr = find_lr(learn, folder.figure("lr_find.png"), log, num_it=max(100, learn.steps_per_epoch()))
    log(f"lr: {lr:.2e}")
    return lr


def fit(
    run: Path,
    lr: float,
    *,
    cycles: int,
    cycle_len: int,
    cycle_mult: int,
    unfreeze: bool,
    lr_ratio: float,
    precompute: bool,
    log: Log = print,
) -> ConvLearner:
    """Train a run's model further with SGDR (the lesson's learn.fit); the run's final weights and
    history are replaced by the result, and what now describes an older model is said."""
    folder = RunFolder(run)
    learn = folder.learner(log, require_final=False)
    # The run's temperature was fitted to the weights about to change: train and validate without it
    # (the epochs' losses stay comparable with the run's); `trainer tta` or `export` fit a new one.
    learn.temperature = 1.0
    learn.precompute = precompute
    if unfreeze:
        learn.unfreeze()
    lrs = lr_spread(lr, lr_ratio, len(learn.layer_groups())) if unfreeze else lr
    learn.fit(
        lrs,
        cycles,
        cycle_len=cycle_len,
        cycle_mult=cycle_mult,
        wds=folder.read_config().wd,  # as the run trained (its label smoothing, too: folder.learner sets it)
        stage=f"trainer fit: {learn.describe_stage()}",
    )
    learn.precompute = False
    folder.save_final(learn)
    note = folder.outdated_note("trainer fit", metrics_too=True)
    if note:
        log(note)
    return learn


def tta(run: Path, log: Log = print) -> dict[str, float]:
    """The run's validation scores with and without TTA, written to metrics.json."""
    folder = RunFolder(run)
    held_out = not folder.read_config().full
    metrics, *_ = evaluate(folder.learner(log, require_final=False), log, held_out=held_out)
    folder.write_metrics(metrics, held_out=held_out)
    log(f"metrics: {folder.metrics_file}")
    note = folder.outdated_note("trainer tta")
    if note:
        log(note)
    return metrics


def export_run(
    run: Path,
    out: Path | None = None,
    *,
    repository: Path | None = None,
    name: str | None = None,
    version: str | None = None,
    snapshots: bool = False,
    fp16: bool = False,
    int8: bool = False,
    calibration_images: int = 64,
    log: Log = print,
) -> Path:
    """Export a finished run as a bundle (RUN/bundle unless `out`), with the recipe that trained it.

    With `repository`, the bundle becomes the next version of `<repository>/<name>/` instead: it is
    written and verified in a hidden folder, then renamed into place in one step, so a server
    watching the repository never sees half of it."""
    if out is not None and repository is not None:
        raise ExportError(
            "--out and --repository both name where the bundle goes: give --out for one bundle folder, "
            "or --repository for the next version in a model repository"
        )
    folder = RunFolder(run)
    learn = folder.learner(_stderr)
    cfg = folder.read_config()
    members = _ensemble(folder, learn, log) if snapshots else []
    # lr_find chose the run's lr, and only its own export recorded it; epochs and metrics are
    # measured now, since `trainer fit` may have trained further.
    try:
        lr = read_manifest(folder.bundle_dir).recipe.get("lr", cfg.lr)
    except BundleError:
        lr = cfg.lr
    # A snapshot ensemble is another model than the final weights: export measures its metrics.
    metrics = {} if members else evaluate(learn, log, held_out=not cfg.full)[0]
    name = name or cfg.name
    out = staging_dir(repository, name) if repository is not None else Path(out) if out else folder.bundle_dir
    manifest = export(
        learn,
        out,
        name=name,
        version=version,
        metrics=metrics,
        recipe=bundle_recipe(cfg, len(learn.history), lr),
        held_out=not cfg.full,
        snapshots=members,
        fp16=fp16,
        int8=int8,
        calibration_images=calibration_images,
        log=log,
    )
    if repository is not None:
        out = publish(out)
    log(f"bundle: {out} (sha256 {manifest.model.sha256[:12]}..., TTA accuracy {manifest.metrics['accuracy_tta']:.4f})")
    return out


def _ensemble(folder: RunFolder, learn: ConvLearner, log: Log) -> list[str]:
    """The run's snapshots that can form one ensemble for the bundle.

    After progressive resizing only the last size's snapshots fit a bundle that takes that size:
    the earlier ones are skipped, and said so, rather than the whole export refused (no flag could
    then get the ensemble). The manifest's `ensemble` lists exactly the members used."""
    if not learn.snapshots:
        raise FileNotFoundError(
            f"{folder.models_dir}: no snapshot_*_cyc_*.pt files; the run trained no unfrozen cycles"
        )
    members, skipped = snapshots_at_input_size(learn, learn.snapshots)
    size = learn.data.tfms.sz
    if skipped:
        log(
            f"export: skipping {len(skipped)} snapshot(s) not trained at the bundle's {size} px: "
            + ", ".join(f"{n} ({'size not recorded' if s is None else f'{s} px'})" for n, s in skipped.items())
        )
    if not members:
        raise ExportError(
            f"{folder.models_dir}: no snapshot was trained at the bundle's input size of {size} px; "
            "export without --snapshots"
        )
    log(f"export: snapshot ensemble of {len(members)} at {size} px: {', '.join(members)}")
    return members


def predict(run: Path, test: Path, csv: Path | None, *, tta: bool, top_label: bool, log: Log = print) -> Path:
    """Predict a folder of unlabelled images into a submission CSV (RUN/submission.csv unless `csv`)."""
    if not Path(test).is_dir():
        raise DataError(f"{test}: no such folder of test images")
    folder = RunFolder(run)
    learn = folder.learner(_stderr, require_final=False)
    files = list_images(Path(test))
    if not files:
        raise DataError(f"{test}: no images in it")
    learn.data = dataclasses.replace(learn.data, test_files=files)
    out = write_submission(learn, Path(csv or folder.path / "submission.csv"), tta=tta, top_label=top_label)
    log(f"{len(files)} predictions: {out}")
    return out


def sizes(cfg: RunConfig, out: Path, log: Log = print) -> Path:
    """Image-size statistics of the dataset, and a histogram at out/sizes.png."""
    from trainer.data.sizes import image_size_stats, plot_size_histogram

    data = dataset(cfg)
    stats = image_size_stats([*data.trn_files, *data.val_files])
    w, h = stats["width"], stats["height"]
    log(
        f"{stats['count']} images; width median {w['median']:.0f} (5%-95%: {w['p5']:.0f}-{w['p95']:.0f}), "
        f"height median {h['median']:.0f} (5%-95%: {h['p5']:.0f}-{h['p95']:.0f})"
    )
    for path, error in stats.get("errors", []):
        _stderr(f"unreadable: {path}: {error}")
    png = Path(out) / "sizes.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_size_histogram(stats, png)
    log(f"histogram: {png}")
    return png


def resize(cfg: RunConfig, target: int, tmp_name: str, log: Log = print) -> ImageClassifierData:
    """Cache copies of the dataset's images with the shorter side at most `target` px."""
    resized = dataset(cfg).resize(target, tmp_name)
    files = [*resized.trn_files, *resized.val_files]
    log(f"{len(files)} images with shorter side <= {target} px under {os.path.commonpath(files)}")
    return resized
