"""`trainer`: train, evaluate with TTA and export a bundle from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel, ValidationError

from serving.files import write_atomic
from trainer.config import RunConfig


def add_model_args(parser: argparse.ArgumentParser, model: type[BaseModel], only: tuple[str, ...] = ()) -> None:
    """One flag per field of a pydantic model (or of the fields named in `only`), with its
    description and default as help."""
    for name, field in model.model_fields.items():
        if only and name not in only:
            continue
        flag, default = f"--{name.replace('_', '-')}", field.default
        if field.annotation is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{field.description} (default: {'on' if default else 'off'})",
            )
            continue
        shown = "none" if default is None else default
        parser.add_argument(
            flag, dest=name, default=None, metavar=name.upper(), help=f"{field.description} (default: {shown})"
        )


def _user_errors() -> tuple[type[BaseException], ...]:
    from serving.bundle import BundleError
    from serving.preprocess import ImageError
    from trainer.data import DataError
    from trainer.export import ExportError
    from trainer.model import WeightsNotFoundError

    return (DataError, ImageError, WeightsNotFoundError, BundleError, ExportError, ValueError, OSError)


def cmd_run(args) -> int:
    from trainer.recipe import run

    values = {k: v for k, v in vars(args).items() if k in RunConfig.model_fields and v is not None}
    if args.epochs is not None:
        values.setdefault("head_epochs", args.epochs)
        values.setdefault("aug_cycles", args.epochs)
    if args.cycles is not None:
        values.setdefault("unfreeze_cycles", args.cycles)
    cfg = RunConfig.model_validate(values)
    if args.resume:
        from trainer.recipe import load_run_config

        path = cfg.out / "config.json"
        # A resumed run takes its settings from the run folder unless flags were given too.
        cfg = load_run_config(cfg.out) if path.is_file() and set(values) <= {"out"} else cfg
    run(cfg, resume=args.resume)
    return 0


def cmd_export(args) -> int:
    from serving.bundle import BundleError, read_manifest
    from trainer.export import ExportError, export, snapshots_at_input_size
    from trainer.recipe import evaluate, learner_from_run, load_run_config, stages

    run_dir = Path(args.run)
    learn = learner_from_run(run_dir, log=lambda msg: print(msg, file=sys.stderr))
    cfg = load_run_config(run_dir)
    snapshots: list[str] = []
    if args.snapshots:
        if not learn.snapshots:
            raise FileNotFoundError(
                f"{run_dir}/models: no snapshot_*_cyc_*.pt files; the run trained no unfrozen cycles"
            )
        # --snapshots asks for the run's snapshot ensemble, and after progressive resizing only the
        # last size's snapshots can form one for a bundle that takes that size: the earlier ones
        # are skipped, and said so, rather than the whole export refused (no flag could then get
        # the ensemble). The manifest's `ensemble` lists exactly the members used.
        snapshots, skipped = snapshots_at_input_size(learn, learn.snapshots)
        size = learn.data.tfms.sz
        if skipped:
            print(
                f"export: skipping {len(skipped)} snapshot(s) not trained at the bundle's {size} px: "
                + ", ".join(f"{n} ({'size not recorded' if s is None else f'{s} px'})" for n, s in skipped.items())
            )
        if not snapshots:
            raise ExportError(
                f"{run_dir}/models: no snapshot was trained at the bundle's input size of {size} px; "
                "export without --snapshots"
            )
        print(f"export: snapshot ensemble of {len(snapshots)} at {size} px: {', '.join(snapshots)}")
    # What the run's own export recorded: the recipe with its epochs, lr and stages, and the
    # validation metrics with and without TTA. lr comes from the run's bundle (lr_find chose it);
    # epochs and metrics are measured now, since `trainer fit` may have trained further.
    try:
        recorded = read_manifest(run_dir / "bundle").recipe
    except BundleError:
        recorded = {}
    recipe = cfg.model_dump(mode="json", exclude={"out", "data", "weights"})
    recipe.update(
        epochs=len(learn.history),
        lr=recorded.get("lr", cfg.lr),
        stages=recorded.get("stages") or [s.name for s in stages(cfg)],
    )
    # A snapshot ensemble is another model than the final weights: export measures its metrics.
    metrics = {} if snapshots else evaluate(learn, print)[0]
    out = Path(args.out) if args.out else run_dir / "bundle"
    manifest = export(
        learn,
        out,
        name=args.name or cfg.name,
        version=args.version,
        metrics=metrics,
        recipe=recipe,
        snapshots=snapshots,
        fp16=args.fp16,
        int8=args.int8,
        calibration_images=args.calibration_images,
        log=print,
    )
    print(
        f"bundle: {out} (sha256 {manifest.model.sha256[:12]}..., TTA accuracy {manifest.metrics['accuracy_tta']:.4f})"
    )
    return 0


DATA_FIELDS = ("data", "val_name", "csv", "folder", "suffix", "arch", "size", "crop_pct", "bs", "num_workers", "seed")


def _config(args) -> RunConfig:
    return RunConfig.model_validate(
        {k: v for k, v in vars(args).items() if k in RunConfig.model_fields and v is not None}
    )


def _data(args):
    from trainer.recipe import make_data

    cfg = _config(args)
    return make_data(cfg, (cfg.sizes or [cfg.size])[0], cfg.out)


def cmd_sizes(args) -> int:
    from trainer.sizes import image_size_stats, plot_size_histogram

    data = _data(args)
    stats = image_size_stats([*data.trn_files, *data.val_files])
    w, h = stats["width"], stats["height"]
    print(
        f"{stats['count']} images; width median {w['median']:.0f} (5%-95%: {w['p5']:.0f}-{w['p95']:.0f}), "
        f"height median {h['median']:.0f} (5%-95%: {h['p5']:.0f}-{h['p95']:.0f})"
    )
    for path, error in stats.get("errors", []):
        print(f"unreadable: {path}: {error}", file=sys.stderr)
    png = Path(args.out or ".") / "sizes.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_size_histogram(stats, png)
    print(f"histogram: {png}")
    return 0


def cmd_resize(args) -> int:
    data = _data(args)
    resized = data.resize(args.target, args.tmp_name)
    print(
        f"{len(resized.trn_files) + len(resized.val_files)} images with shorter side <= {args.target} px "
        f"under {data.path / args.tmp_name / str(args.target)}"
    )
    return 0


def cmd_lr_find(args) -> int:
    from trainer.learner import ConvLearner
    from trainer.recipe import find_lr

    cfg = _config(args)
    data = _data(args)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_atomic(cfg.out / "config.json", (cfg.model_dump_json(indent=2) + "\n").encode())
    learn = ConvLearner.pretrained(cfg.arch, data, precompute=True, weights=cfg.weights, models_dir=cfg.out / "models")
    lr = find_lr(learn, cfg.out / "lr_find.png", print, num_it=max(100, learn.steps_per_epoch()))
    print(f"lr: {lr:.2e}")
    return 0


def _run_learner(run_dir: Path):
    """A run's learner: its final weights when it has them, else fresh pretrained ones."""
    from trainer.learner import ConvLearner
    from trainer.recipe import FINAL, learner_from_run, load_run_config, make_data

    if (Path(run_dir) / "models" / f"{FINAL}.pt").is_file():
        return learner_from_run(run_dir)
    cfg = load_run_config(run_dir)
    data = make_data(cfg, (cfg.sizes or [cfg.size])[-1], Path(run_dir))
    return ConvLearner.pretrained(
        cfg.arch, data, precompute=False, weights=cfg.weights, models_dir=Path(run_dir) / "models"
    )


