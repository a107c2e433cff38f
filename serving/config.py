"""Server configuration: one pydantic model, filled from defaults, SERVING_* variables and flags."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from serving.bundle.cpus import usable_cpus
from serving.bundle.manifest import Precision
from serving.bundle.preprocess import DEFAULT_FORMATS, PEAK_BYTES_PER_PIXEL
from serving.repository.layout import RepositoryError, parse_policies

ENV_PREFIX = "SERVING_"
# decode_workers=0: one decoding process per usable CPU, within these bounds. Two keep one image's decode
# from waiting on another's; past four, decoding (~5 ms an image) is no longer what limits a CPU server.
MIN_AUTO_DECODERS, MAX_AUTO_DECODERS = 2, 4
# A decoding process's own address space before any image: Python, numpy and Pillow (measured: ~170 MiB).
DECODER_BASE_BYTES = 256 * 2**20
# Words that turn an optional setting off when given as a flag or environment variable.
OFF = ("off", "none", "")


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the setting."""


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: Path | None = Field(
        None,
        description="bundle folder written by `trainer export` (model.onnx + manifest.json); or --model-repository",
    )
    model_repository: Path | None = Field(
        None,
        description="model repository folder, laid out <model>/<version>/ with one bundle per version (a positive "
        "integer); watched for new and removed versions; or --bundle",
    )
    version_policy: str = Field(
        "",
        description="with --model-repository: versions served, as MODEL=latest or MODEL=N, comma-separated; "
        "models not named serve their latest",
    )
    default_model: str = Field(
        "",
        description="with --model-repository serving several models: the one a call that names none gets; "
        "empty: such a call must name one (with a single model, it is that one)",
    )
    poll_s: float = Field(
        5.0, ge=0, description="with --model-repository: seconds between scans for new versions; 0 = only on SIGHUP"
    )
    max_model_bytes: int | None = Field(
        None,
        ge=1,
        description="memory budget for loaded model versions, bytes (estimated from their model files); a load "
        "that would exceed it is refused and the old version keeps serving; off = no budget",
    )
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 or [::] for all interfaces")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    workers: int = Field(
        16, ge=1, le=1024, description="gRPC handler threads: calls decoded and waiting on the model at once"
    )
    max_concurrent_calls: int = Field(
        256,
        ge=1,
        description="calls accepted at once, running or waiting for a handler thread; more get RESOURCE_EXHAUSTED",
    )
    max_streams: int = Field(
        0,
        ge=0,
        description="streams open at once (ModelStreamInfer, health Watch, reflection), each holding a handler "
        "thread; more are refused with RESOURCE_EXHAUSTED; 0 = auto: a quarter of --workers, so that streams can "
        "never take the threads unary calls and health checks need",
    )
    stream_idle_s: float = Field(
        60.0,
        ge=0,
        description="a stream waiting longer than this for its next request is cancelled, seconds; 0 = never",
    )
    # ONNX Runtime.
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime device; auto uses CUDA when present"
    )
    precision: Precision = Field(
        "fp32", description="model variant to run: fp32, fp16 (for GPUs) or int8 (for CPUs), as exported"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads within an operator; 0 = its default")
    inter_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads across operators; 0 = its default")
    spinning: bool = Field(
        False,
        description="let ONNX Runtime's threads busy-wait for the next run; off leaves the cores to image decoding",
    )
    # Dynamic batching (serving/engine/batcher.py); the unit of a batch is a TTA view, one row of the graph's input.
    max_batch_views: int = Field(
        0,
        ge=0,
        description="largest ONNX Runtime batch, in views (an image with TTA is several); 0 = auto: 64 on CUDA, "
        "one image's views on CPUs, where bigger batches cost as much per view and hold every caller until the "
        "slowest (bench/serving.py)",
    )
    max_delay_us: int = Field(
        2000,
        ge=0,
        description="longest wait for more requests to fill a batch, microseconds; 0 runs what is queued at once",
    )
    model_instances: int = Field(
        2,
        ge=1,
        le=64,
        description="model runs at once, each on its own thread, sharing the weights and ONNX Runtime's threads: "
        "one run's serial moments are another's working time (bench/serving.py); 1 runs one batch at a time",
    )
    max_queue: int = Field(
        256, ge=1, description="images waiting for the model; when full, calls fail fast with RESOURCE_EXHAUSTED"
    )
    max_batch_images: int = Field(64, ge=1, description="images in one PredictBatch call")
    # Input limits.
    max_image_bytes: int = Field(20 * 2**20, ge=1024, description="largest encoded image accepted, bytes")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="largest decoded image accepted, width x height (decompression bombs)"
    )
    max_call_pixels: int = Field(
        200_000_000,
        ge=1,
        description="pixels one call may decode in all its images; images past it get INVALID_ARGUMENT",
    )
    decode_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="image decoding processes, each decoding one image at a time; 0 = auto: the CPUs this process "
        f"may use, {MIN_AUTO_DECODERS} to {MAX_AUTO_DECODERS}",
    )
    decode_worker_memory_mb: int = Field(
        1536,
        ge=128,
        description="address space each decoding process may use, MiB (a limit the kernel enforces); an image that "
        "needs more gets RESOURCE_EXHAUSTED",
    )
    decode_timeout_s: float = Field(
        10.0,
        gt=0,
        description="CPU time one image may take to decode, seconds, also for calls without a deadline; its "
        "decoding process is then killed and the image gets INVALID_ARGUMENT",
    )
    allowed_formats: tuple[str, ...] = Field(
        ",".join(DEFAULT_FORMATS),
        validate_default=True,
        min_length=1,
        description="image formats accepted, comma-separated Pillow format names; others get INVALID_ARGUMENT",
    )
    max_message_bytes: int = Field(
        64 * 2**20,
        ge=4096,
        description="largest request message, bytes; gRPC refuses larger ones with RESOURCE_EXHAUSTED",
    )
    max_json_bytes: int = Field(
        8 * 2**20,
        ge=4096,
        description="largest JSON part of an HTTP request, bytes (parsed, JSON takes several times its size), "
        "within --max-message-bytes; send images as binary tensor data, or base64 within it",
    )
    # Operations.
    http_port: int | None = Field(
        8000,
        ge=0,
        le=65535,
        description="the Open Inference Protocol's HTTP/REST port (/v2/...), with the page to try the model at /; "
        "0 picks a free one, off disables",
    )
    metrics_port: int | None = Field(
        9464, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one, off disables"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain for TLS; with --tls-key, else plaintext")
    tls_key: Path | None = Field(None, description="PEM private key for --tls-cert")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM file of the CA(s) whose client certificates are accepted; when set, every caller must "
        "present a certificate signed by it (mutual TLS); needs --tls-cert/--tls-key",
    )
    grace_s: float = Field(10.0, ge=0, description="on SIGTERM/SIGINT, seconds in-flight calls get to finish")
    drain_s: float = Field(
        0.0,
        ge=0,
        description="on SIGTERM/SIGINT, seconds to keep answering with health NOT_SERVING so load balancers move away first",
    )

    @field_validator("version_policy")
    @classmethod
    def _policy_parses(cls, value: str) -> str:
        try:
            parse_policies(value)
        except RepositoryError as e:
            raise ValueError(str(e)) from None
        return value

    @field_validator(
        "metrics_port",
        "http_port",
        "max_model_bytes",
        "bundle",
        "model_repository",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        mode="before",
    )
    @classmethod
    def _off_is_none(cls, value):
        return None if isinstance(value, str) and value.strip().lower() in OFF else value

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _format_names(cls, value):
        names = value.split(",") if isinstance(value, str) else value
        return tuple(str(n).strip().upper() for n in names if str(n).strip())

    @field_validator("allowed_formats")
    @classmethod
    def _formats_known(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        Image.init()
        unknown = [n for n in names if n not in Image.OPEN]
        if unknown:
            raise ValueError(
                f"unknown image format(s) {', '.join(unknown)}; Pillow knows {', '.join(sorted(Image.OPEN))}"
            )
        return names

    @field_validator("tls_cert", "tls_key", "tls_client_ca")
    @classmethod
    def _file_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path}: no such file")
        return path

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if (self.bundle is None) == (self.model_repository is None):
            raise ValueError(
                "give exactly one of bundle (one model) and model_repository (<model>/<version>/ folders, "
                f"switched live); got {'both' if self.bundle is not None else 'neither'}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both for TLS, or neither for plaintext")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "tls_client_ca needs tls_cert and tls_key: client certificates are checked only over TLS, "
                "so give the server its own certificate and key too, or drop tls_client_ca"
            )
        if self.max_batch_images > self.max_queue:
            raise ValueError(
                f"max_batch_images {self.max_batch_images} is more than max_queue {self.max_queue}: a PredictBatch call "
                "queues all its images at once, so a full one would always be refused; lower the first or raise the second"
            )
        if self.max_call_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_call_pixels {self.max_call_pixels} is less than max_image_pixels {self.max_image_pixels}: "
                "an image the server accepts could never be decoded; raise the first or lower the second"
            )
        if self.max_streams >= self.workers:
            raise ValueError(
                f"max_streams {self.max_streams} leaves none of the {self.workers} workers to unary calls and health "
                "checks: lower it below workers (0 picks a quarter of them)"
            )
        need = self.max_image_pixels * PEAK_BYTES_PER_PIXEL + DECODER_BASE_BYTES
        if self.decode_worker_memory_mb * 2**20 < need:
            raise ValueError(
                f"decode_worker_memory_mb {self.decode_worker_memory_mb} is too small for max_image_pixels "
                f"{self.max_image_pixels}: decoding one takes up to {PEAK_BYTES_PER_PIXEL} bytes a pixel plus "
                f"{DECODER_BASE_BYTES // 2**20} MiB, so {math.ceil(need / 2**20)} MiB; raise the first or lower the second"
            )
        if self.max_message_bytes <= self.max_image_bytes:
            raise ValueError(
                f"max_message_bytes {self.max_message_bytes} must exceed max_image_bytes {self.max_image_bytes} "
                "(the message carries the image and its envelope)"
            )
        return self


