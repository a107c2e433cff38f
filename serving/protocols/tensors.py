"""The Open Inference Protocol's tensors, as plain functions: a ModelInferRequest in, checked images
and options out; probabilities in, a ModelInferResponse out. No network; serving.protocols.inference
serves them. Errors are CallFailed (INVALID_ARGUMENT) saying what was wrong and how to send it.

A request is checked from what it declares (shape, datatype, element counts and length prefixes)
before any array is built or any element copied, so that what it costs is bounded by the server's
limits, not by how many bytes it sent.
"""

from __future__ import annotations

import struct
import time
from itertools import islice

import grpc
import numpy as np

from serving.engine.errors import CallFailed
from serving.engine.predict import top
from serving.gen.inference import grpc_service_pb2 as pb
from serving.protocols.echo import echo
from serving.repository.registry import ServedModel

INPUT = "IMAGE"
OUTPUT = "PROBABILITIES"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix
# PROBABILITIES at most once as probabilities and once as a classification: as Triton refuses an
# output requested twice, and the top k of a smaller k are the first k of the larger.
MAX_OUTPUTS = 2


def invalid(message: str) -> CallFailed:
    return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, message)


def split_bytes(raw: bytes, *, max_elements: int | None = None, max_element_bytes: int | None = None) -> list[bytes]:
    """The elements of a BYTES tensor in raw form: each a 4-byte little-endian length, then its bytes.
    The length prefixes are walked first, copying nothing: an element past `max_elements`, or one
    whose prefix says more than `max_element_bytes`, is refused there, and elements are copied out
    only once all of them are known to be well formed."""
    view = memoryview(raw)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(view):
        if max_elements is not None and len(spans) == max_elements:
            raise invalid(
                f"raw BYTES input: more elements than the {max_elements} declared (another begins at offset {i})"
            )
        if i + _LENGTH.size > len(view):
            raise invalid(
                f"raw BYTES input: {len(view) - i} bytes left at offset {i} where a 4-byte length was expected; "
                "each element is a 4-byte little-endian length followed by that many bytes"
            )
        (n,) = _LENGTH.unpack_from(view, i)
        if max_element_bytes is not None and n > max_element_bytes:
            raise invalid(
                f"raw BYTES input: element {len(spans)} says {n} bytes, over the limit of {max_element_bytes} "
                "bytes an element; send a smaller file"
            )
        i += _LENGTH.size
        if i + n > len(view):
            raise invalid(
                f"raw BYTES input: an element at offset {i - _LENGTH.size} says {n} bytes but only {len(view) - i} follow"
            )
        spans.append((i, i + n))
        i += n
    return [bytes(view[start:end]) for start, end in spans]


def join_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements in raw form (the inverse of split_bytes)."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def parameter(p: pb.InferParameter) -> bool | int | float | str | None:
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def read_images(
    request: pb.ModelInferRequest, input_size: int, max_images: int, max_image_bytes: int
) -> list[bytes] | np.ndarray:
    """The request's images: encoded files (BYTES) of at most `max_image_bytes` each, or uint8 pixels
    (batch, size, size, 3) (UINT8); at most `max_images` of either."""
    tensor = _the_input(request)
    if tensor.datatype not in ("BYTES", "UINT8"):
        raise invalid(
            f"input {INPUT} datatype {echo(tensor.datatype)} is not accepted: send BYTES (encoded image files) "
            "or UINT8 (RGB pixels at the model's input size)"
        )
    shape = _declared_shape(tensor, max_images)
    raw = _raw_contents(request, tensor)
    if tensor.datatype == "BYTES":
        return _encoded_files(tensor, shape, raw, max_image_bytes)
    return _pixels(tensor, shape, raw, input_size)


def _the_input(request: pb.ModelInferRequest) -> pb.ModelInferRequest.InferInputTensor:
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        names = ", ".join(echo(t.name) for t in islice(request.inputs, 3))
        raise invalid(f"expected one input named {INPUT!r}, got {len(request.inputs)} ({names}); see ModelMetadata")
    return request.inputs[0]


