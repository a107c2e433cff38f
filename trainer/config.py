"""The run's configuration: one typed model, written beside every run as config.json.

Its own module, importing neither torch nor the trainer's other modules, so that `trainer --help`
and configuration errors answer at once instead of after loading PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Where a run's progress lines go: print, or a run folder's log (trainer.outputs.run_folder).
Log = Callable[[str], None]

# The backbones trainer.learn.model can build, named here too so that --help lists them and a misspelt
# --arch is refused without loading torch (tests/trainer/test_config.py checks the two lists agree).
ARCH_NAMES = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)


# Training images are the user's own files: the trainer decodes larger ones than the server accepts
# from callers (serving.bundle.preprocess.DEFAULT_MAX_PIXELS, 50 MP); a 12000 x 12500 scan fits.
MAX_TRAIN_PIXELS = 150_000_000
# Pillow refuses an image of more than twice its Image.MAX_IMAGE_PIXELS outright, before any limit of ours.
PILLOW_MAX_PIXELS = 2 * 89_478_485


class RunConfig(BaseModel):
    """Everything a run depends on; written beside its outputs so that it can be re-run."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(
        None, description="dataset folder (train/, valid/ with one folder per class); none: the embedded digits"
    )
    out: Path = Field(Path("runs/latest"), description="run folder: config, epoch table, bundle/")
    val_name: str = Field("valid", description="name of the validation folder under --data")
    csv: str | None = Field(
        None, description="labels CSV under --data (id, label); a random fifth of its rows validate"
    )
    folder: str = Field("train", description="with --csv: the folder of images under --data")
    suffix: str = Field("", description="with --csv: appended to each id to name its file, e.g. .jpg")
    id_col: str | None = Field(None, description="with --csv: the id column's name; none: the first column")
    label_col: str | None = Field(None, description="with --csv: the label column's name; none: the second column")
    skip_missing: bool = Field(
        False, description="with --csv: drop CSV rows whose image file is missing instead of stopping"
    )
    skip_bad: bool = Field(
        False,
        description="train without the images the data check finds unreadable (listed in config.json's `skipped` "
        "and in the report) instead of stopping before training",
    )
    max_pixels: int = Field(
        MAX_TRAIN_PIXELS,
        ge=1,
        le=PILLOW_MAX_PIXELS,
        description="largest image the trainer decodes, in pixels; larger files are reported unreadable. Training "
        "images are your own files, so the limit is 3x the server's 50 MP; a process decoding one needs up to "
        "24 bytes a pixel (3.6 GB at the default); Pillow reads none over 178,956,970",
    )
    exclude: Path | None = Field(
        None,
        description="images to leave out of training: a CSV with a `file` column (as `trainer clean` writes "
        "label_errors.csv) or a text file of one path per line, relative to --data. Validation keeps its images, "
        "so scores stay comparable with a run without it",
    )
    # Written by the data check, never a flag (trainer.cli skips fields marked cli=False).
    skipped: dict[str, str] = Field(
        default_factory=dict,
        description="files --skip-bad left out, relative to --data, and why",
        json_schema_extra={"cli": False},
    )
    arch: str = Field(
        "efficientnet_lite0", description="backbone architecture", json_schema_extra={"choices": list(ARCH_NAMES)}
    )
    weights: Path | None = Field(None, description="local ImageNet weights file for the backbone")
    size: int = Field(224, ge=16, le=1024, description="network input side, pixels")
    sizes: list[int] | None = Field(
        None, description="progressive resizing, e.g. 128,224: train at each size in turn (overrides --size)"
    )
    resize: int | None = Field(
        None,
        ge=16,
        description="cache copies of the images with the shorter side at most this many pixels (the lesson's "
        "data.resize) and train from them; speeds up decoding of large photos. At least the training size. "
        "Validation and TTA read the copies too, but the bundle serves the originals, so served "
        "probabilities can differ slightly from validation's",
    )
    crop_pct: float = Field(0.875, ge=0.5, le=1.0, description="centre crop as a fraction of the resized shorter side")
    aug: Literal["side_on", "top_down", "basic", "none"] = Field("side_on", description="training augmentation family")
    max_zoom: float = Field(1.1, ge=1.0, le=2.0, description="largest random zoom in training")
    bs: int = Field(
        16,
        ge=2,
        description="mini-batch size, images; 16 trained fastest per image on a CPU and keeps the peak RSS of a "
        "224 px run under 3.5 GB (64: 6.4-7.2 GB)",
    )
    lr: float | None = Field(None, gt=0, description="lr of the head (last layer group); none: lr_find picks it")
    lr_ratio: float = Field(
        10.0, ge=1.0, description="each earlier layer group trains this many times slower (3 for satellite/medical)"
    )
    wd: float = Field(1e-4, ge=0.0, description="weight decay of every layer group (SGD's L2 penalty; 0 turns it off)")
    label_smoothing: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="training targets give this much probability to the other classes: it tempers a small or "
        "noisily labelled set's pull towards certainty (0 for plain cross-entropy)",
    )
    head_epochs: int | None = Field(
        None,
        ge=0,
        description="step 3: epochs of the head on precomputed activations; none: enough for "
        "200 mini-batches, at least 2 (an epoch on cached activations takes a fraction of a second, and "
        "two epochs of a few hundred images leave the head far from trained)",
    )
    aug_cycles: int = Field(1, ge=0, description="step 4: cycles (cycle_len=1) of the head with augmentation")
    lr_find_unfrozen: bool = Field(
        False,
        description="step 7: sweep lr_find again once unfrozen; by default the unfrozen lr is the head's halved "
        "(fastai's fine_tune rule), which measured as accurate on the dev sets without the sweep's full-network "
        "batches (bench/README.md)",
    )
    unfreeze_cycles: int = Field(
        2, ge=0, description="step 8: cycles of all layers, cycle_len=1, cycle_mult=2 (2 -> 3 epochs, 3 -> 7)"
    )
    num_workers: int = Field(2, ge=0, description="data-loading worker processes")
    seed: int = Field(42, description="seed for reproducible runs")
    name: str = Field("classifier", description="model name recorded in the bundle")
    # On by default: the head was fitted on activations computed with the ImageNet statistics
    # (precompute), and batch statistics of a few dozen images differ enough to undo it; on 32 px
    # digits unfrozen BatchNorm in training mode collapsed accuracy to chance.
    bn_freeze: bool = Field(
        True,
        description="keep the backbone's BatchNorm statistics when unfrozen (the lesson's bn_freeze); --no-bn-freeze to train them",
    )
    full: bool = Field(
        False, description="train the final model on train+valid (validation scores are then not held out)"
    )

    @field_validator("sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, sizes):
        if isinstance(sizes, str):
            try:
                sizes = [int(x) for x in sizes.split(",") if x.strip()]
            except ValueError:
                raise ValueError(
                    f"sizes must be whole numbers separated by commas, e.g. 128,224; got {sizes!r}"
                ) from None
        if sizes is not None and (not sizes or any(not 16 <= x <= 1024 for x in sizes)):
            raise ValueError(f"sizes must be between 16 and 1024 pixels, got {sizes}")
        return sizes

    @property
    def train_sizes(self) -> list[int]:
        """The input sizes training goes through in turn: --sizes (progressive resizing), else --size.
        The first is where training starts; the last is the trained model's, and its bundle's."""
        return list(self.sizes or [self.size])

    @model_validator(mode="after")
    def _resize_not_below_size(self) -> RunConfig:
        largest = max(self.train_sizes)
        if self.resize is not None and self.resize < largest:
            raise ValueError(
                f"resize {self.resize} px is smaller than the training size {largest} px; the copies would be "
                f"upscaled again. Pass --resize {largest} or more (the lesson uses 340 for 224 and 299)"
            )
        return self

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in ARCH_NAMES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCH_NAMES)}")
        return arch


