"""The Open Inference Protocol's HTTP/REST forms, as plain functions: a request's JSON (and binary
tensor data, Triton's extension) in, the gRPC ModelInferRequest out; protobuf responses out as the
JSON Triton's HTTP clients read. No network; serving.protocols.http serves them. Errors are CallFailed
(INVALID_ARGUMENT) saying what was wrong, as serving.protocols.tensors' are.

Only the translation lives here. The request that comes out is checked, limited and answered by the
same code as a gRPC one (serving.protocols.tensors, serving.protocols.inference).

Binary tensor data: the body is the JSON request (`Inference-Header-Content-Length` bytes of it),
then the raw contents of each input whose parameters carry `binary_data_size`, in input order. An
output asked for with the parameter `binary_data` (or every output, with the request parameter
`binary_data_output`) comes back the same way. In JSON, BYTES elements are strings: UTF-8 text, or
base64 with the input parameter `content_type` = "base64" (an image file is not text).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from serving.gen.inference import grpc_service_pb2 as pb
from serving.protocols.echo import echo
from serving.protocols.tensors import invalid, join_bytes, parameter, split_bytes

HEADER_LENGTH = "inference-header-content-length"
# Parameters of the HTTP form only: they say where the data is, and never reach the model.
_BINARY_SIZE = "binary_data_size"
_BINARY_OUTPUT = "binary_data_output"
_BINARY = "binary_data"
_CONTENT_TYPE = "content_type"


@dataclass
class InferCall:
    """An infer request translated: the gRPC message, and for each output the response will hold
    (in order: the requested ones, else the one default output), whether it goes in binary form."""

    request: pb.ModelInferRequest
    binary: list[bool] = field(default_factory=list)


def show(value: Any) -> str:
    """A JSON value quoted in a message: cut short as echo cuts strings, and a list or object only named."""
    if isinstance(value, list | dict):
        return f"a JSON {'list' if isinstance(value, list) else 'object'} of {len(value)}"
    return echo(value)


def parse_json(text: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(text))
    except RecursionError:
        raise invalid(f"{what}: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise invalid(f"{what} is not valid JSON: {show(str(e))}") from None


def infer_request(
    body: bytes, header_length: str | None, *, model: str, version: str, max_json_bytes: int
) -> InferCall:
    """The ModelInferRequest for an HTTP infer `body`. `header_length`: the Inference-Header-Content-
    Length header (None: the whole body is JSON). JSON longer than `max_json_bytes` is refused before
    it is parsed: parsed, it takes several times its size."""
    view = memoryview(body)
    if header_length is None:
        json_end = len(view)
    else:
        if not header_length.strip().isdigit():
            raise invalid(f"Inference-Header-Content-Length must be a byte count, got {show(header_length)}")
        json_end = int(header_length)
        if json_end > len(view):
            raise invalid(
                f"Inference-Header-Content-Length says {json_end} bytes of JSON, but the body has {len(view)}"
            )
    if json_end > max_json_bytes:
        raise invalid(
            f"the request's JSON is {json_end} bytes, over the limit of {max_json_bytes} (--max-json-bytes); "
            "send images as binary tensor data (tritonclient.http does by default) or fewer per request"
        )
    doc = parse_json(view[:json_end], "the infer request")
    if not isinstance(doc, dict):
        raise invalid("the infer request must be a JSON object with `inputs`")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=_text(doc.get("id", ""), "id"))
    parameters = _object(doc.get("parameters", {}), "parameters")
    binary_output = parameters.pop(_BINARY_OUTPUT, False) is True
    _set_parameters(request.parameters, parameters, "request parameter")
    binary = view[json_end:]
    offset = 0
    for i, tensor in enumerate(_array(doc.get("inputs"), "inputs")):
        offset += _add_input(request, _object(tensor, f"inputs[{i}]"), binary[offset:], i)
    if offset != len(binary):
        raise invalid(
            f"{len(binary) - offset} bytes follow the JSON and the inputs' binary_data_size; "
            "each input's binary_data_size must count its bytes exactly"
        )
    call = InferCall(request)
    outputs = _array(doc.get("outputs", []), "outputs")
    for i, output in enumerate(outputs):
        o = _object(output, f"outputs[{i}]")
        p = _object(o.get("parameters", {}), f"outputs[{i}].parameters")
        call.binary.append(p.pop(_BINARY, binary_output) is True)
        added = request.outputs.add(name=_text(o.get("name", ""), f"outputs[{i}].name"))
        _set_parameters(added.parameters, p, f"outputs[{i}] parameter")
    if not outputs:
        call.binary.append(binary_output)
    return call


def _add_input(request: pb.ModelInferRequest, tensor: dict, binary: memoryview, i: int) -> int:
    """Add the input `tensor` to `request`; returns how many bytes of `binary` it took."""
    where = f"inputs[{i}]"
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise invalid(f"{where}.shape must be a list of integers, got {show(shape)}")
    if len(shape) > 8:
        raise invalid(f"{where}.shape has {len(shape)} dimensions; IMAGE takes at most 4")
    added = request.inputs.add(
        name=_text(tensor.get("name", ""), f"{where}.name"),
        datatype=_text(tensor.get("datatype", ""), f"{where}.datatype"),
        shape=shape,
    )
    p = _object(tensor.get("parameters", {}), f"{where}.parameters")
    size = p.pop(_BINARY_SIZE, None)
    content_type = p.pop(_CONTENT_TYPE, None)
    _set_parameters(added.parameters, p, f"{where} parameter")
    if size is not None:
        if "data" in tensor:
            raise invalid(f"{where} has both data and binary_data_size; send it in one of them")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise invalid(
                f"{where}.parameters.binary_data_size {show(size)} is not a byte count within the "
                f"{len(binary)} bytes left after the JSON"
            )
        request.raw_input_contents.append(bytes(binary[:size]))
        return size
    if "data" not in tensor:
        raise invalid(f"{where} has no data: give `data`, or binary_data_size with the bytes after the JSON")
    raw = _json_data(added.datatype, tensor["data"], content_type, where)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return 0


def _json_data(datatype: str, data: Any, content_type: Any, where: str) -> bytes | None:
    """A JSON tensor's data in raw form, for the datatypes IMAGE takes; None for any other, which
    serving.protocols.tensors refuses by its datatype."""
    if datatype == "BYTES":
        if content_type not in (None, "base64", "str"):
            raise invalid(f'{where}.parameters.content_type must be "base64" or "str", got {show(content_type)}')
        elements = []
        for j, element in enumerate(_flat(data)):
            if not isinstance(element, str):
                raise invalid(f"{where}.data[{j}]: BYTES elements are JSON strings, got {show(element)}")
            if content_type == "base64":
                try:
                    elements.append(base64.b64decode(element, validate=True))
                except (binascii.Error, ValueError):
                    raise invalid(f"{where}.data[{j}] is not valid base64") from None
            else:
                elements.append(element.encode())
        return join_bytes(elements)
    if datatype == "UINT8":
        values = list(_flat(data))
        try:
            return bytes(bytearray(values))
        except (TypeError, ValueError):
            bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255), None)
            raise invalid(f"{where}.data: UINT8 values are integers 0-255, got {show(bad)}") from None
    return None


def _flat(data: Any) -> Iterator[Any]:
    """The elements of a JSON tensor's data, flat or nested in row-major lists, in order."""
    if not isinstance(data, list):
        raise invalid(f"tensor data must be a JSON list, got {show(data)}")
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _set_parameters(target: Any, values: dict, where: str) -> None:
    for key, value in values.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise invalid(f"{where} {show(key)} must be a bool, number or string, got {show(value)}")


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object, got {show(value)}")
    return dict(value)