def cmd_fit(args) -> int:
    from trainer.recipe import FINAL, load_run_config, write_history
    from trainer.schedule import lr_spread

    learn = _run_learner(args.run)
    learn.precompute = args.precompute
    # As the run trained: with bn_freeze (its default), unfrozen BatchNorm layers keep their statistics.
    learn.bn_freeze(load_run_config(args.run).bn_freeze)
    if args.unfreeze:
        learn.unfreeze()
    lrs = lr_spread(args.lr, args.lr_ratio, len(learn.layer_groups())) if args.unfreeze else args.lr
    learn.fit(lrs, args.cycles, cycle_len=args.cycle_len, cycle_mult=args.cycle_mult)
    learn.precompute = False
    learn.save(FINAL)
    write_history(Path(args.run) / "history.csv", learn)
    print(_outdated_note(args.run, metrics_too=True))
    return 0


def cmd_tta(args) -> int:
    from serving.bundle import MANIFEST_NAME
    from trainer.recipe import FINAL, evaluate

    metrics, _, _ = evaluate(_run_learner(args.run), print)
    write_atomic(Path(args.run) / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    print(f"metrics: {Path(args.run) / 'metrics.json'}")
    manifest, weights = Path(args.run) / "bundle" / MANIFEST_NAME, Path(args.run) / "models" / f"{FINAL}.pt"
    if manifest.is_file() and weights.is_file() and weights.stat().st_mtime > manifest.stat().st_mtime:
        print(_outdated_note(args.run))
    return 0


def _outdated_note(run_dir: Path, *, metrics_too: bool = False) -> str:
    """After `trainer fit` changed the run's weights: which files still describe the earlier model,
    and the commands that refresh them."""
    import shlex

    run = shlex.quote(str(run_dir))
    return (
        f"note: {'metrics.json, ' if metrics_too else ''}bundle/ and report.html in {run_dir} still describe "
        f"the model before `trainer fit`; refresh the bundle with `trainer export --run {run}`"
        + (f" and metrics.json with `trainer tta --run {run}`" if metrics_too else "")
        + " (report.html is written only by `trainer run`)"
    )


def cmd_predict(args) -> int:
    import dataclasses

    from trainer.data import DataError, list_images

    if not Path(args.test).is_dir():
        raise DataError(f"{args.test}: no such folder of test images")
    learn = _run_learner(args.run)
    files = list_images(Path(args.test))
    if not files:
        raise DataError(f"{args.test}: no images in it")
    learn.data = dataclasses.replace(learn.data, test_files=files)
    out = Path(args.csv or Path(args.run) / "submission.csv")
    learn.write_submission(out, tta=not args.no_tta, top_label=args.top_label)
    print(f"{len(files)} predictions: {out}")
    return 0


def cmd_demo(args) -> int:
    """Digits end to end: materialise, train, export, serve on a free port, predict, report."""
    from serving.config import ServerConfig
    from serving.server import Server
    from trainer.recipe import digits_demo_config, run, served_accuracy

    cfg = digits_demo_config(Path(args.out))
    learn, metrics = run(cfg)
    server = Server(ServerConfig(bundle=cfg.out / "bundle", port=0, metrics_port=None))
    try:
        target = f"127.0.0.1:{server.port}"
        data = learn.data
        acc, replies = served_accuracy(target, data.val_files, data.val_y, data.classes)
        print(f"\nserver on {target}, a few of its predictions:")
        for f, y, r in list(zip(data.val_files, data.val_y, replies, strict=True))[: args.show]:
            p = r.predictions[0]
            mark = "ok" if p.label == data.classes[y] else "WRONG"
            print(
                f"  {f.relative_to(cfg.out)}: true {data.classes[y]}, predicted {p.label} "
                f"({p.probability:.3f}, {len(r.tta_views)} TTA views) {mark}"
            )
        print(
            f"\naccuracy on {len(replies)} validation images: served {acc:.4f}, "
            f"trainer TTA {metrics['accuracy_tta']:.4f}, trainer without TTA {metrics['accuracy']:.4f}"
        )
        print(f"bundle: {cfg.out / 'bundle'}  (serve it: serving serve --bundle {cfg.out / 'bundle'})")
    finally:
        server.stop(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train on a folder dataset (or the embedded digits), evaluate with TTA, export")
    add_model_args(p, RunConfig)
    p.add_argument("--epochs", type=int, help="epochs of each head step (sets --head-epochs and --aug-cycles)")
    p.add_argument("--cycles", type=int, help="unfrozen SGDR cycles (sets --unfreeze-cycles)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out from its last completed epoch (default: off)",
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "export",
        help="export a finished run as a bundle (model.onnx + manifest.json) for `serving`",
        description="Export a finished `trainer run` as a bundle, verified before it replaces anything: onnx.checker, "
        "ONNX Runtime against PyTorch on real images, and the bundle's TTA accuracy through ONNX Runtime equal to "
        "the trainer's.",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder written by `trainer run` (config.json, models/)")
    p.add_argument(
        "--out",
        help="bundle folder to write (default: RUN/bundle); an existing one is replaced only once the new one is verified",
    )
    p.add_argument("--name", help="model name recorded in the bundle (default: the run's --name)")
    p.add_argument("--version", help="model version recorded in the bundle (default: the export time, YYYYmmdd-HHMMSS)")
    p.add_argument(
        "--snapshots",
        action="store_true",
        help="export the run's SGDR snapshots as one ensemble graph that averages their probabilities (default: the final weights)",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also write model.fp16.onnx for GPUs, with its measured accuracy change (default: off)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx for CPUs (static quantization), with its measured accuracy change (default: off)",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=64,
        help="training images that calibrate --int8 (default: %(default)s)",
    )
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("lr-find", help="the lr finder on precomputed activations: lr_find.png and a suggested lr")
    add_model_args(p, RunConfig)
    p.set_defaults(func=cmd_lr_find)
    p = sub.add_parser("fit", help="train a run's model further with SGDR (the lesson's learn.fit)")
    p.add_argument("--run", type=Path, required=True, help="run folder (from `trainer run` or `trainer lr-find`)")
    p.add_argument("--lr", type=float, required=True, help="lr of the head (last layer group)")
    p.add_argument("--cycles", type=int, default=1, help="SGDR cycles (default: %(default)s)")
    p.add_argument("--cycle-len", type=int, default=1, help="epochs in the first cycle (default: %(default)s)")
    p.add_argument("--cycle-mult", type=int, default=1, help="each cycle this many times longer (default: %(default)s)")
    p.add_argument(
        "--unfreeze", action="store_true", help="train all layer groups, with differential lrs (default: the head only)"
    )
    p.add_argument(
        "--lr-ratio",
        type=float,
        default=10.0,
        help="with --unfreeze: each earlier group this many times slower (default: %(default)s)",
    )
    p.add_argument(
        "--precompute",
        action="store_true",
        help="train the head on precomputed activations (default: images with augmentation)",
    )
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("tta", help="accuracy and log loss of a run's model on the validation set, with and without TTA")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.set_defaults(func=cmd_tta)
    p = sub.add_parser("predict", help="predict a folder of unlabelled images into a submission CSV")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--test", type=Path, required=True, help="folder of images to predict")
    p.add_argument("--csv", help="CSV to write (default: RUN/submission.csv)")
    p.add_argument(
        "--top-label",
        action="store_true",
        help="one column with the most probable label (default: one probability column per class)",
    )
    p.add_argument("--no-tta", action="store_true", help="plain centre view only (default: TTA)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("sizes", help="image-size statistics of a dataset and a histogram PNG, to choose a size")
    add_model_args(p, RunConfig, only=(*DATA_FIELDS, "out"))
    p.set_defaults(func=cmd_sizes)
    p = sub.add_parser("resize", help="cache copies of a dataset's images with the shorter side at most --target px")
    add_model_args(p, RunConfig, only=DATA_FIELDS)
    p.add_argument("--target", type=int, required=True, help="shorter side of the cached copies, pixels")
    p.add_argument("--tmp-name", default="tmp", help="cache folder under the data folder (default: %(default)s)")
    p.set_defaults(func=cmd_resize)
    p = sub.add_parser("demo", help="the embedded digits end to end: train, export, serve, predict")
    p.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    p.add_argument("--show", type=int, default=8, help="predictions to print (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as e:
        problems = "; ".join(
            f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors()
        )
        print(f"trainer: {problems}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        print(f"trainer: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trainer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