# The other subcommands' options, one model each: `trainer <command> --help` and its flags are built
# from them (trainer.cli), and their fields are the keyword arguments of the function each command
# calls (trainer.commands, trainer.demo), so that a new option is one field here.


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunFlags(_Options):
    """`trainer run`'s flags beside RunConfig's: shorthands, and resuming."""

    epochs: int | None = Field(None, ge=0, description="epochs of each head step (sets --head-epochs and --aug-cycles)")
    cycles: int | None = Field(None, ge=0, description="unfrozen SGDR cycles (sets --unfreeze-cycles)")
    resume: bool = Field(False, description="continue an interrupted run in --out from its last completed epoch")


class ExportOptions(_Options):
    run: Path = Field(description="run folder written by `trainer run` (config.json, models/)")
    out: Path | None = Field(
        None,
        description="bundle folder to write, RUN/bundle when not given; an existing one is replaced only once the "
        "new one is verified",
    )
    repository: Path | None = Field(
        None,
        description="model repository to add the bundle to as REPOSITORY/NAME/N, N one more than the largest "
        "version there, moved in only once verified; instead of --out",
    )
    name: str | None = Field(
        None, description="model name recorded in the bundle and its repository folder; the run's --name when not given"
    )
    version: str | None = Field(
        None, description="model version recorded in the bundle; the export time (YYYYmmdd-HHMMSS) when not given"
    )
    snapshots: bool = Field(
        False,
        description="export the run's SGDR snapshots as one ensemble graph that averages their probabilities "
        "instead of the final weights",
    )
    fp16: bool = Field(False, description="also write model.fp16.onnx for GPUs, with its measured accuracy change")
    int8: bool = Field(
        False,
        description="also write model.int8.onnx for CPUs (static quantization), with its measured accuracy change",
    )
    calibration_images: int = Field(64, ge=1, description="training images that calibrate --int8")


