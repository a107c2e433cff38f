"""The Open Inference Protocol's HTTP/REST binding on a real server on loopback, called through
tritonclient.http from PyPI, plain HTTP (as curl sends it) and Triton's image-client flow over both
bindings; every answer compared with our own Predict's."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import tracemalloc
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.model_config_pb2 as mc
import tritonclient.http as triton_http
from conftest import server_config
from PIL import Image
from test_serving_oip import CLASSES, IMAGES, SIZE
from test_serving_server import scrape
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from serving.client import Client
from serving.engine.errors import CallFailed
from serving.protocols.rest import infer_request
from serving.server import Server

MB = 2**20


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with Server(server_config(tiny_bundle, metrics_port=0, http_port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def hc(server):
    c = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def predict(server):
    """Our own Predict's probabilities for an encoded image."""
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield lambda image: np.array(c.predict(image).probabilities)


def pixels(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")  # lossless: Predict decodes exactly these pixels
    return buf.getvalue()


def files_input(images: list[bytes], *, binary: bool = True) -> triton_http.InferInput:
    tensor = triton_http.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1), binary_data=binary)
    return tensor


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A request as curl sends it; the status, headers and body of the answer, errors included."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}", data=body, headers=headers or {}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}{path}", timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class TestHealthAndMetadata:
    def test_live_and_ready(self, hc):
        assert hc.is_server_live() and hc.is_server_ready()

    @pytest.mark.parametrize(
        ("name", "version", "ready"),
        [("colours", "", True), ("colours", "1", True), ("colours", "7", False), ("no_such_model", "", False)],
    )
    def test_model_ready(self, hc, name, version, ready):
        assert hc.is_model_ready(name, version) is ready

    def test_server_metadata(self, hc):
        meta = hc.get_server_metadata()
        assert meta["name"] == "lesson2-classifier" and "binary_tensor_data" in meta["extensions"]

    def test_model_metadata_has_integer_shapes(self, hc):
        meta = hc.get_model_metadata("colours")
        assert (meta["name"], meta["versions"], meta["platform"]) == ("colours", ["1"], "onnxruntime_onnx")
        assert meta["inputs"] == [{"name": "IMAGE", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}]
        assert meta["outputs"] == [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, len(CLASSES)]}]

    def test_model_config_as_triton_writes_it(self, hc, server):
        c = hc.get_model_config("colours")
        assert c["max_batch_size"] == server.config.max_batch_images
        (image,) = c["input"]
        assert (image["data_type"], image["format"], image["dims"]) == ("TYPE_UINT8", "FORMAT_NHWC", [SIZE, SIZE, 3])
        assert json.loads(c["parameters"]["classes"]["string_value"]) == CLASSES

    def test_statistics_count_both_bindings(self, hc, server, predict):
        before = hc.get_inference_statistics("colours")["model_stats"][0]["inference_count"]
        predict(IMAGES[0])
        hc.infer("colours", [files_input(IMAGES[:2])])
        (stats,) = hc.get_inference_statistics("colours")["model_stats"]
        assert stats["inference_count"] == before + 3 and stats["inference_stats"]["fail"]["count"] >= 0

    def test_repository_index(self, hc):
        assert hc.get_model_repository_index() == [{"name": "colours", "version": "1", "state": "READY", "reason": ""}]

    @pytest.mark.parametrize("call", ["get_model_metadata", "get_model_config"])
    def test_an_unknown_model_is_404_in_tritons_words(self, hc, call):
        with pytest.raises(InferenceServerException) as err:
            getattr(hc, call)("no_such_model")
        assert err.value.status() == "404" and "Request for unknown model: 'no_such_model'" in err.value.message()


