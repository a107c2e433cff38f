"""The run's configuration: one typed model, written beside every run as config.json.

Its own module, importing neither torch nor the trainer's other modules, so that `trainer --help`
and configuration errors answer at once instead of after loading PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The backbones trainer.model can build, named here too so that --help lists them and a misspelt
# --arch is refused without loading torch (tests/test_config.py checks the two lists agree).
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