class FitOptions(_Options):
    run: Path = Field(description="run folder (from `trainer run` or `trainer lr-find`)")
    lr: float = Field(gt=0, description="lr of the head (last layer group)")
    cycles: int = Field(1, ge=1, description="SGDR cycles")
    cycle_len: int = Field(1, ge=1, description="epochs in the first cycle")
    cycle_mult: int = Field(1, ge=1, description="each cycle this many times longer")
    unfreeze: bool = Field(False, description="train all layer groups, with differential lrs, not the head only")
    lr_ratio: float = Field(10.0, gt=0, description="with --unfreeze: each earlier group this many times slower")
    precompute: bool = Field(
        False, description="train the head on precomputed activations instead of images with augmentation"
    )


class TTAOptions(_Options):
    run: Path = Field(description="run folder")


class PredictOptions(_Options):
    run: Path = Field(description="run folder")
    test: Path = Field(description="folder of images to predict")
    csv: Path | None = Field(None, description="CSV to write; RUN/submission.csv when not given")
    top_label: bool = Field(
        False, description="one column with the most probable label instead of one probability column per class"
    )
    tta: bool = Field(True, description="every TTA view; --no-tta: the plain centre view only")


class SizesOptions(_Options):
    out: Path = Field(Path("."), description="folder for sizes.png")


class ResizeOptions(_Options):
    target: int = Field(ge=1, description="shorter side of the cached copies, pixels")
    tmp_name: str = Field(
        "tmp", description="cache folder in the data folder, or in the user's cache when that is read-only"
    )


class DemoOptions(_Options):
    out: Path = Field(Path("runs/demo"), description="run folder")
    show: int = Field(8, ge=0, description="predictions to print")


class CleanOptions(_Options):
    run: Path = Field(description="run folder (config.json names the data; no training is needed)")
    folds: int = Field(5, ge=2, le=20, description="cross-validation folds of the out-of-fold predictions")
    top: int = Field(20, ge=0, description="suspects shown in label_errors.png")
    write_labels: Path | None = Field(
        None,
        description="with a labels CSV: write a copy of it with the likely label errors fixed as --fix says, "
        "for you to review",
    )
    fix: Literal["relabel", "drop"] = Field(
        "relabel",
        description="--write-labels: relabel a likely error with the predicted class, or drop its row (rows "
        "removed change the random validation split; to compare with this run, train with --exclude instead)",
    )
