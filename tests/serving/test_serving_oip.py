"""The Open Inference Protocol (inference.GRPCInferenceService) on a real server on loopback, called
through tritonclient from PyPI (nothing of ours on the client side), compared with our own Predict."""

from __future__ import annotations

import io
import json
import queue
import shutil
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import server_config
from PIL import Image
from test_serving_server import GatedSession, wait_until
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from serving.bundle.session import ModelSession
from serving.client import Client
from serving.config import ServerConfig
from serving.engine.errors import CallFailed
from serving.gen.inference import grpc_service_pb2 as ours
from serving.protocols.tensors import (
    classifications,
    join_bytes,
    read_images,
    requested_outputs,
    response_bytes,
    split_bytes,
)
from serving.server import Server

CLASSES = ["blue", "red"]  # the tiny bundle's, in output order
SIZE = 32  # the tiny bundle's input size, px
MAX_IMAGE_BYTES = ServerConfig.model_fields["max_image_bytes"].default
MB = 2**20
LONG = "x" * 20_000  # a request field far longer than a status message may be


def jpeg(rgb=(200, 50, 40), size=(40, 30), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(rgb) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


IMAGES = [jpeg(seed=1), jpeg((40, 60, 200), seed=2), jpeg(size=(17, 90), seed=3)]


def image_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    return tensor


def status(err: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(err.value.status())


def infer_request(datatype: str, shape: list[int], pb=ours):
    """A ModelInferRequest for colours with one IMAGE input and nothing in it yet; `pb`: whose stubs."""
    request = pb.ModelInferRequest(model_name="colours")
    request.inputs.add(name="IMAGE", datatype=datatype, shape=shape)
    return request


def refusal(server, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    """The error ModelInfer answers `request` with."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return err.value


def refused_within(max_bytes: int, call, *args, **kwargs) -> str:
    """The message of the CallFailed that call(*args, **kwargs) raises, once checked that Python held at most
    `max_bytes` more at any moment before it (tracemalloc's peak): refused before anything was built."""
    tracemalloc.start()
    try:
        with pytest.raises(CallFailed) as err:
            call(*args, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max_bytes, f"{peak / MB:.1f} MB allocated before the refusal"
    return str(err.value)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with Server(server_config(tiny_bundle, metrics_port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def tc(server):
    with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture(scope="module")
def predicted(server):
    """Our own Predict's probabilities for each of IMAGES."""
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        return [np.array(c.predict(image).probabilities) for image in IMAGES]


def statistics(tc) -> service_pb2.ModelStatistics:
    (stats,) = tc.get_inference_statistics("colours").model_stats
    return stats


class TestWireCompatibility:
    """Every message, field, enum and method we declare is tritonclient's, by name, number and type."""

    @staticmethod
    def theirs(full_name: str):
        for file in (service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
            try:
                return file.pool.FindMessageTypeByName(full_name)
            except KeyError:
                continue
        raise AssertionError(f"tritonclient declares no message {full_name}")

    def compare(self, mine, theirs) -> int:
        compared = 0
        for field in mine.fields:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{mine.full_name}.{field.name} is not in tritonclient's {theirs.full_name}"
            where = f"{mine.full_name}.{field.name}"
            assert field.number == other.number, where
            assert field.type == other.type, where
            assert field.is_repeated == other.is_repeated, where
            assert (field.message_type and field.message_type.full_name) == (
                other.message_type and other.message_type.full_name
            ), where
            assert (field.enum_type and field.enum_type.full_name) == (other.enum_type and other.enum_type.full_name), (
                where
            )
            assert (field.containing_oneof and field.containing_oneof.name) == (
                other.containing_oneof and other.containing_oneof.name
            ), where
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                compared += self.compare(field.message_type, other.message_type)
            compared += 1
        for nested in mine.nested_types:
            compared += self.compare(nested, theirs.nested_types_by_name[nested.name])
        for enum in mine.enum_types:
            self.compare_enum(enum, theirs.enum_types_by_name[enum.name])
        return compared

    @staticmethod
    def compare_enum(mine, theirs) -> None:
        assert {v.name: v.number for v in mine.values}.items() <= {v.name: v.number for v in theirs.values}.items()

    def test_every_message_we_declare(self):
        assert ours.DESCRIPTOR.package == "inference"
        compared = sum(
            self.compare(m, self.theirs(m.full_name)) for m in ours.DESCRIPTOR.message_types_by_name.values()
        )
        assert compared > 100  # the walk reached the fields
        for enum in ours.DESCRIPTOR.enum_types_by_name.values():
            self.compare_enum(enum, model_config_pb2.DESCRIPTOR.enum_types_by_name[enum.name])

    def test_every_method_we_declare(self):
        (mine,) = ours.DESCRIPTOR.services_by_name.values()
        theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        assert mine.full_name == theirs.full_name == "inference.GRPCInferenceService"
        for method in mine.methods:
            other = theirs.methods_by_name[method.name]
            assert method.input_type.full_name == other.input_type.full_name, method.name
            assert method.output_type.full_name == other.output_type.full_name, method.name
            assert (method.client_streaming, method.server_streaming) == (
                other.client_streaming,
                other.server_streaming,
            )
        assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics"} <= set(mine.methods_by_name)

    def test_our_stubs_stay_out_of_the_default_pool(self):
        # tritonclient registers the same message names there: one process must be able to load both.
        assert ours.DESCRIPTOR.pool is not service_pb2.DESCRIPTOR.pool


class TestHealthAndMetadata:
    def test_live_and_ready(self, tc):
        assert tc.is_server_live() and tc.is_server_ready()

    @pytest.mark.parametrize(
        ("name", "version", "ready"),
        [("colours", "", True), ("colours", "1", True), ("colours", "test-1", False), ("nope", "", False)],
    )
    def test_model_ready(self, tc, name, version, ready):
        assert tc.is_model_ready(name, version) is ready

    def test_server_metadata_lists_the_extensions(self, tc):
        meta = tc.get_server_metadata()
        assert meta.name == "lesson2-classifier"
        assert {"classification", "model_configuration", "statistics"} <= set(meta.extensions)

    def test_model_metadata(self, tc):
        meta = tc.get_model_metadata("colours")
        assert (meta.name, list(meta.versions), meta.platform) == ("colours", ["1"], "onnxruntime_onnx")
        # The pixels Triton's image clients send; BYTES files are accepted too (the configuration says so).
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("IMAGE", "UINT8", [-1, SIZE, SIZE, 3])]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("PROBABILITIES", "FP32", [-1, 2])]

    def test_model_config_says_what_the_server_does(self, tc, server):
        c = tc.get_model_config("colours").config
        assert c.name == "colours" and c.max_batch_size == server.config.max_batch_images
        assert [(i.name, i.data_type, i.format, list(i.dims)) for i in c.input] == [
            ("IMAGE", model_config_pb2.TYPE_UINT8, model_config_pb2.ModelInput.FORMAT_NHWC, [SIZE, SIZE, 3])
        ]
        assert [(o.name, o.data_type, list(o.dims)) for o in c.output] == [
            ("PROBABILITIES", model_config_pb2.TYPE_FP32, [2])
        ]
        assert c.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert c.dynamic_batching.max_queue_delay_microseconds == server.config.max_delay_us

    def test_model_config_says_what_is_done_to_an_image(self, tc, server):
        p = {key: value.string_value for key, value in tc.get_model_config("colours").config.parameters.items()}
        m = server.models.default().session.manifest
        assert p["tta_views"] == ",".join(v.name for v in m.tta.views) and p["tta_default"] == "true"
        assert json.loads(p["classes"]) == CLASSES and p["bundle_version"] == "test-1"
        assert f"resized to {m.preprocessing.resize_size} px" in p["preprocessing"]
        assert p["image_bytes"].startswith("IMAGE also takes BYTES")

    @pytest.mark.parametrize("call", ["get_model_metadata", "get_model_config"])
    def test_unknown_model_is_not_found(self, tc, call):
        with pytest.raises(InferenceServerException) as err:
            getattr(tc, call)("nope")
        assert (
            status(err) == "StatusCode.NOT_FOUND"
            and "Request for unknown model: 'nope' is not found" in err.value.message()
        )

    def test_what_is_not_implemented_says_so(self, tc):
        with pytest.raises(InferenceServerException) as err:
            tc.get_system_shared_memory_status()  # not declared: gRPC's own answer
        assert status(err) == "StatusCode.UNIMPLEMENTED" and "Method not found" in err.value.message()

    @pytest.mark.parametrize("call", ["load_model", "unload_model"])
    def test_a_bundle_server_says_it_loads_nothing_else(self, tc, call):
        with pytest.raises(InferenceServerException) as err:
            getattr(tc, call)("colours")
        assert status(err) == "StatusCode.FAILED_PRECONDITION" and "serve a --model-repository" in err.value.message()


def index(tc) -> list[tuple[str, str, str]]:
    return [(m.name, m.version, m.state) for m in tc.get_model_repository_index().models]


def repository_server(repo: Path) -> Server:
    """A server on `repo` that scans it only when asked (poll_s 3600), so that a test sees what a
    RepositoryModelLoad did rather than what a poll did."""
    return Server(server_config(model_repository=repo, poll_s=3600))


class TestRepositoryIndex:
    def test_a_bundle_server_lists_its_model(self, tc):
        assert index(tc) == [("colours", "1", "READY")]

    def test_a_repository_lists_every_version_and_which_is_served(self, tiny_bundle, tmp_path):
        for n in (1, 2):
            shutil.copytree(tiny_bundle, tmp_path / "repo" / "pets" / str(n))
        with (
            repository_server(tmp_path / "repo") as srv,
            triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c,
        ):
            assert index(c) == [("pets", "1", "UNAVAILABLE"), ("pets", "2", "READY")]
            assert "version policy" in c.get_model_repository_index().models[0].reason
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:  # the client has no `ready` argument
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=30).models
            assert [(m.name, m.version, m.state) for m in ready] == [("pets", "2", "READY")]
            assert c.is_model_ready("pets", "2") and not c.is_model_ready("pets", "1")

    def test_a_refused_version_says_why(self, tiny_bundle, tmp_path):
        shutil.copytree(tiny_bundle, tmp_path / "repo" / "pets" / "1")
        (tmp_path / "repo" / "pets" / "2").mkdir()  # no manifest: refused, version 1 stays served
        with repository_server(tmp_path / "repo") as srv, triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c:
            assert index(c) == [("pets", "1", "READY"), ("pets", "2", "UNAVAILABLE")]
            reason = c.get_model_repository_index().models[1].reason
            assert reason.startswith("refused: pets/2/manifest.json") and str(tmp_path) not in reason


class TestRepositoryModelLoad:
    def test_loads_a_version_published_since_the_last_scan(self, tiny_bundle, tmp_path):
        repo = tmp_path / "repo"
        shutil.copytree(tiny_bundle, repo / "pets" / "1")
        with repository_server(repo) as srv, triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c:
            shutil.copytree(tiny_bundle, repo / "cats" / "4")
            shutil.copytree(tiny_bundle, repo / "pets" / "2")
            assert not c.is_model_ready("cats")  # nobody scanned yet
            c.load_model("cats")  # returns once the scan that began after the call has ended
            assert c.is_model_ready("cats", "4")
            assert c.is_model_ready("pets", "2"), "the scan syncs the whole repository, as a poll does"
            probs = c.infer("cats", [image_input(IMAGES[:1])]).as_numpy("PROBABILITIES")
            assert probs.shape == (1, len(CLASSES))

    def test_a_model_not_in_the_repository_is_not_found(self, tiny_bundle, tmp_path):
        shutil.copytree(tiny_bundle, tmp_path / "repo" / "pets" / "1")
        with repository_server(tmp_path / "repo") as srv, triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c:
            with pytest.raises(InferenceServerException) as err:
                c.load_model("dogs")
            assert status(err) == "StatusCode.NOT_FOUND"
            assert "the model repository's folder 'dogs' holds no version folder" in err.value.message()
            assert str(tmp_path) not in err.value.message()  # where the server keeps its files is not told

    def test_a_refused_model_says_why(self, tiny_bundle, tmp_path):
        repo = tmp_path / "repo"
        shutil.copytree(tiny_bundle, repo / "pets" / "1")
        with repository_server(repo) as srv, triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c:
            (repo / "cats" / "1").mkdir(parents=True)  # no manifest
            with pytest.raises(InferenceServerException) as err:
                c.load_model("cats")
            assert status(err) == "StatusCode.FAILED_PRECONDITION"
            assert "cats was refused: version 1: cats/1/manifest.json" in err.value.message()
            assert str(tmp_path) not in err.value.message()

    def test_parameters_are_refused_saying_where_the_bundle_goes(self, tiny_bundle, tmp_path):
        shutil.copytree(tiny_bundle, tmp_path / "repo" / "pets" / "1")
        with repository_server(tmp_path / "repo") as srv, triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c:
            with pytest.raises(InferenceServerException) as err:
                c.load_model("pets", config='{"max_batch_size": 4}')
            assert status(err) == "StatusCode.INVALID_ARGUMENT"
            assert "put the bundle in the model repository's folder 'pets' as <version>/" in err.value.message()
            assert str(tmp_path) not in err.value.message()

    def test_unload_stops_serving_until_a_load(self, tiny_bundle, tmp_path):
        repo = tmp_path / "repo"
        shutil.copytree(tiny_bundle, repo / "pets" / "1")
        shutil.copytree(tiny_bundle, repo / "cats" / "1")
        with repository_server(repo) as srv, triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c:
            c.unload_model("pets")
            assert not c.is_model_ready("pets") and c.is_model_ready("cats")
            assert srv.watcher is not None and srv.watcher.scan_now(30)  # polls leave it unloaded
            assert not c.is_model_ready("pets")
            (pets,) = [m for m in c.get_model_repository_index().models if m.name == "pets"]
            assert pets.state == "UNAVAILABLE" and pets.reason.startswith("unloaded by RepositoryModelUnload")
            with pytest.raises(InferenceServerException) as err:
                c.infer("pets", [image_input(IMAGES[:1])])
            assert status(err) == "StatusCode.NOT_FOUND"
            c.load_model("pets")
            assert c.is_model_ready("pets", "1")

    def test_unloading_an_unknown_model_is_not_found(self, tiny_bundle, tmp_path):
        shutil.copytree(tiny_bundle, tmp_path / "repo" / "pets" / "1")
        with repository_server(tmp_path / "repo") as srv, triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c:
            with pytest.raises(InferenceServerException) as err:
                c.unload_model("dogs")
            assert status(err) == "StatusCode.NOT_FOUND" and "Request for unknown model: 'dogs'" in err.value.message()

    def test_a_request_laid_out_as_kserve_lays_it_out_loads(self, tiny_bundle, tmp_path):
        """KServe's RepositoryModelLoadRequest has one field, model_name, numbered 1: where Triton's
        has repository_name. (KServe's compiled stubs cannot share a process with tritonclient's, so
        its bytes are written here: field 1, length-delimited.)"""
        repo = tmp_path / "repo"
        shutil.copytree(tiny_bundle, repo / "pets" / "1")
        with repository_server(repo) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            shutil.copytree(tiny_bundle, repo / "cats" / "1")
            load = channel.unary_unary("/inference.GRPCInferenceService/RepositoryModelLoad")
            assert load(b"\x0a\x04cats", timeout=30) == b""
            assert "cats" in srv.models.served()


class TestModelInfer:
    def test_one_image_equals_predict(self, tc, predicted):
        result = tc.infer("colours", [image_input(IMAGES[:1])], outputs=[triton.InferRequestedOutput("PROBABILITIES")])
        probs = result.as_numpy("PROBABILITIES")
        assert probs.dtype == np.float32 and probs.shape == (1, 2)
        np.testing.assert_allclose(probs[0], predicted[0], atol=1e-6)
        response = result.get_response()
        assert (response.model_name, response.model_version) == ("colours", "1")

    def test_a_batch_equals_predict_image_by_image(self, tc, predicted):
        result = tc.infer("colours", [image_input(IMAGES)], request_id="batch-1")
        np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), np.stack(predicted), atol=1e-6)
        assert result.get_response().id == "batch-1"

    def test_typed_bytes_contents(self, server, predicted):
        # tritonclient's own stub, for the form its InferInput never sends: elements in contents.bytes_contents.
        request = service_pb2.ModelInferRequest(model_name="colours")
        tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[len(IMAGES)])
        tensor.contents.bytes_contents.extend(IMAGES)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("PROBABILITIES", "FP32", [3, 2])]
        probs = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 2)
        np.testing.assert_allclose(probs, np.stack(predicted), atol=1e-6)

    def test_classification_extension(self, tc, server):
        outputs = [triton.InferRequestedOutput("PROBABILITIES", class_count=2)]
        got = tc.infer("colours", [image_input(IMAGES[:2])], outputs=outputs).as_numpy("PROBABILITIES")
        assert got.shape == (2, 2)
        with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
            for row, image in zip(got, IMAGES[:2], strict=True):
                want = c.predict(image).predictions
                parsed = [s.decode().split(":") for s in row]
                assert [(int(i), label) for _, i, label in parsed] == [(p.index, p.label) for p in want]
                np.testing.assert_allclose([float(p) for p, _, _ in parsed], [p.probability for p in want], atol=1e-6)

    def test_both_outputs_in_the_order_requested(self, server):
        request = service_pb2.ModelInferRequest(model_name="colours")
        request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(IMAGES[0])
        request.outputs.add(name="PROBABILITIES").parameters["classification"].int64_param = 1
        request.outputs.add(name="PROBABILITIES")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert [(o.datatype, list(o.shape)) for o in response.outputs] == [("BYTES", [1, 1]), ("FP32", [1, 2])]
        assert len(response.raw_output_contents) == 2

    def test_tta_parameter_and_priority_and_timeout_are_accepted(self, tc, server):
        result = tc.infer(
            "colours", [image_input(IMAGES[:1])], priority=1, timeout=30_000_000, parameters={"tta": False}
        )
        with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
            plain = c.predict(IMAGES[0], tta=False).probabilities
        np.testing.assert_allclose(result.as_numpy("PROBABILITIES")[0], plain, atol=1e-6)

    def test_uint8_pixels_equal_the_same_picture_as_a_file(self, tc, server):
        size = server.models.default().session.manifest.preprocessing.input_size
        pixels = np.random.default_rng(4).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        tensor = triton.InferInput("IMAGE", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        got = tc.infer("colours", [tensor]).as_numpy("PROBABILITIES")
        with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
            for row, p in zip(got, pixels, strict=True):
                buf = io.BytesIO()
                Image.fromarray(p).save(buf, "PNG")  # lossless: the server decodes these very pixels
                np.testing.assert_allclose(row, c.predict(buf.getvalue()).probabilities, atol=1e-6)

    def test_async_infer(self, tc, predicted):
        done: queue.Queue = queue.Queue()
        tc.async_infer("colours", [image_input(IMAGES[:1])], callback=lambda result, error: done.put((result, error)))
        result, error = done.get(timeout=30)
        assert error is None
        np.testing.assert_allclose(result.as_numpy("PROBABILITIES")[0], predicted[0], atol=1e-6)

    def test_stream(self, server, predicted):
        done: queue.Queue = queue.Queue()
        with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
            c.start_stream(callback=lambda result, error: done.put((result, error)))
            c.async_stream_infer("colours", [image_input(IMAGES[:1])], request_id="a")
            c.async_stream_infer("colours", [image_input([b"not an image"])], request_id="b")
            c.async_stream_infer("colours", [image_input(IMAGES[1:])], request_id="c")
            answers = [done.get(timeout=30) for _ in range(3)]
            c.stop_stream()
        (first, e1), (_, e2), (third, e3) = answers
        assert e1 is None and e3 is None
        assert "not a recognised image format" in e2.message()
        assert first.get_response().id == "a" and third.get_response().id == "c"
        np.testing.assert_allclose(first.as_numpy("PROBABILITIES")[0], predicted[0], atol=1e-6)
        np.testing.assert_allclose(third.as_numpy("PROBABILITIES"), np.stack(predicted[1:]), atol=1e-6)


def test_the_readme_example_runs(server, tmp_path, monkeypatch):
    """The README's tritonclient example, as written, against a real server."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### The Open Inference Protocol") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert "localhost:50051" in code
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.jpg").write_bytes(IMAGES[0])
    (tmp_path / "dog.jpg").write_bytes(IMAGES[1])
    names: dict = {}
    exec(code.replace("localhost:50051", f"127.0.0.1:{server.port}"), names)
    assert names["probs"].shape == (2, len(CLASSES)) and names["probs"].dtype == np.float32
    assert names["labels"].shape == (2, 2)
    for row in names["labels"]:
        assert sorted(s.decode().split(":", 2)[2] for s in row) == CLASSES


class TestErrors:
    @pytest.mark.parametrize(
        ("images", "message"),
        [
            ([b"not an image"], "element 0: not a recognised image format"),
            ([IMAGES[0], b""], "element 1: empty image"),
        ],
    )
    def test_a_bad_image_is_invalid_argument(self, tc, images, message):
        with pytest.raises(InferenceServerException) as err:
            tc.infer("colours", [image_input(images)])
        assert status(err) == "StatusCode.INVALID_ARGUMENT" and message in err.value.message()

    def test_wrong_datatype_name_or_shape(self, tc):
        fp32 = triton.InferInput("IMAGE", [1, 3], "FP32")
        fp32.set_data_from_numpy(np.zeros((1, 3), np.float32))
        named = triton.InferInput("INPUT0", [1, 1], "BYTES")
        named.set_data_from_numpy(np.array([[IMAGES[0]]], dtype=np.object_))
        shaped = triton.InferInput("IMAGE", [1, 1], "BYTES")
        shaped.set_data_from_numpy(np.array([[IMAGES[0]]], dtype=np.object_))
        shaped.set_shape([2, 1])  # a shape that disagrees with the data, which the client does not check here
        for tensor, message in [
            (fp32, "datatype 'FP32' is not accepted"),
            (named, "expected one input named 'IMAGE'"),
            (shaped, "says 2 images but 1 elements were sent"),
        ]:
            with pytest.raises(InferenceServerException) as err:
                tc.infer("colours", [tensor])
            assert status(err) == "StatusCode.INVALID_ARGUMENT" and message in err.value.message()

    def test_unknown_model_or_version(self, tc):
        with pytest.raises(InferenceServerException) as err:
            tc.infer("nope", [image_input(IMAGES[:1])])
        assert status(err) == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as err:
            tc.infer("colours", [image_input(IMAGES[:1])], model_version="other")
        assert status(err) == "StatusCode.NOT_FOUND" and "version 'other' is not served" in err.value.message()

    @pytest.mark.parametrize("contents", ["bytes_contents", "uint_contents"])
    def test_typed_contents_past_the_declared_shape_are_invalid_argument(self, server, contents):
        if contents == "bytes_contents":
            request = infer_request("BYTES", [1], service_pb2)
            request.inputs[0].contents.bytes_contents.extend([bytes(4 * MB)] * 10)  # 40 MB for one image
            message = "says 1 images but 10 elements were sent"
        else:
            request = infer_request("UINT8", [1, SIZE, SIZE, 3], service_pb2)
            request.inputs[0].contents.uint_contents.extend(bytes(10_000_000))  # 10 MB sent, 3 KB declared
            message = f"needs {SIZE * SIZE * 3} values of pixels in uint_contents, got 10000000"
        err = refusal(server, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details()

    def test_raw_bytes_over_the_image_limit_are_refused_at_the_prefix(self, server):
        request = infer_request("BYTES", [1], service_pb2)
        request.raw_input_contents.append(join_bytes([bytes(MAX_IMAGE_BYTES + 1)]))
        err = refusal(server, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"element 0 says {MAX_IMAGE_BYTES + 1} bytes, over the limit of {MAX_IMAGE_BYTES}" in err.details()

    def test_output_fan_out_is_refused(self, server):
        request = infer_request("BYTES", [1], service_pb2)
        request.inputs[0].contents.bytes_contents.append(IMAGES[0])
        for _ in range(1000):  # each a copy of the probabilities: 2.4 MB of request made 247 MB of response
            request.outputs.add(name="PROBABILITIES")
        err = refusal(server, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "1000 outputs requested" in err.details()

    @pytest.mark.parametrize(
        ("change", "code"),
        [
            pytest.param(lambda r: setattr(r, "model_name", LONG), grpc.StatusCode.NOT_FOUND, id="model name"),
            pytest.param(lambda r: setattr(r, "model_version", LONG), grpc.StatusCode.NOT_FOUND, id="version"),
            pytest.param(lambda r: setattr(r.inputs[0], "name", LONG), grpc.StatusCode.INVALID_ARGUMENT, id="input"),
            pytest.param(
                lambda r: setattr(r.inputs[0], "datatype", LONG), grpc.StatusCode.INVALID_ARGUMENT, id="datatype"
            ),
            pytest.param(lambda r: r.outputs.add(name=LONG), grpc.StatusCode.INVALID_ARGUMENT, id="output"),
            pytest.param(
                lambda r: r.parameters["tta"].MergeFrom(service_pb2.InferParameter(string_param=LONG)),
                grpc.StatusCode.INVALID_ARGUMENT,
                id="parameter",
            ),
        ],
    )
    def test_a_long_field_is_cut_in_the_message(self, server, change, code):
        # Quoted in full, the message would pass gRPC's metadata limit (8 KiB) and the call end
        # RESOURCE_EXHAUSTED; cut to 200 characters, it is the message's size without it plus that.
        request = infer_request("BYTES", [1], service_pb2)
        request.inputs[0].contents.bytes_contents.append(IMAGES[0])
        change(request)
        err = refusal(server, request)
        assert err.code() == code and len(err.details()) < 400
        assert "x" * 100 in err.details() and "20000 characters in all" in err.details()

    @pytest.mark.parametrize("call", ["infer", "get_model_metadata"])
    def test_a_long_model_name_is_not_found(self, tc, call):
        with pytest.raises(InferenceServerException) as err:
            getattr(tc, call)(LONG, *([[image_input(IMAGES[:1])]] if call == "infer" else []))
        assert status(err) == "StatusCode.NOT_FOUND" and len(err.value.message()) < 300
        assert err.value.message().startswith("Request for unknown model: 'xxx")


class TestStatistics:
    def test_counts_move_by_the_calls_made(self, tc):
        before = statistics(tc)
        tc.infer("colours", [image_input(IMAGES[:2])])
        with pytest.raises(InferenceServerException):
            tc.infer("colours", [image_input([b"junk"])])
        after = statistics(tc)
        b, a = before.inference_stats, after.inference_stats
        assert a.success.count - b.success.count == 1 and a.success.ns > b.success.ns
        assert a.fail.count - b.fail.count == 1
        assert after.inference_count - before.inference_count == 2
        assert after.execution_count - before.execution_count >= 1
        assert a.queue.count - b.queue.count == 2 == a.compute_infer.count - b.compute_infer.count
        assert a.compute_input.count - b.compute_input.count == 3  # the junk image was decoded too, and failed
        assert a.compute_infer.ns > b.compute_infer.ns and after.last_inference > 0
        assert sum(s.compute_infer.count for s in after.batch_stats) == after.execution_count

    def test_predict_calls_count_too(self, tc, server):
        before = statistics(tc)
        with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
            c.predict(IMAGES[0])
            c.predict_batch([*IMAGES[:2], b"junk"])  # answered, with 2 of its 3 images
        after = statistics(tc)
        assert after.inference_stats.success.count - before.inference_stats.success.count == 2
        assert after.inference_count - before.inference_count == 3

    def test_calls_are_counted_in_the_prometheus_metrics(self, tc, server):
        def ok(method: str) -> float:
            labels = {"method": method, "code": "OK"}
            return server.metrics.registry.get_sample_value("classifier_requests_total", labels) or 0.0

        methods = ("ModelInfer", "ServerLive", "ModelStreamInfer")
        before = [ok(m) for m in methods]
        tc.infer("colours", [image_input(IMAGES[:1])])
        tc.is_server_live()
        answered: queue.Queue = queue.Queue()
        with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
            c.start_stream(callback=lambda result, error: answered.put(error))
            c.async_stream_infer("colours", [image_input(IMAGES[:1])])
            assert answered.get(timeout=30) is None
            c.stop_stream()  # the stream is one call, counted when it ends
        wait_until(lambda: ok("ModelStreamInfer") == before[2] + 1)
        assert [ok(m) for m in methods] == [n + 1 for n in before]


@pytest.fixture
def gated(tiny_bundle):
    return GatedSession(ModelSession(tiny_bundle, device="cpu"))


def test_full_queue_is_unavailable_saying_so(tiny_bundle, gated):
    one_image = dict(max_batch_views=4, max_queue=1, max_batch_images=1, model_instances=1, max_delay_us=0)
    with (
        Server(server_config(tiny_bundle, **one_image), session=gated) as srv,
        triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c,
    ):
        gated.hold()
        answers: queue.Queue = queue.Queue()

        def call() -> None:
            c.async_infer("colours", [image_input(IMAGES[:1])], callback=lambda result, error: answers.put(error))

        call()
        assert gated.entered.wait(10)
        call()
        wait_until(lambda: srv.batcher is not None and srv.batcher.depth == 1)
        with pytest.raises(InferenceServerException) as err:
            c.infer("colours", [image_input(IMAGES[:1])])
        assert status(err) == "StatusCode.UNAVAILABLE" and "the queue is full" in err.value.message()
        gated.release.set()
        assert [answers.get(timeout=30), answers.get(timeout=30)] == [None, None]


def test_the_timeout_parameter_bounds_the_wait(tiny_bundle, gated):
    with (
        Server(server_config(tiny_bundle, model_instances=1, max_delay_us=0), session=gated) as srv,
        triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c,
    ):
        gated.hold()
        answers: queue.Queue = queue.Queue()
        c.async_infer("colours", [image_input(IMAGES[:1])], callback=lambda result, error: answers.put(error))
        assert gated.entered.wait(10)
        with pytest.raises(InferenceServerException) as err:
            c.infer("colours", [image_input(IMAGES[1:2])], timeout=100_000)  # microseconds: 0.1 s
        assert status(err) == "StatusCode.DEADLINE_EXCEEDED"
        gated.release.set()
        assert answers.get(timeout=30) is None
        assert len(gated.batches) == 1  # the call that timed out never ran


class TestRawBytes:
    """BYTES elements in raw form: a 4-byte little-endian length, then the bytes (no network)."""

    def test_round_trip_and_the_client_agrees(self):
        elements = [b"abc", b"", b"\x00" * 300]
        raw = join_bytes(elements)
        assert raw[:7] == b"\x03\x00\x00\x00abc"
        assert split_bytes(raw) == elements
        assert raw == serialize_byte_tensor(np.array(elements, dtype=np.object_)).item()

    @pytest.mark.parametrize(
        ("raw", "message"),
        [(b"\x03\x00", "2 bytes left at offset 0"), (b"\x05\x00\x00\x00abc", "says 5 bytes but only 3 follow")],
    )
    def test_truncated_input_is_invalid_argument(self, server, raw, message):
        with pytest.raises(CallFailed, match=message):
            split_bytes(raw)
        request = service_pb2.ModelInferRequest(model_name="colours", raw_input_contents=[raw])
        request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as err:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()

    def test_bytes_that_are_not_a_request_are_invalid_argument(self, server):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.RpcError) as err:
                call(b"\xff\xff\xff", timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid ModelInfer message" in err.value.details()


class TestCheckedBeforeBuilt:
    """A request's input is checked from its declared shape, datatype and lengths before anything is
    copied out of it: a bomb costs what refusing it does, however much it sent (no network)."""

    def test_typed_bytes_past_the_declared_batch(self):
        request = infer_request("BYTES", [1])
        request.inputs[0].contents.bytes_contents.extend([bytes(4 * MB)] * 10)  # 40 MB
        message = refused_within(MB, read_images, request, SIZE, 64, MAX_IMAGE_BYTES)
        assert "shape [1] says 1 images but 10 elements were sent" in message

    def test_typed_pixels_past_the_declared_shape(self):
        request = infer_request("UINT8", [1, SIZE, SIZE, 3])
        request.inputs[0].contents.uint_contents.extend(bytes(10_000_000))  # 40 MB parsed; far more as Python ints
        message = refused_within(MB, read_images, request, SIZE, 64, MAX_IMAGE_BYTES)
        assert f"needs {SIZE * SIZE * 3} values of pixels in uint_contents, got 10000000" in message

    def test_a_shape_of_a_million_dimensions(self):
        message = refused_within(MB, read_images, infer_request("BYTES", [1] * 1_000_000), SIZE, 64, MAX_IMAGE_BYTES)
        assert "input IMAGE has 1000000 dimensions" in message

    def test_raw_bytes_stop_at_the_first_element_past_the_batch(self):
        raw = join_bytes([b""] * 1_000_000)  # 4 MB: a million elements for a batch of one
        message = refused_within(MB, split_bytes, raw, max_elements=1)
        assert "more elements than the 1 declared (another begins at offset 4)" in message

    def test_a_raw_element_over_the_limit_is_refused_at_its_prefix(self):
        raw = join_bytes([bytes(30 * MB)])
        message = refused_within(MB, split_bytes, raw, max_element_bytes=MAX_IMAGE_BYTES)
        assert f"element 0 says {30 * MB} bytes, over the limit of {MAX_IMAGE_BYTES}" in message
        request = infer_request("BYTES", [1])
        request.raw_input_contents.append(raw)
        # Reading the entry out of the request copies it once; nothing more is made of it.
        refused_within(len(raw) + MB, read_images, request, SIZE, 64, MAX_IMAGE_BYTES)

    def test_a_typed_element_over_the_limit(self):
        request = infer_request("BYTES", [2])
        request.inputs[0].contents.bytes_contents.extend([bytes(1024), bytes(1025)])
        with pytest.raises(CallFailed, match="element 1 is 1025 bytes, over the limit of 1024"):
            read_images(request, SIZE, 64, 1024)

    def test_a_raw_entry_larger_than_the_pixels_declared(self):
        request = infer_request("UINT8", [1, SIZE, SIZE, 3])
        request.raw_input_contents.append(bytes(2 * SIZE * SIZE * 3))
        with pytest.raises(CallFailed, match=f"needs {SIZE * SIZE * 3} bytes of pixels, got {2 * SIZE * SIZE * 3}"):
            read_images(request, SIZE, 64, MAX_IMAGE_BYTES)

    def test_a_batch_over_the_limit_is_refused_from_the_shape(self):
        with pytest.raises(CallFailed, match="65 images in one request, over the limit of 64"):
            read_images(infer_request("BYTES", [65]), SIZE, 64, MAX_IMAGE_BYTES)

    def test_raw_and_typed_contents_at_once(self):
        request = infer_request("BYTES", [1])
        request.raw_input_contents.append(join_bytes(IMAGES[:1]))
        request.inputs[0].contents.bytes_contents.append(IMAGES[0])
        with pytest.raises(CallFailed, match="both in raw_input_contents and in contents"):
            read_images(request, SIZE, 64, MAX_IMAGE_BYTES)

    def test_what_fits_the_declaration_is_read(self):
        request = infer_request("BYTES", [2, 1])
        request.raw_input_contents.append(join_bytes(IMAGES[:2]))
        assert read_images(request, SIZE, 64, MAX_IMAGE_BYTES) == IMAGES[:2]
        pixels = np.arange(SIZE * SIZE * 3, dtype=np.uint32) % 256
        request = infer_request("UINT8", [1, SIZE, SIZE, 3])
        request.inputs[0].contents.uint_contents.extend(pixels.tolist())
        np.testing.assert_array_equal(read_images(request, SIZE, 64, MAX_IMAGE_BYTES), pixels.reshape(1, SIZE, SIZE, 3))


class TestRequestedOutputs:
    """PROBABILITIES at most once as probabilities and once as a classification, in a response that
    fits the server's message limit (no network)."""

    @staticmethod
    def asking(*ks: int | None):
        """A request for PROBABILITIES once per entry: None plain, k with classification k."""
        request = infer_request("BYTES", [1])
        for k in ks:
            output = request.outputs.add(name="PROBABILITIES")
            if k is not None:
                output.parameters["classification"].int64_param = k
        return request

    @pytest.mark.parametrize(
        ("ks", "message"),
        [
            ((None, 1, 2), "3 outputs requested"),
            ((None, None), "requested twice as probabilities"),
            ((1, 2), r"requested twice with classification \(k = 1 and 2\)"),
        ],
    )
    def test_fan_out_is_refused(self, ks, message):
        with pytest.raises(CallFailed, match=message):
            requested_outputs(self.asking(*ks), CLASSES, 1, MB)

    def test_one_of_each_form_in_the_order_asked(self):
        assert requested_outputs(self.asking(5, None), CLASSES, 1, MB) == [2, 0]  # k capped at the classes
        assert requested_outputs(self.asking(), CLASSES, 1, MB) == [0]

    def test_a_response_over_the_limit_is_refused_before_it_is_built(self):
        assert response_bytes([0], 64, CLASSES) == 64 * 2 * 4
        with pytest.raises(CallFailed, match="the response for 64 images would be about 512 bytes, over the server's"):
            requested_outputs(self.asking(), CLASSES, 64, 500)

    def test_response_bytes_bound_what_is_built(self):
        probabilities = np.array([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
        assert len(probabilities.astype("<f4").tobytes()) == response_bytes([0], 3, CLASSES)
        for k in (1, 2):
            assert len(join_bytes(classifications(probabilities, CLASSES, k))) <= response_bytes([k], 3, CLASSES)


def test_not_ready_while_draining_but_live(tiny_bundle):
    with (
        Server(server_config(tiny_bundle)) as srv,
        triton.InferenceServerClient(f"127.0.0.1:{srv.port}") as c,
    ):
        assert c.is_server_ready() and c.is_model_ready("colours")
        srv.drain()
        assert c.is_server_live()
        assert not c.is_server_ready() and not c.is_model_ready("colours")
