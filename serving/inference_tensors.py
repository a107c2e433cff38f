"""The Open Inference Protocol's tensors, as plain functions: a ModelInferRequest in, checked images
and options out; probabilities in, a ModelInferResponse out. No network; serving.inference_protocol
serves them. Errors are CallFailed (INVALID_ARGUMENT) saying what was wrong and how to send it.
"""

from __future__ import annotations

import struct
import time

import grpc
import numpy as np

from serving.admission import CallFailed
from serving.gen.inference import grpc_service_pb2 as pb
from serving.models import ServedModel
from serving.predict import top

INPUT = "IMAGE"
OUTPUT = "PROBABILITIES"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


def invalid(message: str) -> CallFailed:
    return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, message)


def split_bytes(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in raw form: each a 4-byte little-endian length, then its bytes."""
    elements, i = [], 0
    while i < len(raw):
        if i + _LENGTH.size > len(raw):
            raise invalid(
                f"raw BYTES input: {len(raw) - i} bytes left at offset {i} where a 4-byte length was expected; "
                "each element is a 4-byte little-endian length followed by that many bytes"
            )
        (n,) = _LENGTH.unpack_from(raw, i)
        i += _LENGTH.size
        if i + n > len(raw):
            raise invalid(
                f"raw BYTES input: an element at offset {i - _LENGTH.size} says {n} bytes but only {len(raw) - i} follow"
            )
        elements.append(raw[i : i + n])
        i += n
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements in raw form (the inverse of split_bytes)."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def parameter(p: pb.InferParameter) -> bool | int | float | str | None:
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def read_images(request: pb.ModelInferRequest, input_size: int, max_images: int) -> list[bytes] | np.ndarray:
    """The request's images: encoded files (BYTES), or uint8 pixels (batch, size, size, 3) (UINT8)."""
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        names = [t.name for t in request.inputs]
        raise invalid(f"expected one input named {INPUT!r}, got {names}; see ModelMetadata")
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    raw = list(request.raw_input_contents)
    if len(raw) > 1:
        raise invalid(f"{len(raw)} raw_input_contents for 1 input; send one entry per input, or none")
    batch = shape[0] if shape else 0
    if batch < 1:
        raise invalid(f"input {INPUT} shape {shape}: the first dimension is the batch of images and must be at least 1")
    if batch > max_images:
        raise invalid(f"{batch} images in one request, over the limit of {max_images} (ModelConfig max_batch_size)")
    if tensor.datatype == "BYTES":
        if shape not in ([batch], [batch, 1]):
            raise invalid(f"input {INPUT} shape {shape}: BYTES images take shape [batch] or [batch, 1]")
        elements = split_bytes(raw[0]) if raw else list(tensor.contents.bytes_contents)
        if len(elements) != batch:
            raise invalid(f"input {INPUT} shape {shape} says {batch} images but {len(elements)} elements were sent")
        return elements
    if tensor.datatype == "UINT8":
        want = [batch, input_size, input_size, 3]
        if shape != want:
            raise invalid(
                f"input {INPUT} shape {shape}: UINT8 pixels take shape {want} (RGB at the model's input size)"
            )
        if raw:
            data = np.frombuffer(raw[0], dtype=np.uint8)
        else:
            values = np.asarray(tensor.contents.uint_contents, dtype=np.uint32)
            if values.size and values.max() > 255:
                raise invalid(f"input {INPUT}: UINT8 values must be 0-255, got {values.max()}")
            data = values.astype(np.uint8)
        if data.size != np.prod(want):
            raise invalid(f"input {INPUT} shape {shape} needs {np.prod(want)} bytes of pixels, got {data.size}")
        return data.reshape(want)
    raise invalid(
        f"input {INPUT} datatype {tensor.datatype!r} is not accepted: send BYTES (encoded image files) "
        "or UINT8 (RGB pixels at the model's input size)"
    )


def requested_outputs(request: pb.ModelInferRequest, n_classes: int) -> list[int]:
    """For each requested output, in order: 0 for the probabilities, k for the top-k classification."""
    if not request.outputs:
        return [0]
    ks = []
    for o in request.outputs:
        if o.name != OUTPUT:
            raise invalid(f"unknown output {o.name!r}; this model's only output is {OUTPUT!r}")
        k = parameter(o.parameters["classification"]) if "classification" in o.parameters else 0
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise invalid(f"output {OUTPUT} parameter classification must be a non-negative integer, got {k!r}")
        ks.append(min(k, n_classes))
    return ks


def request_tta(request: pb.ModelInferRequest) -> bool | None:
    if "tta" not in request.parameters:
        return None
    value = parameter(request.parameters["tta"])
    if not isinstance(value, bool):
        raise invalid(f"request parameter tta must be a bool, got {value!r}")
    return value


def request_deadline(request: pb.ModelInferRequest, grpc_deadline: float | None) -> float | None:
    """The sooner of the call's deadline and the `timeout` parameter (microseconds, from now; 0: none)."""
    if "timeout" not in request.parameters:
        return grpc_deadline
    timeout_us = parameter(request.parameters["timeout"])
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
        raise invalid(f"request parameter timeout must be a non-negative number of microseconds, got {timeout_us!r}")
    if timeout_us == 0:
        return grpc_deadline
    own = time.monotonic() + timeout_us / 1e6
    return own if grpc_deadline is None else min(own, grpc_deadline)


def classifications(probabilities: np.ndarray, classes: list[str], k: int) -> list[bytes]:
    """Row-major "probability:index:label" strings, k per image, most probable first."""
    return [f"{p:f}:{i}:{classes[i]}".encode() for row in probabilities for i, p in top(row, k)]


def infer_response(
    model: ServedModel, request: pb.ModelInferRequest, probabilities: np.ndarray, ks: list[int]
) -> pb.ModelInferResponse:
    """The response for `probabilities` (batch, classes), one output per entry of `ks`."""
    classes = model.session.manifest.classes
    batch = probabilities.shape[0]
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    for k in ks:
        if k == 0:
            response.outputs.add(name=OUTPUT, datatype="FP32", shape=[batch, len(classes)])
            response.raw_output_contents.append(probabilities.astype("<f4").tobytes())
        else:
            response.outputs.add(name=OUTPUT, datatype="BYTES", shape=[batch, k])
            response.raw_output_contents.append(join_bytes(classifications(probabilities, classes, k)))
    return response
