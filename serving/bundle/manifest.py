"""The export bundle: the one contract between the trainer and the server.

A bundle is a folder holding `model.onnx` and `manifest.json`. The manifest is defined here, once,
as a pydantic model with a schema version; the trainer writes it and the server validates it on
load. Every constant the server needs (input size, resize policy, TTA views, classes) lives in the
manifest and is never re-declared on the serving side.

The ONNX graph contract (schemas 1 and 2): one input, uint8, layout NHWC (batch, size, size, 3),
RGB; one output, float32 (batch, n_classes), probabilities that sum to 1. Normalisation and softmax
are inside the graph, so the server only decodes, resizes and crops.

The manifest's sha256 covers the graph, and the graph covers the manifest's meaning: at export the
classes, preprocessing and TTA views are written into the graph's metadata (CONTRACT_KEY, canonical
JSON), so a manifest edited afterwards (classes reordered, another input size) is refused on load
instead of being served with wrong labels.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path, PureWindowsPath
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.bundle.files import sha256_file, write_atomic

# Schema 2 added tta.default / tta.reason (whether a call that does not say gets TTA, and why) and
# metrics_held_out. Every schema-1 manifest is still read, with the defaults those fields declare
# (TTA on, as servers then did), so old bundles keep working here. The version is bumped anyway
# because a schema-2 bundle can ask for TTA off by default, which a server that knows only schema 1
# would not honour: such a server now refuses it, naming the version, instead of failing on an
# unknown field or serving it with the wrong default.
SCHEMA_VERSION: Final = 2
READABLE_SCHEMAS = (1, 2)
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
# The graph metadata key (ONNX metadata_props) that holds contract_json() of the manifest at export.
CONTRACT_KEY = "classifier.contract"
CONTRACT_PARTS = ("classes", "preprocessing", "tta")

Anchor = Literal["center", "top_left", "top_right", "bottom_left", "bottom_right"]


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TTAView(_Strict):
    """One deterministic view of an image: a square crop, optionally zoomed and flipped.

    The crop is taken from the image after its shorter side was resized to `resize_size`:
    a square of side `input_size / zoom` at `anchor`, scaled to `input_size`, then flipped.
    """

    name: str = Field(min_length=1)
    zoom: float = Field(default=1.0, ge=1.0, le=2.0, description="1 = plain crop; 1.1 = 10% closer")
    anchor: Anchor = "center"
    hflip: bool = False
    vflip: bool = False
    rot90: int = Field(default=0, ge=0, le=3, description="quarter turns anticlockwise, applied last")


CENTER = TTAView(name="center")


class Preprocessing(_Strict):
    input_size: int = Field(ge=8, le=2048, description="side of the square network input, pixels")
    resize_size: int = Field(ge=8, le=4096, description="the shorter side is resized to this first, pixels")
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    input_dtype: Literal["uint8"] = "uint8"
    input_layout: Literal["NHWC"] = "NHWC"

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        if self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than input_size {self.input_size}")
        return self


class Normalization(_Strict):
    """Per-channel mean and std on the 0-1 scale; recorded for people, applied inside the graph."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_graph: Literal[True] = True


# The reason a bundle exported before the TTA default was recorded (schema 1) gives for its default.
UNRECORDED_TTA_REASON = "not recorded: exported before the default was chosen at export; TTA on, as servers then did"


class TTA(_Strict):
    # views[0] is the plain view, the only one run when TTA is off.
    views: list[TTAView] = Field(min_length=1)
    aggregation: Literal["mean_probability"] = "mean_probability"
    # Whether a call that does not say (PredictRequest.tta unset) gets every view: chosen at export
    # from the validation metrics (trainer.outputs.export.choose_tta_default), since TTA can score worse than
    # the plain view. `reason` says why, for people.
    default: bool = True
    reason: str = UNRECORDED_TTA_REASON

    def views_for(self, tta: bool | None = None) -> list[TTAView]:
        """The views a prediction runs: every one with tta=True, only the plain first one with
        tta=False, and the bundle's default with None (a call that does not say)."""
        return self.views if (self.default if tta is None else tta) else self.views[:1]

    @field_validator("views")
    @classmethod
    def _names_unique(cls, views: list[TTAView]) -> list[TTAView]:
        names = [v.name for v in views]
        if len(set(names)) != len(names):
            raise ValueError(f"TTA view names must be unique, got {names}")
        return views