class TestInfer:
    @pytest.mark.parametrize("binary", [True, False], ids=["binary output", "JSON output"])
    def test_encoded_files_equal_predict(self, hc, predict, binary):
        out = triton_http.InferRequestedOutput("PROBABILITIES", binary_data=binary)
        result = hc.infer("colours", [files_input(IMAGES)], outputs=[out])
        probs = result.as_numpy("PROBABILITIES")
        assert probs.dtype == np.float32 and probs.shape == (len(IMAGES), len(CLASSES))
        for row, image in zip(probs, IMAGES, strict=True):
            np.testing.assert_allclose(row, predict(image), atol=1e-6, rtol=0)
        response = result.get_response()
        assert (response["model_name"], response["model_version"]) == ("colours", "1")
        assert response["parameters"] == {"tta": True, "tta_views": "center,hflip,zoom,zoom_hflip"}

    @pytest.mark.parametrize("binary", [True, False], ids=["binary", "JSON"])
    def test_uint8_nhwc_pixels_equal_predict_of_the_same_pixels(self, hc, predict, binary):
        batch = np.stack([pixels(1), pixels(2)])
        tensor = triton_http.InferInput("IMAGE", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        probs = hc.infer("colours", [tensor]).as_numpy("PROBABILITIES")
        for row, a in zip(probs, batch, strict=True):
            np.testing.assert_allclose(row, predict(png(a)), atol=1e-6, rtol=0)

    @pytest.mark.parametrize("binary", [True, False], ids=["binary", "JSON"])
    def test_classification(self, hc, predict, binary):
        out = triton_http.InferRequestedOutput("PROBABILITIES", binary_data=binary, class_count=2)
        labels = hc.infer("colours", [files_input(IMAGES[:1])], outputs=[out]).as_numpy("PROBABILITIES")
        probs = predict(IMAGES[0])
        order = np.argsort(-probs, kind="stable")
        assert [e.decode() if isinstance(e, bytes) else e for e in labels[0]] == [
            f"{probs[i]:f}:{i}:{CLASSES[i]}" for i in order
        ]

    def test_tta_off_by_parameter(self, hc):
        result = hc.infer("colours", [files_input(IMAGES[:1])], parameters={"tta": False})
        assert result.get_response()["parameters"] == {"tta": False, "tta_views": "center"}

    def test_json_base64_as_curl_sends_it(self, server, predict):
        """The README's curl example: the whole request in JSON, the file in base64."""
        request = {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"content_type": "base64"},
                    "data": [base64.b64encode(IMAGES[0]).decode()],
                }
            ],
            "outputs": [{"name": "PROBABILITIES"}],
        }
        status, headers, body = post(
            server, "/v2/models/colours/infer", json.dumps(request).encode(), {"Content-Type": "application/json"}
        )
        assert status == 200 and headers["content-type"] == "application/json"
        (output,) = json.loads(body)["outputs"]
        assert output["shape"] == [1, len(CLASSES)]
        np.testing.assert_allclose(output["data"], predict(IMAGES[0]), atol=1e-6, rtol=0)

    def test_a_bad_image_is_400_naming_the_element(self, hc):
        with pytest.raises(InferenceServerException) as err:
            hc.infer("colours", [files_input([IMAGES[0], b"not an image"])])
        assert err.value.status() == "400" and "input IMAGE element 1" in err.value.message()

    def test_calls_are_counted_in_the_shared_metrics(self, hc, server):
        hc.infer("colours", [files_input(IMAGES[:1])])
        samples = scrape(server.metrics_port)
        assert samples[("classifier_requests_total", (("code", "OK"), ("method", "ModelInfer")))] >= 1
        assert samples[("classifier_http_requests_total", (("method", "ModelInfer"), ("status", "200")))] >= 1


def image_client_flow(metadata, config, image: Image.Image, infer) -> list[str]:
    """What Triton's example image clients (image_client.py, grpc_image_client.py) do, written here
    from their documented behaviour: check the model's metadata and configuration as they check them,
    resize the image to the input's height and width, cast it to the input's datatype with no
    scaling, and ask for the top classes. `metadata`, `config`: as the client library returns them
    (dicts over HTTP, messages over gRPC); `infer(input name, array, output name)` runs the call."""

    def field(x, name):
        return x[name] if isinstance(x, dict) else getattr(x, name)

    inputs, outputs = field(metadata, "inputs"), field(metadata, "outputs")
    assert len(inputs) == 1, f"expecting 1 input, got {len(inputs)}"
    assert len(outputs) == 1, f"expecting 1 output, got {len(outputs)}"
    assert len(field(config, "input")) == 1
    image_input, output = inputs[0], outputs[0]
    assert field(output, "datatype") == "FP32"
    batching = field(config, "max_batch_size") > 0
    non_one = [d for d in list(field(output, "shape"))[1 if batching else 0 :] if d > 1]
    assert len(non_one) <= 1, "expecting the model output to be a vector"
    shape = list(field(image_input, "shape"))
    assert len(shape) == 3 + batching, f"expecting input to have {3 + batching} dimensions, model has {len(shape)}"
    fmt = field(field(config, "input")[0], "format")
    fmt = mc.ModelInput.Format.Value(fmt) if isinstance(fmt, str) else fmt
    assert fmt in (mc.ModelInput.FORMAT_NHWC, mc.ModelInput.FORMAT_NCHW), f"unexpected input format {fmt}"
    if fmt == mc.ModelInput.FORMAT_NHWC:
        h, w, c = shape[-3:]
    else:
        c, h, w = shape[-3:]
    assert c == 3
    a = np.array(image.convert("RGB").resize((w, h), Image.BILINEAR))
    a = a.astype(triton_to_np_dtype(field(image_input, "datatype")))
    if fmt == mc.ModelInput.FORMAT_NCHW:
        a = np.transpose(a, (2, 0, 1))
    batch = a[np.newaxis] if batching else a
    labels = infer(field(image_input, "name"), batch, field(output, "name"))
    return [e.decode() if isinstance(e, bytes) else e for e in np.asarray(labels).reshape(-1)]