def _array(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise invalid(f"{what} must be a JSON list, got {show(value)}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{what} must be a string, got {show(value)}")
    return value


def infer_response(response: pb.ModelInferResponse, binary: list[bool]) -> tuple[bytes, int | None]:
    """The HTTP body for `response`, and the length of its JSON part when binary outputs follow it
    (None when the body is all JSON). `binary`: for each output, whether it goes in binary form."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = {key: parameter(p) for key, p in response.parameters.items()}
    outputs, blobs = [], []
    for output, raw, as_binary in zip(response.outputs, response.raw_output_contents, binary, strict=True):
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if as_binary:
            entry["parameters"] = {_BINARY_SIZE: len(raw)}
            blobs.append(raw)
        elif output.datatype == "BYTES":
            entry["data"] = [e.decode() for e in split_bytes(raw)]
        else:
            entry["data"] = np.frombuffer(raw, dtype="<f4").tolist()
        outputs.append(entry)
    doc["outputs"] = outputs
    head = json.dumps(doc).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def as_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: field names as declared, integers as
    numbers (protobuf's own JSON writes 64-bit ones as strings, which clients then index images
    with), enums by name, every scalar and list (zeros included, which clients read without
    checking), and of the message fields only those set."""
    out = {}
    for f in message.DESCRIPTOR.fields:
        unset_message = f.message_type is not None and not f.is_repeated and not message.HasField(f.name)
        if unset_message or (f.containing_oneof is not None and not message.HasField(f.name)):
            continue
        out[f.name] = _field(f, getattr(message, f.name))
    return out


def _field(f: FieldDescriptor, value: Any) -> Any:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        value_field = f.message_type.fields_by_name["value"]
        return {key: _scalar(value_field, v) for key, v in value.items()}
    if f.is_repeated:
        return [_scalar(f, v) for v in value]
    return _scalar(f, value)


def _scalar(f: FieldDescriptor, value: Any) -> Any:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return as_json(value)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return f.enum_type.values_by_number[value].name
    if f.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value