def _declared_shape(tensor: pb.ModelInferRequest.InferInputTensor, max_images: int) -> list[int]:
    """The input's shape, whose first dimension (the batch) is within the limit. Its length is checked
    before it is copied: a shape is a repeated field that a request can make millions long."""
    if not 1 <= len(tensor.shape) <= 4:
        raise invalid(
            f"input {INPUT} has {len(tensor.shape)} dimensions: BYTES images take shape [batch] or [batch, 1], "
            "UINT8 pixels [batch, size, size, 3]"
        )
    shape = list(tensor.shape)
    batch = shape[0]
    if batch < 1:
        raise invalid(f"input {INPUT} shape {shape}: the first dimension is the batch of images and must be at least 1")
    if batch > max_images:
        raise invalid(f"{batch} images in one request, over the limit of {max_images} (ModelConfig max_batch_size)")
    return shape


def _raw_contents(request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor) -> bytes | None:
    """The input's raw_input_contents entry, or None when it was sent in the typed `contents`."""
    entries = len(request.raw_input_contents)
    if entries > 1:
        raise invalid(f"{entries} raw_input_contents for 1 input; send one entry per input, or none")
    if not entries:
        return None
    if tensor.contents.ByteSize():
        raise invalid(f"input {INPUT} was sent both in raw_input_contents and in contents; send it in one of them")
    return request.raw_input_contents[0]


def _encoded_files(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: bytes | None, max_image_bytes: int
) -> list[bytes]:
    batch = shape[0]
    if shape not in ([batch], [batch, 1]):
        raise invalid(f"input {INPUT} shape {shape}: BYTES images take shape [batch] or [batch, 1]")
    if raw is not None:
        elements = split_bytes(raw, max_elements=batch, max_element_bytes=max_image_bytes)
        _expect_elements(shape, len(elements))
        return elements
    typed = tensor.contents.bytes_contents
    _expect_elements(shape, len(typed))  # counted before any element is copied
    elements = list(typed)
    for i, element in enumerate(elements):
        if len(element) > max_image_bytes:
            raise invalid(
                f"input {INPUT} element {i} is {len(element)} bytes, over the limit of {max_image_bytes}; "
                "send a smaller file"
            )
    return elements


def _expect_elements(shape: list[int], count: int) -> None:
    if count != shape[0]:
        raise invalid(f"input {INPUT} shape {shape} says {shape[0]} images but {count} elements were sent")