def max_streams(config: ServerConfig) -> int:
    """Streams open at once: max_streams, or its auto value when 0."""
    return config.max_streams or max(1, config.workers // 4)


def decoders(config: ServerConfig) -> int:
    """The number of decoding processes: decode_workers, or its auto value when 0."""
    if config.decode_workers:
        return config.decode_workers
    return max(MIN_AUTO_DECODERS, min(MAX_AUTO_DECODERS, usable_cpus()))


def batch_views(config: ServerConfig, views_per_image: int, cuda: bool) -> int:
    """The largest batch, in views, for a model whose calls bring `views_per_image` views (max_batch_views,
    or its auto value when 0)."""
    if config.max_batch_views:
        return config.max_batch_views
    return AUTO_CUDA_BATCH_VIEWS if cuda else views_per_image


# HTTP requests whose JSON is parsed at once (serving/protocols/http.py): parsing holds the GIL anyway,
# so more would add memory (README, "What a request may cost"), not speed.
JSON_PARSERS = 2


def json_limit(config: ServerConfig) -> int:
    """The most bytes of JSON an HTTP request may carry: --max-json-bytes, within --max-message-bytes."""
    return min(config.max_json_bytes, config.max_message_bytes)


# max_batch_views=0 on CUDA: a GPU runs 64 views in about the time of a few, so gathering calls pays.
AUTO_CUDA_BATCH_VIEWS = 64


def describe(name: str) -> str:
    """A field's help text with its default and environment variable, for `serving serve --help`."""
    field = ServerConfig.model_fields[name]
    env = f"env {ENV_PREFIX}{name.upper()}"
    if field.is_required():
        return f"{field.description} (required; {env})"
    default = "off" if field.default is None else field.default
    return f"{field.description} (default: {default}; {env})"


def load_config(flags: dict, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Defaults, overridden by SERVING_<NAME> variables (of `environ`, os.environ when None),
    overridden by flags that were given."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {
        name: env[f"{ENV_PREFIX}{name.upper()}"]
        for name in ServerConfig.model_fields
        if f"{ENV_PREFIX}{name.upper()}" in env
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if not {"bundle", "model_repository"} & set(values):
        raise ConfigError(
            "invalid configuration: bundle: Field required; give a bundle folder for one model, or "
            "model_repository for a folder of <model>/<version>/ bundles"
        )
    try:
        return ServerConfig.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'settings'}: {_message(err)}"
            + ("" if err["type"] == "missing" or not err["loc"] else f" (got {err.get('input')!r})")
            for err in e.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


def _message(err: ErrorDetails) -> str:
    # pydantic prefixes the messages of our own validators with "Value error, "; people need only ours.
    return err["msg"].removeprefix("Value error, ")