def _plain_file_name(name: str) -> str:
    # A manifest comes with the bundle, from wherever the bundle came from: its file names must not
    # reach outside the bundle folder (`../x.onnx`, `/abs/x.onnx`). Links are checked in load_bundle.
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or PureWindowsPath(name).drive:
        raise ValueError(f"{name!r} is not a plain file name in the bundle folder (no folders, '..' or absolute paths)")
    return name


FileName = Annotated[str, AfterValidator(_plain_file_name)]


class ModelFile(_Strict):
    file: FileName = MODEL_NAME
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=17)
    input_name: str
    output_name: str


class Variant(_Strict):
    """A smaller or faster copy of the model, with its accuracy measured against the fp32 graph."""

    precision: Literal["fp16", "int8"]
    file: FileName
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    intended_for: Literal["cuda", "cpu"]  # fp16 pays off on GPUs; int8 on CPUs
    # Validation accuracy with TTA through ONNX Runtime, and its change from the fp32 model's.
    accuracy_tta: float
    accuracy_tta_delta: float
    max_probability_diff: float  # largest |variant - fp32| probability over the validation views


Precision = Literal["fp32", "fp16", "int8"]


class Manifest(_Strict):
    schema_version: Literal[1, 2] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created_at: datetime
    architecture: str
    classes: list[str] = Field(min_length=2)
    preprocessing: Preprocessing
    normalization: Normalization
    tta: TTA
    model: ModelFile
    variants: list[Variant] = Field(default_factory=list)
    # Names of the SGDR snapshots averaged inside the graph (a snapshot ensemble); empty for one model.
    ensemble: list[str] = Field(default_factory=list)
    # Validation metrics at export, e.g. accuracy, log_loss, accuracy_tta, log_loss_tta.
    metrics: dict[str, float] = Field(default_factory=dict)
    # False when the model also trained on the validation images (`trainer run --full`): `metrics`
    # then flatter it. Schema-1 manifests did not record it and read as True.
    metrics_held_out: bool = True
    # The training recipe that produced the model (epochs, lrs, cycles, sizes): free-form, for people.
    recipe: dict = Field(default_factory=dict)
    # Library versions at export (torch, onnx, ...).
    versions: dict[str, str] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) != len(classes):
            raise ValueError("class names must be unique")
        return classes


def now() -> datetime:
    return datetime.now(UTC)


def contract_json(classes: list[str], preprocessing: Preprocessing, tta: TTA) -> str:
    """The manifest's meaning as canonical JSON (sorted keys, no spaces): what the trainer embeds in
    the graph under CONTRACT_KEY and check_contract compares on load. Takes the parts, not a
    Manifest, because the graph is written (and its sha256 taken) before the manifest exists."""
    parts = {
        "classes": list(classes),
        "preprocessing": preprocessing.model_dump(mode="json"),
        "tta": tta.model_dump(mode="json"),
    }
    return _canonical(parts)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_contract(manifest: Manifest, embedded: str | None, model_path: Path) -> None:
    """Refuse a manifest whose classes, preprocessing or TTA differ from those embedded in its graph
    (`embedded`: the graph's CONTRACT_KEY metadata, None when absent).

    The embedded parts are read through the manifest's own models before they are compared, so a
    field added since the graph was written compares as its default on both sides: an old graph's
    TTA section (no `default`) matches an old manifest's, and refuses an edit to it."""
    if embedded is None:
        raise BundleError(
            f"{model_path}: the graph carries no {CONTRACT_KEY} metadata, so it was exported by an older trainer "
            "and its manifest cannot be checked against it: re-export the bundle"
        )
    try:
        graph = json.loads(embedded)
    except json.JSONDecodeError:
        graph = None
    if not isinstance(graph, dict):
        raise BundleError(
            f"{model_path}: the graph's {CONTRACT_KEY} metadata is not a JSON object: re-export the bundle"
        )
    expected = json.loads(contract_json(manifest.classes, manifest.preprocessing, manifest.tta))
    differ = [
        part for part in CONTRACT_PARTS if _canonical(_read_part(part, graph.get(part))) != _canonical(expected[part])
    ]
    if differ:
        raise BundleError(
            f"{model_path.parent / MANIFEST_NAME}: {', '.join(differ)} not as embedded in {model_path.name} at "
            "export (the manifest was edited after export): re-export the bundle"
        )


