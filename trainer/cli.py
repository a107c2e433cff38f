"""`trainer`: train, evaluate with TTA and export a bundle from the shell."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import BaseModel, ValidationError

from trainer.recipe import RunConfig


def add_model_args(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a pydantic model, with its description and default as help."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = field.default
        shown = "none" if default is None else default
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
            help=f"{field.description} (default: {shown})",
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
    run(RunConfig.model_validate(values))
    return 0


def cmd_export(args) -> int:
    from trainer.export import export
    from trainer.recipe import learner_from_run, load_run_config

    learn = learner_from_run(args.run, log=lambda msg: print(msg, file=sys.stderr))
    cfg = load_run_config(args.run)
    if args.snapshots and not learn.snapshots:
        raise FileNotFoundError(f"{args.run}/models: no snapshot_cyc_*.pt files; the run trained no unfrozen cycles")
    out = Path(args.out) if args.out else Path(args.run) / "bundle"
    manifest = export(
        learn, out, name=args.name or cfg.name, version=args.version,
        recipe=cfg.model_dump(mode="json", exclude={"out", "data", "weights"}),
        snapshots=learn.snapshots if args.snapshots else (), fp16=args.fp16, int8=args.int8,
        calibration_images=args.calibration_images, log=print,
    )
    print(f"bundle: {out} (sha256 {manifest.model.sha256[:12]}..., TTA accuracy {manifest.metrics['accuracy_tta']:.4f})")
    return 0


def cmd_demo(args) -> int:
    """Digits end to end: materialise, train, export, serve on a free port, predict, report."""
    from serving.config import ServerConfig
    from serving.server import Server
    from trainer.recipe import digits_demo_config, run, served_accuracy

    cfg = digits_demo_config(Path(args.out))
    learn, metrics = run(cfg)
    server = Server(ServerConfig(bundle=cfg.out / "bundle", port=0))
    try:
        target = f"127.0.0.1:{server.port}"
        data = learn.data
        acc, replies = served_accuracy(target, data.val_files, data.val_y, data.classes)
        print(f"\nserver on {target}, a few of its predictions:")
        for f, y, r in list(zip(data.val_files, data.val_y, replies))[: args.show]:
            p = r.predictions[0]
            mark = "ok" if p.label == data.classes[y] else "WRONG"
            print(f"  {f.relative_to(cfg.out)}: true {data.classes[y]}, predicted {p.label} "
                  f"({p.probability:.3f}, {len(r.tta_views)} TTA views) {mark}")
        print(f"\naccuracy on {len(replies)} validation images: served {acc:.4f}, "
              f"trainer TTA {metrics['accuracy_tta']:.4f}, trainer without TTA {metrics['accuracy']:.4f}")
        print(f"bundle: {cfg.out / 'bundle'}  (serve it: serving serve --bundle {cfg.out / 'bundle'})")
    finally:
        server.stop(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train on a folder dataset (or the embedded digits), evaluate with TTA, export")
    add_model_args(p, RunConfig)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "export",
        help="export a finished run as a bundle (model.onnx + manifest.json) for `serving`",
        description="Export a finished `trainer run` as a bundle, verified before it replaces anything: onnx.checker, "
        "ONNX Runtime against PyTorch on real images, and the bundle's TTA accuracy through ONNX Runtime equal to "
        "the trainer's.",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder written by `trainer run` (config.json, models/)")
    p.add_argument("--out", help="bundle folder to write (default: RUN/bundle); an existing one is replaced only once the new one is verified")
    p.add_argument("--name", help="model name recorded in the bundle (default: the run's --name)")
    p.add_argument("--version", help="model version recorded in the bundle (default: the export time, YYYYmmdd-HHMMSS)")
    p.add_argument("--snapshots", action="store_true", help="export the run's SGDR snapshots as one ensemble graph that averages their probabilities (default: the final weights)")
    p.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx for GPUs, with its measured accuracy change (default: off)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx for CPUs (static quantization), with its measured accuracy change (default: off)")
    p.add_argument("--calibration-images", type=int, default=64, help="training images that calibrate --int8 (default: %(default)s)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("demo", help="the embedded digits end to end: train, export, serve, predict")
    p.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    p.add_argument("--show", type=int, default=8, help="predictions to print (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as e:
        problems = "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors())
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
