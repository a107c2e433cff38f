"""`trainer`: train, evaluate with TTA and export a bundle from the shell.

This module only parses: each subcommand calls one function of trainer.recipe (run),
trainer.commands (the others) or trainer.demo. It imports none of them, nor torch, until a
subcommand runs, so that --help and flag errors answer at once."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import cast

from pydantic import BaseModel, ValidationError

from trainer.config import RunConfig

# The flags that choose a dataset and how it is read: what `trainer sizes` and `trainer resize` take.
DATA_FIELDS = (
    "data",
    "val_name",
    "csv",
    "folder",
    "suffix",
    "id_col",
    "label_col",
    "skip_missing",
    "arch",
    "size",
    "crop_pct",
    "bs",
    "num_workers",
    "seed",
)


def add_model_args(parser: argparse.ArgumentParser, model: type[BaseModel], only: tuple[str, ...] = ()) -> None:
    """One flag per field of a pydantic model (or of the fields named in `only`), with its
    description, its choices when the field has a fixed set, and its default as help."""
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
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        if isinstance(field.json_schema_extra, dict) and "choices" in field.json_schema_extra:
            choices = tuple(cast(list, field.json_schema_extra["choices"]))  # a str field with a known set (--arch)
        shown = "none" if default is None else default
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            # The choices are shown, not enforced by argparse: RunConfig refuses another value in one
            # line naming the choices, where argparse would print its whole usage text first.
            metavar="{" + ",".join(map(str, choices)) + "}" if choices else name.upper(),
            help=f"{field.description} (default: {shown})",
        )


def given(args: argparse.Namespace) -> dict:
    """The RunConfig fields the flags set (a flag not given is None and keeps the field's default)."""
    return {k: v for k, v in vars(args).items() if k in RunConfig.model_fields and v is not None}


def config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig the flags give: fields not given keep their defaults."""
    return RunConfig.model_validate(given(args))


def cmd_run(args) -> int:
    from trainer import distributed
    from trainer.recipe import run
    from trainer.run_folder import RunFolder

    values = given(args)
    if args.epochs is not None:
        values.setdefault("head_epochs", args.epochs)
        values.setdefault("aug_cycles", args.epochs)
    if args.cycles is not None:
        values.setdefault("unfreeze_cycles", args.cycles)
    cfg = RunConfig.model_validate(values)
    # Under torchrun (`torchrun --nproc_per_node N -m trainer run ...`): one process per device, joined here.
    dist = distributed.init()
    try:
        folder = RunFolder(cfg.out)
        if dist.is_main and args.resume and folder.has_config() and set(values) <= {"out"}:
            cfg = folder.read_config()  # a resumed run takes its settings from the run folder unless flags were given
        run(distributed.broadcast(cfg, dist), resume=args.resume, dist=dist)  # rank 0's settings, on every rank
    finally:
        distributed.shutdown()
    return 0


def cmd_export(args) -> int:
    from trainer.commands import export_run

    export_run(
        args.run,
        args.out,
        repository=args.repository,
        name=args.name,
        version=args.version,
        snapshots=args.snapshots,
        fp16=args.fp16,
        int8=args.int8,
        calibration_images=args.calibration_images,
    )
    return 0


def cmd_lr_find(args) -> int:
    from trainer.commands import lr_find

    lr_find(config(args))
    return 0


def cmd_fit(args) -> int:
    from trainer.commands import fit

    fit(
        args.run,
        args.lr,
        cycles=args.cycles,
        cycle_len=args.cycle_len,
        cycle_mult=args.cycle_mult,
        unfreeze=args.unfreeze,
        lr_ratio=args.lr_ratio,
        precompute=args.precompute,
    )
    return 0


def cmd_tta(args) -> int:
    from trainer.commands import tta

    tta(args.run)
    return 0


def cmd_predict(args) -> int:
    from trainer.commands import predict

    predict(args.run, args.test, args.csv, tta=not args.no_tta, top_label=args.top_label)
    return 0


def cmd_sizes(args) -> int:
    from trainer.commands import sizes

    sizes(config(args), Path(args.out))
    return 0


def cmd_resize(args) -> int:
    from trainer.commands import resize

    resize(config(args), args.target, args.tmp_name)
    return 0


def cmd_demo(args) -> int:
    from trainer.demo import demo

    demo(Path(args.out), args.show)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are messages for the user (a file, a flag), printed without a traceback."""
    from serving.bundle.manifest import BundleError
    from serving.bundle.preprocess import ImageError
    from trainer.data import DataError
    from trainer.distributed import DistributedError
    from trainer.export import ExportError
    from trainer.model import WeightsNotFoundError

    return (
        DataError,
        ImageError,
        WeightsNotFoundError,
        BundleError,
        ExportError,
        DistributedError,
        ValueError,
        OSError,
    )


def _subcommand(sub, name: str, summary: str, details: str = "") -> argparse.ArgumentParser:
    """A subcommand whose --help starts with the same one-line summary the command list shows."""
    return sub.add_parser(name, help=summary, description=f"{summary}.{' ' + details if details else ''}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="trainer", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    p = _subcommand(
        sub,
        "run",
        "train on a folder dataset, a labels CSV or the embedded digits; evaluate with TTA; export a bundle",
        "The lesson's recipe: precompute, lr_find, the head, the head with augmentation, unfreeze, lr_find "
        "again, all layers with SGDR (cycle_mult=2), at each of --sizes. Writes config.json, history.csv, "
        "plots, report.html and bundle/ under --out.",
    )
    add_model_args(p, RunConfig)
    p.add_argument("--epochs", type=int, help="epochs of each head step (sets --head-epochs and --aug-cycles)")
    p.add_argument("--cycles", type=int, help="unfrozen SGDR cycles (sets --unfreeze-cycles)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out from its last completed epoch (default: off)",
    )
    p.set_defaults(func=cmd_run)

    p = _subcommand(
        sub,
        "export",
        "export a finished run as a bundle (model.onnx + manifest.json) for `serving`",
        "The bundle is verified before it replaces anything: onnx.checker, ONNX Runtime against PyTorch on "
        "real images, and the bundle's TTA accuracy through ONNX Runtime equal to the trainer's.",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder written by `trainer run` (config.json, models/)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=Path,
        help="bundle folder to write (default: RUN/bundle); an existing one is replaced only once the new one is verified",
    )
    where.add_argument(
        "--repository",
        type=Path,
        help="model repository to add the bundle to as REPOSITORY/NAME/N, N one more than the largest version there, "
        "moved in only once verified (default: off, see --out)",
    )
    p.add_argument(
        "--name", help="model name recorded in the bundle and its repository folder (default: the run's --name)"
    )
    p.add_argument("--version", help="model version recorded in the bundle (default: the export time, YYYYmmdd-HHMMSS)")
    p.add_argument(
        "--snapshots",
        action="store_true",
        help="export the run's SGDR snapshots as one ensemble graph that averages their probabilities "
        "(default: off, the final weights)",
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

    p = _subcommand(
        sub,
        "lr-find",
        "run the lr finder on precomputed activations: lr_find.png and a suggested lr",
        "Writes config.json and lr_find.png under --out; train from there with `trainer fit --run OUT`.",
    )
    add_model_args(p, RunConfig)
    p.set_defaults(func=cmd_lr_find)

    p = _subcommand(sub, "fit", "train a run's model further with SGDR (the lesson's learn.fit)")
    p.add_argument("--run", type=Path, required=True, help="run folder (from `trainer run` or `trainer lr-find`)")
    p.add_argument("--lr", type=float, required=True, help="lr of the head (last layer group)")
    p.add_argument("--cycles", type=int, default=1, help="SGDR cycles (default: %(default)s)")
    p.add_argument("--cycle-len", type=int, default=1, help="epochs in the first cycle (default: %(default)s)")
    p.add_argument("--cycle-mult", type=int, default=1, help="each cycle this many times longer (default: %(default)s)")
    p.add_argument(
        "--unfreeze",
        action="store_true",
        help="train all layer groups, with differential lrs (default: off, the head only)",
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
        help="train the head on precomputed activations (default: off, images with augmentation)",
    )
    p.set_defaults(func=cmd_fit)

    p = _subcommand(sub, "tta", "score a run's model on the validation set, with and without TTA, into metrics.json")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.set_defaults(func=cmd_tta)

    p = _subcommand(sub, "predict", "predict a folder of unlabelled images into a submission CSV")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--test", type=Path, required=True, help="folder of images to predict")
    p.add_argument("--csv", type=Path, help="CSV to write (default: RUN/submission.csv)")
    p.add_argument(
        "--top-label",
        action="store_true",
        help="one column with the most probable label (default: off, one probability column per class)",
    )
    p.add_argument("--no-tta", action="store_true", help="plain centre view only (default: off, TTA)")
    p.set_defaults(func=cmd_predict)

    p = _subcommand(sub, "sizes", "print a dataset's image-size statistics and draw their histogram, to choose a size")
    add_model_args(p, RunConfig, only=DATA_FIELDS)
    p.add_argument("--out", default=".", help="folder for sizes.png (default: %(default)s, the current folder)")
    p.set_defaults(func=cmd_sizes)

    p = _subcommand(
        sub,
        "resize",
        "cache copies of a dataset's images with the shorter side at most --target px (the lesson's data.resize)",
    )
    add_model_args(p, RunConfig, only=DATA_FIELDS)
    p.add_argument("--target", type=int, required=True, help="shorter side of the cached copies, pixels")
    p.add_argument(
        "--tmp-name",
        default="tmp",
        help="cache folder in the data folder, or in the user's cache when that is read-only (default: %(default)s)",
    )
    p.set_defaults(func=cmd_resize)

    p = _subcommand(sub, "demo", "the embedded digits end to end: train, export, serve, predict")
    p.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    p.add_argument("--show", type=int, default=8, help="predictions to print (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from trainer import threads  # torch, only once a subcommand runs

    threads.configure()  # for every command; `run` says so in its log
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