_PART_MODELS: dict[str, type[BaseModel]] = {"preprocessing": Preprocessing, "tta": TTA}


def _read_part(part: str, value: object) -> object:
    """An embedded contract part with the defaults of fields it lacks filled in, as JSON values;
    one that does not validate is returned as it is (and so differs from any manifest's)."""
    model = _PART_MODELS.get(part)
    if model is None or not isinstance(value, dict):
        return value
    try:
        return model.model_validate(value).model_dump(mode="json")
    except ValidationError:
        return value


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST_NAME
    write_atomic(path, (manifest.model_dump_json(indent=2) + "\n").encode())
    return path


def read_manifest(bundle_dir: Path) -> Manifest:
    """Read and validate a bundle's manifest; every failure is a BundleError naming the file."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle folder; pass the folder `trainer export` wrote")
    if not path.is_file():
        inner = Path(bundle_dir) / "bundle"
        if (inner / MANIFEST_NAME).is_file():  # a run folder: `trainer run` writes its bundle in bundle/
            raise BundleError(f"{path}: missing; {bundle_dir} looks like a run folder: did you mean {inner}?")
        raise BundleError(f"{path}: missing; a bundle folder holds {MANIFEST_NAME} and {MODEL_NAME}")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); re-export the bundle") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in READABLE_SCHEMAS:
        raise BundleError(
            f"{path}: schema_version {version!r} is not supported (this server reads "
            f"{' and '.join(map(str, READABLE_SCHEMAS))}); re-export with a matching trainer or upgrade the server"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        # pydantic prefixes our own validators' messages with "Value error, "; people need only ours.
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise BundleError(f"{path}: invalid manifest: {problems}") from None


def model_file(manifest: Manifest, precision: Precision = "fp32") -> tuple[str, str]:
    """(file name, sha256) of the model at `precision`; a precision the bundle lacks is a BundleError."""
    if precision == "fp32":
        return manifest.model.file, manifest.model.sha256
    for v in manifest.variants:
        if v.precision == precision:
            return v.file, v.sha256
    have = ", ".join(["fp32", *(v.precision for v in manifest.variants)])
    raise BundleError(
        f"the bundle has no {precision} model (it has: {have}); export with --{precision} or pick one of those"
    )


def _file_field(manifest: Manifest, precision: Precision) -> str:
    """The manifest field naming the model file at `precision`, as validation errors spell it."""
    if precision == "fp32":
        return "model.file"
    return next(f"variants.{i}.file" for i, v in enumerate(manifest.variants) if v.precision == precision)


def load_bundle(bundle_dir: Path, precision: Precision = "fp32") -> tuple[Manifest, Path]:
    """Validate a bundle (manifest schema and the ONNX file's checksum); return it and the model path."""
    manifest = read_manifest(bundle_dir)
    name, expected = model_file(manifest, precision)
    model_path = Path(bundle_dir) / name
    if not model_path.is_file():
        raise BundleError(f"{model_path}: missing; the manifest names it as the {precision} model file")
    folder = Path(bundle_dir).resolve()
    if model_path.resolve().parent != folder:
        raise BundleError(
            f"{Path(bundle_dir) / MANIFEST_NAME}: {_file_field(manifest, precision)} {name!r} links to "
            f"{model_path.resolve()}, outside the bundle folder {folder}; copy the file into the bundle instead"
        )
    actual = sha256_file(model_path)
    if actual != expected:
        raise BundleError(
            f"{model_path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
            "the file was changed or corrupted after export: re-export or restore it"
        )
    return manifest, model_path
