"""Server configuration: one pydantic model, filled from defaults, SERVING_* variables and flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "SERVING_"


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the setting."""


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: Path = Field(description="bundle folder written by `trainer export` (model.onnx + manifest.json)")
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 or [::] for all interfaces")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    workers: int = Field(8, ge=1, le=256, description="gRPC handler threads (concurrent calls in progress)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime device; auto uses CUDA when present")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads within an operator; 0 = its default")
    inter_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads across operators; 0 = its default")
    max_image_bytes: int = Field(20 * 2**20, ge=1024, description="largest encoded image accepted, bytes")
    max_image_pixels: int = Field(50_000_000, ge=1, description="largest decoded image accepted, width x height")
    grace_s: float = Field(10.0, ge=0, description="on SIGTERM/SIGINT, seconds in-flight calls get to finish")


def describe(name: str) -> str:
    field = ServerConfig.model_fields[name]
    default = "" if field.is_required() else f" (default: {field.default}; env {ENV_PREFIX}{name.upper()})"
    return f"{field.description}{default}"


def load_config(flags: dict, environ: dict[str, str] | None = None) -> ServerConfig:
    """Defaults, overridden by SERVING_<NAME> variables, overridden by flags that were given."""
    environ = os.environ if environ is None else environ
    values = {
        name: environ[f"{ENV_PREFIX}{name.upper()}"]
        for name in ServerConfig.model_fields
        if f"{ENV_PREFIX}{name.upper()}" in environ
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return ServerConfig.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
            + ("" if err["type"] == "missing" else f" (got {err.get('input')!r})")
            for err in e.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