def _pixels(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: list[int], raw: bytes | None, input_size: int
) -> np.ndarray:
    want = [shape[0], input_size, input_size, 3]
    if shape != want:
        raise invalid(f"input {INPUT} shape {shape}: UINT8 pixels take shape {want} (RGB at the model's input size)")
    size = shape[0] * input_size * input_size * 3
    if raw is not None:
        if len(raw) != size:
            raise invalid(f"input {INPUT} shape {shape} needs {size} bytes of pixels, got {len(raw)}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(want)
    typed = tensor.contents.uint_contents
    if len(typed) != size:  # counted before any array is built: np.asarray would copy millions of values first
        raise invalid(f"input {INPUT} shape {shape} needs {size} values of pixels in uint_contents, got {len(typed)}")
    values = np.fromiter(typed, dtype=np.uint32, count=size)
    if values.max() > 255:
        raise invalid(f"input {INPUT}: UINT8 values must be 0-255, got {values.max()}")
    return values.astype(np.uint8).reshape(want)


def requested_outputs(request: pb.ModelInferRequest, classes: list[str], batch: int, max_bytes: int) -> list[int]:
    """For each requested output, in order: 0 for the probabilities, k for the top-k classification.
    Each form at most once, and refused when the response for `batch` images would pass `max_bytes`
    (the server's message limit), before anything is run or built."""
    if len(request.outputs) > MAX_OUTPUTS:
        raise invalid(
            f"{len(request.outputs)} outputs requested; ask for {OUTPUT} at most once as probabilities "
            "and once with the classification parameter"
        )
    ks = [_output_k(o, len(classes)) for o in request.outputs] or [0]
    if len(ks) == 2 and (ks[0] == 0) == (ks[1] == 0):
        form = "as probabilities" if ks[0] == 0 else f"with classification (k = {ks[0]} and {ks[1]})"
        raise invalid(
            f"output {OUTPUT} requested twice {form}; ask for it at most once as probabilities and once "
            "with classification k (the larger k: the top classes of a smaller k are its first)"
        )
    size = response_bytes(ks, batch, classes)
    if size > max_bytes:
        raise invalid(
            f"the response for {batch} images would be about {size} bytes, over the server's limit of {max_bytes}; "
            "send fewer images per request or ask for fewer classes"
        )
    return ks


def _output_k(output: pb.ModelInferRequest.InferRequestedOutputTensor, n_classes: int) -> int:
    if output.name != OUTPUT:
        raise invalid(f"unknown output {echo(output.name)}; this model's only output is {OUTPUT!r}")
    k = parameter(output.parameters["classification"]) if "classification" in output.parameters else 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise invalid(f"output {OUTPUT} parameter classification must be a non-negative integer, got {echo(k)}")
    return min(k, n_classes)


def response_bytes(ks: list[int], batch: int, classes: list[str]) -> int:
    """At most how many bytes the outputs `ks` take for `batch` images: 4 a class for probabilities;
    for a classification, k strings "probability:index:label" (at most "1.000000:<last index>:<longest
    label>") after their 4-byte lengths."""
    longest = _LENGTH.size + len(f"{1:f}:{len(classes) - 1}:") + max(len(c.encode()) for c in classes)
    return sum(batch * (4 * len(classes) if k == 0 else k * longest) for k in ks)


def request_tta(request: pb.ModelInferRequest) -> bool | None:
    if "tta" not in request.parameters:
        return None
    value = parameter(request.parameters["tta"])
    if not isinstance(value, bool):
        raise invalid(f"request parameter tta must be a bool, got {echo(value)}")
    return value


def request_deadline(request: pb.ModelInferRequest, grpc_deadline: float | None) -> float | None:
    """The sooner of the call's deadline and the `timeout` parameter (microseconds, from now; 0: none)."""
    if "timeout" not in request.parameters:
        return grpc_deadline
    timeout_us = parameter(request.parameters["timeout"])
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
        raise invalid(
            f"request parameter timeout must be a non-negative number of microseconds, got {echo(timeout_us)}"
        )
    if timeout_us == 0:
        return grpc_deadline
    own = time.monotonic() + timeout_us / 1e6
    return own if grpc_deadline is None else min(own, grpc_deadline)


def classifications(probabilities: np.ndarray, classes: list[str], k: int) -> list[bytes]:
    """Row-major "probability:index:label" strings, k per image, most probable first."""
    return [f"{p:f}:{i}:{classes[i]}".encode() for row in probabilities for i, p in top(row, k)]


def infer_response(
    model: ServedModel, request: pb.ModelInferRequest, probabilities: np.ndarray, ks: list[int], views: list[str]
) -> pb.ModelInferResponse:
    """The response for `probabilities` (batch, classes), one output per entry of `ks`; its
    parameters say which TTA `views` every image's probabilities were averaged over."""
    classes = model.session.manifest.classes
    batch = probabilities.shape[0]
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    response.parameters["tta"].bool_param = len(views) > 1
    response.parameters["tta_views"].string_param = ",".join(views)
    for k in ks:
        if k == 0:
            response.outputs.add(name=OUTPUT, datatype="FP32", shape=[batch, len(classes)])
            response.raw_output_contents.append(probabilities.astype("<f4").tobytes())
        else:
            response.outputs.add(name=OUTPUT, datatype="BYTES", shape=[batch, k])
            response.raw_output_contents.append(join_bytes(classifications(probabilities, classes, k)))
    return response