class TestTritonImageClient:
    @pytest.mark.parametrize("binding", ["http", "grpc"])
    def test_its_checks_pass_and_its_answer_equals_predict(self, server, predict, binding):
        photo = Image.open(io.BytesIO(IMAGES[2]))
        if binding == "http":
            c = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
            metadata, cfg = c.get_model_metadata("colours"), c.get_model_config("colours")
            lib = triton_http
        else:
            c = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.port}")
            metadata, cfg = c.get_model_metadata("colours"), c.get_model_config("colours").config
            lib = triton_grpc

        def infer(name, batch, output):
            tensor = lib.InferInput(name, list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            wanted = lib.InferRequestedOutput(output, class_count=len(CLASSES))
            return c.infer("colours", [tensor], outputs=[wanted]).as_numpy(output)

        try:
            labels = image_client_flow(metadata, cfg, photo, infer)
        finally:
            c.close()
        resized = np.array(photo.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
        probs = predict(png(resized))
        assert labels == [f"{probs[i]:f}:{i}:{CLASSES[i]}" for i in np.argsort(-probs, kind="stable")]


class TestBounds:
    def test_a_body_over_the_message_limit_is_413_before_it_is_read(self, server):
        limit = server.config.max_message_bytes
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        try:
            connection.putrequest("POST", "/v2/models/colours/infer")
            connection.putheader("Content-Length", str(limit + 1))
            connection.endheaders()  # no body sent: the answer comes from the header alone
            response = connection.getresponse()
            assert response.status == 413 and b"--max-message-bytes" in response.read()
        finally:
            connection.close()

    @pytest.mark.parametrize(
        ("header", "body", "message"),
        [
            ("x", b"{}", "Inference-Header-Content-Length must be a byte count"),
            ("99", b"{}", "says 99 bytes of JSON, but the body has 2"),
            (None, b"{not json", "the infer request is not valid JSON"),
            (None, b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
            (None, b'{"inputs": []}', "expected one input named 'IMAGE'"),
            ("14", b'{"inputs": []}\x00', "1 bytes follow the JSON"),
        ],
    )
    def test_malformed_requests_are_400_saying_what_is_wrong(self, server, header, body, message):
        headers = {} if header is None else {"Inference-Header-Content-Length": header}
        status, _, answer = post(server, "/v2/models/colours/infer", body, headers)
        assert status == 400 and message in json.loads(answer)["error"]

    def test_json_over_its_limit_is_refused_unparsed(self):
        body = b'{"inputs": [' + b"{}," * (3 * MB) + b"{}]}"
        tracemalloc.start()
        try:
            with pytest.raises(CallFailed) as err:
                infer_request(body, None, model="m", version="", max_json_bytes=MB)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "over the limit of 1048576 (--max-json-bytes)" in str(err.value) and peak < MB

    def test_compressed_bodies_are_refused(self, server):
        status, _, answer = post(server, "/v2/models/colours/infer", b"x", {"Content-Encoding": "gzip"})
        assert status == 400 and "compressed requests are not accepted" in json.loads(answer)["error"]

    @pytest.mark.parametrize(("path", "status"), [("/v2/nothing", 404), ("/v2/models/colours/infer", 405)])
    def test_unknown_paths_and_methods(self, server, path, status):
        assert get(server, path)[0] == status


class TestPage:
    def test_served_at_the_root_as_a_self_contained_page(self, server):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/", timeout=10) as r:
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert "default-src 'none'" in r.headers["content-security-policy"]
            assert b"<html" in r.read()


def test_http_readiness_follows_grpc_health_through_a_drain(tiny_bundle):
    srv = Server(server_config(tiny_bundle, http_port=0), load=False)
    try:
        url = f"http://127.0.0.1:{srv.http_port}"
        assert get(srv, "/v2/health/live")[0] == 200
        assert get(srv, "/v2/health/ready")[0] == 503  # loading
        srv.load()
        assert get(srv, "/v2/health/ready")[0] == 200 and get(srv, "/v2/models/colours/ready")[0] == 200
        srv.drain()
        assert get(srv, "/v2/health/ready")[0] == 503 and get(srv, "/v2/models/colours/ready")[0] == 503
        assert get(srv, "/v2/health/live")[0] == 200
    finally:
        srv.stop(0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/v2/health/live", timeout=5)


def test_connections_send_without_waiting_for_acks(server):
    """Nagle's algorithm off on the server's side of each connection: with it on, a response's body
    waited for the client's delayed ACK of its headers, 40 ms on every call but a connection's first
    (bench/serving.py showed it)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        connection.request("GET", "/v2/health/live")
        connection.getresponse().read()
        (ours,) = [
            c.transport.get_extra_info("socket")
            for c in server.http.server.server_state.connections
            if c.transport.get_extra_info("peername") == connection.sock.getsockname()
        ]
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        connection.close()


def test_http_off_binds_nothing(tiny_bundle):
    with Server(server_config(tiny_bundle, http_port=None)) as srv:
        assert srv.http_port is None


def test_a_port_in_use_is_a_clear_error(tiny_bundle, server):
    with pytest.raises(OSError, match=f"cannot serve HTTP on 127.0.0.1:{server.http_port}.*--http-port"):
        Server(server_config(tiny_bundle, http_port=server.http_port))
