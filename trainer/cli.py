"""`trainer`: train, evaluate with TTA and export a bundle from the shell.

This module only parses: each subcommand calls one function of trainer.recipe (run),
trainer.commands (the others) or trainer.demo. It imports none of them, nor torch, until a
subcommand runs, so that --help and flag errors answer at once."""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import dataclass
from importlib import import_module
from typing import TypeVar, cast

from pydantic import BaseModel, ValidationError

from trainer.config import (
    CleanOptions,
    DemoOptions,
    ExportOptions,
    FitOptions,
    PredictOptions,
    ResizeOptions,
    RunConfig,
    RunFlags,
    SizesOptions,
    TTAOptions,
)

M = TypeVar("M", bound=BaseModel)

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
    "max_pixels",
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
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("cli") is False:
            continue  # recorded by the trainer, not set by the user
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
        shown = "required" if field.is_required() else f"default: {'none' if default is None else default}"
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            required=field.is_required(),
            # The choices are shown, not enforced by argparse: RunConfig refuses another value in one
            # line naming the choices, where argparse would print its whole usage text first.
            metavar="{" + ",".join(map(str, choices)) + "}" if choices else name.upper(),
            help=f"{field.description} ({shown})",
        )


def given(args: argparse.Namespace) -> dict:
    """The RunConfig fields the flags set (a flag not given is None and keeps the field's default)."""
    return {k: v for k, v in vars(args).items() if k in RunConfig.model_fields and v is not None}


def config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig the flags give: fields not given keep their defaults."""
    return RunConfig.model_validate(given(args))


def cmd_run(args: argparse.Namespace) -> int:
    from trainer.learn import distributed
    from trainer.outputs.run_folder import RunFolder
    from trainer.recipe import run

    values, flags = given(args), options(args, RunFlags)
    if flags.epochs is not None:
        values.setdefault("head_epochs", flags.epochs)
        values.setdefault("aug_cycles", flags.epochs)
    if flags.cycles is not None:
        values.setdefault("unfreeze_cycles", flags.cycles)
    cfg = RunConfig.model_validate(values)
    # Under torchrun (`torchrun --nproc_per_node N -m trainer run ...`): one process per device, joined here.
    dist = distributed.init()
    try:
        folder = RunFolder(cfg.out)
        if dist.is_main and flags.resume and folder.has_config() and set(values) <= {"out"}:
            cfg = folder.read_config()  # a resumed run takes its settings from the run folder unless flags were given
        run(distributed.broadcast(cfg, dist), resume=flags.resume, dist=dist)  # rank 0's settings, on every rank
    finally:
        distributed.shutdown()
    return 0


def options(args: argparse.Namespace, model: type[M]) -> M:
    """The `model` the flags give: fields not given keep their defaults."""
    return model.model_validate({k: v for k, v in vars(args).items() if k in model.model_fields and v is not None})


@dataclass(frozen=True)
class Command:
    """A subcommand: its help, its flags (the fields of `options`, and of RunConfig when `data` names
    them, all of them when it is empty) and the function it calls, "module:function", with the
    options' fields as keyword arguments and, with `data`, the RunConfig as `cfg`."""

    name: str
    summary: str
    calls: str
    options: type[BaseModel] | None = None
    data: tuple[str, ...] | None = None
    details: str = ""

    def __call__(self, args: argparse.Namespace) -> int:
        module, function = self.calls.split(":")
        kwargs = {} if self.options is None else dict(options(args, self.options))
        if self.data is not None:
            kwargs["cfg"] = config(args)
        getattr(import_module(module), function)(**kwargs)
        return 0


COMMANDS = (
    Command(
        "verify",
        "check every image of a dataset before training: report all unreadable files at once, and what to look at",
        "trainer.audit.check:verify",
        data=DATA_FIELDS,
        details="What `trainer run` checks first. Unreadable files, one line each, stop it (exit 2); warnings "
        "(classes with few images, imbalance, duplicates within a split and across training and validation, "
        "images far smaller than --size) are printed and do not.",
    ),
    Command(
        "clean",
        "find likely label errors: out-of-fold predictions of a head on precomputed activations",
        "trainer.audit.label_errors:clean",
        CleanOptions,
        details="Writes RUN/label_errors.csv (the images whose given label the model finds least likely, "
        "flagged by confident learning) and RUN/label_errors.png (the top suspects, given and predicted labels). "
        "Train without them with `trainer run --exclude RUN/label_errors.csv`.",
    ),
    Command(
        "export",
        "export a finished run as a bundle (model.onnx + manifest.json) for `serving`",
        "trainer.commands:export_run",
        ExportOptions,
        details="The bundle is verified before it replaces anything: onnx.checker, ONNX Runtime against PyTorch "
        "on real images, and the bundle's TTA accuracy through ONNX Runtime equal to the trainer's.",
    ),
    Command(
        "lr-find",
        "run the lr finder on precomputed activations: lr_find.png and a suggested lr",
        "trainer.commands:lr_find",
        data=(),
        details="Writes config.json and lr_find.png under --out; train from there with `trainer fit --run OUT`.",
    ),
    Command(
        "fit", "train a run's model further with SGDR (the lesson's learn.fit)", "trainer.commands:fit", FitOptions
    ),
    Command(
        "tta",
        "score a run's model on the validation set, with and without TTA, into metrics.json",
        "trainer.commands:tta",
        TTAOptions,
    ),
    Command(
        "predict",
        "predict a folder of unlabelled images into a submission CSV",
        "trainer.commands:predict",
        PredictOptions,
    ),
    Command(
        "sizes",
        "print a dataset's image-size statistics and draw their histogram, to choose a size",
        "trainer.commands:sizes",
        SizesOptions,
        data=DATA_FIELDS,
    ),
    Command(
        "resize",
        "cache copies of a dataset's images with the shorter side at most --target px (the lesson's data.resize)",
        "trainer.commands:resize",
        ResizeOptions,
        data=DATA_FIELDS,
    ),
    Command("demo", "the embedded digits end to end: train, export, serve, predict", "trainer.demo:demo", DemoOptions),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are messages for the user (a file, a flag), printed without a traceback."""
    from serving.bundle.manifest import BundleError
    from serving.bundle.preprocess import ImageError
    from trainer.data.loaders import DataError
    from trainer.learn.distributed import DistributedError
    from trainer.learn.model import WeightsNotFoundError
    from trainer.outputs.export import ExportError

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


def _message(e: BaseException) -> str:
    """The error's own words. An error raised in a DataLoader worker comes back with the worker's
    traceback in its message (torch's ExceptionWrapper): its last line, less the exception's
    module path, is what the user needs ("a.jpg: corrupt or truncated image: ...")."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name = f"{type(e).__module__}.{type(e).__qualname__}: "
    return last.removeprefix(name).removeprefix(f"{type(e).__qualname__}: ")


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
    add_model_args(p, RunFlags)
    p.set_defaults(func=cmd_run)
    for command in COMMANDS:
        p = _subcommand(sub, command.name, command.summary, command.details)
        if command.data is not None:
            add_model_args(p, RunConfig, only=command.data)
        if command.options is not None:
            add_model_args(p, command.options)
        p.set_defaults(func=command)
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
        print(f"trainer: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trainer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
