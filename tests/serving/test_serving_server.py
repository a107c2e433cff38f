"""A real server on loopback: PredictBatch, health, reflection, metrics, batching, back-pressure, deadlines, TLS."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import png, server_config
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from serving.bundle.manifest import BundleError
from serving.bundle.session import ModelSession
from serving.client import Client
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.server import Server

N_VIEWS = 4  # the tiny bundle's TTA views


def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll a condition the test cannot be told about directly (a queue's depth); never a bare sleep."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with Server(server_config(tiny_bundle, metrics_port=0)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


class TestPredictBatch:
    def test_results_in_order_equal_single_predictions(self, client):
        images = [png(seed=1), png((40, 60, 200), seed=2), png(size=(17, 90), seed=3)]
        reply = client.predict_batch(images)
        assert [r.status.code for r in reply.results] == [0, 0, 0]
        for image, result in zip(images, reply.results, strict=True):
            single = client.predict(image)
            np.testing.assert_allclose(result.response.probabilities, single.probabilities, atol=1e-6)
            assert list(result.response.tta_views) == list(single.tta_views) and len(single.tta_views) == N_VIEWS

    def test_a_bad_image_fails_only_its_own_entry(self, client):
        reply = client.predict_batch([png(seed=1), b"not an image", b"", png(seed=2)])
        codes = [r.status.code for r in reply.results]
        assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
        assert "not a recognised image format" in reply.results[1].status.message
        assert "empty image" in reply.results[2].status.message
        assert not reply.results[1].HasField("response") and reply.results[3].response.predictions

    def test_options_are_per_image(self, client):
        request = pb.PredictBatchRequest(
            requests=[pb.PredictRequest(image=png(), top_k=1, tta=False), pb.PredictRequest(image=png())]
        )
        first, second = client.stub.PredictBatch(request, timeout=30).results
        assert list(first.response.tta_views) == ["center"] and len(first.response.predictions) == 1
        assert len(second.response.tta_views) == N_VIEWS and len(second.response.predictions) == 2

    def test_empty_batch(self, client):
        assert len(client.predict_batch([]).results) == 0

    def test_too_many_images_is_invalid_argument(self, tiny_bundle):
        with Server(server_config(tiny_bundle, max_batch_images=2)) as srv, Client(f"127.0.0.1:{srv.port}") as c:
            with pytest.raises(grpc.RpcError) as err:
                c.predict_batch([png()] * 3)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "3 images in one PredictBatch call, over the limit of 2" in err.value.details()


@pytest.fixture(scope="module")
def plain_by_default(tiny_bundle):
    """A server whose bundle chose the plain view for calls that do not say. The choice is swapped
    into the loaded manifest here; tests/trainer/test_export.py exports a bundle that makes it."""
    session = ModelSession(tiny_bundle, device="cpu")
    m = session.manifest
    session.manifest = m.model_copy(update={"tta": m.tta.model_copy(update={"default": False})})
    with Server(server_config(tiny_bundle), session=session) as srv:
        yield srv


class TestTTADefault:
    """A call's `tta` wins; a call that leaves it unset gets the bundle's default (tta.default)."""

    @pytest.mark.parametrize(
        ("which", "tta", "views"),
        [
            ("server", None, N_VIEWS),
            ("plain_by_default", None, 1),
            ("plain_by_default", True, N_VIEWS),
            ("plain_by_default", False, 1),
            ("server", False, 1),
        ],
    )
    def test_predict_and_predict_batch(self, request, which, tta, views):
        srv = request.getfixturevalue(which)
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            assert len(c.predict(png(), tta=tta).tta_views) == views
            (result,) = c.predict_batch([png()], tta=tta).results
            assert len(result.response.tta_views) == views

    @pytest.mark.parametrize(("which", "default"), [("server", True), ("plain_by_default", False)])
    def test_model_info_says_the_default_and_why(self, request, which, default):
        srv = request.getfixturevalue(which)
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            info = c.model_info()
        assert info.tta_default is default
        assert info.tta_reason  # the export's reason (or, for a bundle without one, that it was not recorded)
        assert info.metrics_held_out is True

    @pytest.mark.parametrize(("flag", "views"), [([], 1), (["--tta"], N_VIEWS), (["--no-tta"], 1)])
    def test_the_predict_command(self, plain_by_default, tmp_path, capsys, flag, views):
        from serving.cli import main

        image = tmp_path / "red.png"
        image.write_bytes(png())
        assert main(["predict", str(image), "--target", f"127.0.0.1:{plain_by_default.port}", *flag]) == 0
        assert capsys.readouterr().out.rstrip().endswith(f"[{views} views]")


class TestHealth:
    def test_not_serving_until_loaded_then_serving_then_not_serving_while_draining(self, tiny_bundle):
        srv = Server(server_config(tiny_bundle), load=False)
        try:
            with Client(f"127.0.0.1:{srv.port}", timeout=10) as c:
                assert c.health() == c.health("classifier.v1.Classifier") == "NOT_SERVING"
                with pytest.raises(grpc.RpcError) as err:
                    c.predict(png())
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in err.value.details()

                srv.load()
                assert c.health() == c.health("classifier.v1.Classifier") == "SERVING"
                assert c.predict(png()).predictions

                srv.drain()  # what SIGTERM does first: load balancers move away, calls still answered
                assert c.health() == c.health("classifier.v1.Classifier") == "NOT_SERVING"
                assert c.predict(png()).predictions

                srv.stop(grace=5)
                with pytest.raises(grpc.RpcError) as err:
                    c.health()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            srv.stop(0)

    def test_the_health_command_exits_0_only_when_serving(self, tiny_bundle, capsys):
        from serving.cli import main

        srv = Server(server_config(tiny_bundle), load=False)
        try:
            target = ["health", "--target", f"127.0.0.1:{srv.port}"]
            assert main(target) == 1 and "NOT_SERVING" in capsys.readouterr().out  # loading
            srv.load()
            assert main(target) == 0 and "SERVING" in capsys.readouterr().out
            srv.drain()
            assert main(target) == 1
        finally:
            srv.stop(0)
        assert main(["health", "--target", f"127.0.0.1:{srv.port}", "--timeout", "1"]) == 1  # nobody listens
        assert "UNAVAILABLE" in capsys.readouterr().err

    def test_unknown_service_is_not_found(self, client):
        with pytest.raises(grpc.RpcError) as err:
            client.health("no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_service_answered(server):
    """What `grpcurl list` and `grpcurl describe` read: every service, the Open Inference Protocol's
    included (its descriptors live in a pool of their own), with its methods and their messages."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert set(db.get_services()) == {
            "classifier.v1.Classifier",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        pool = DescriptorPool(db)
        service = pool.FindServiceByName("classifier.v1.Classifier")
        assert {m.name for m in service.methods} == {"Predict", "PredictBatch", "ModelInfo"}
        assert service.methods_by_name["PredictBatch"].output_type.full_name == "classifier.v1.PredictBatchResponse"
        oip = pool.FindServiceByName("inference.GRPCInferenceService")
        assert oip.methods_by_name["ModelInfer"].input_type.full_name == "inference.ModelInferRequest"
        assert "RepositoryModelUnload" in oip.methods_by_name


def test_health_knows_every_service_name(client):
    for name in ("", "classifier.v1.Classifier", "inference.GRPCInferenceService", "colours"):
        assert client.health(name) == "SERVING", name


@pytest.mark.parametrize("path", ["/", "/v2/health/ready", "/v2/models/no_such_model/ready", "/healthz"])
def test_the_metrics_port_answers_404_off_metrics(server, path):
    """An HTTP health check aimed at the metrics port must not pass whatever the server's state
    (prometheus_client's own server answered 200 with the metrics text on every path)."""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}", timeout=10)
    assert e.value.code == 404 and b"/metrics" in e.value.read()
    assert scrape(server.metrics_port)  # /metrics itself still answers, and parses


def scrape(port: int) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, metric: str, /, **labels) -> float:
    """Sum of the samples called `metric` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and want <= set(ls))


class TestMetrics:
    def test_counters_move_by_exactly_the_calls_made(self, server, client):
        before = scrape(server.metrics_port)
        for seed in range(3):
            client.predict(png(seed=seed))
        client.predict(png(), tta=False)
        with pytest.raises(grpc.RpcError):
            client.predict(b"junk")
        client.predict_batch([png(seed=5), b"junk", png(seed=6)])
        client.model_info()
        after = scrape(server.metrics_port)

        def delta(name, **labels):
            return total(after, name, **labels) - total(before, name, **labels)

        assert delta("classifier_requests_total", method="Predict", code="OK") == 4
        assert delta("classifier_requests_total", method="Predict", code="INVALID_ARGUMENT") == 1
        assert delta("classifier_requests_total", method="PredictBatch", code="OK") == 1
        assert delta("classifier_requests_total", method="ModelInfo", code="OK") == 1
        assert delta("classifier_request_seconds_count", method="Predict") == 5
        assert delta("classifier_images_total") == 6 == delta("classifier_queue_wait_seconds_count")
        assert delta("classifier_views_total") == 3 * N_VIEWS + 1 + 2 * N_VIEWS == delta("classifier_batch_views_sum")
        assert delta("classifier_inference_seconds_count") == delta("classifier_batch_views_count") >= 1
        assert delta("classifier_predicted_class_total") == 6  # top-1 of every answered image
        assert total(after, "classifier_in_flight_requests") == 0 and total(after, "classifier_queue_depth") == 0

    def test_model_info_and_every_class_are_exported(self, server):
        samples = scrape(server.metrics_port)
        m = server.servicer.model.session.manifest
        assert (
            total(
                samples,
                "classifier_model_info",
                name="colours",
                version="test-1",
                sha256=m.model.sha256,
                precision="fp32",
            )
            == 1
        )
        assert {dict(ls)["label"] for (n, ls) in samples if n == "classifier_predicted_class_total"} == {"blue", "red"}

    def test_each_server_has_its_own_registry(self, server, tiny_bundle):
        with Server(server_config(tiny_bundle, metrics_port=0)) as other, Client(f"127.0.0.1:{other.port}") as c:
            c.predict(png())
            assert total(scrape(other.metrics_port), "classifier_requests_total") == 1
            assert other.metrics_port != server.metrics_port


class GatedSession:
    """A real ModelSession whose batch step the test can hold busy; it records every batch's images' views."""

    def __init__(self, session: ModelSession):
        self._session = session
        self.batches: list[list[int]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def __getattr__(self, name):
        return getattr(self._session, name)

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()

    def predict(self, views, counts=None):
        self.batches.append(list(counts))
        self.entered.set()
        assert self.release.wait(30), "test never released the model"
        return self._session.predict(views, counts)


@pytest.fixture(scope="module")
def session(tiny_bundle):
    return ModelSession(tiny_bundle, device="cpu")


@pytest.fixture
def gated(session):
    return GatedSession(session)


def gated_server(bundle, gated, **kw):
    # One model run at a time: holding the gate holds the whole model, and what comes next queues.
    kw = {"model_instances": 1, **kw}
    return Server(server_config(bundle, max_delay_us=0, metrics_port=0, **kw), session=gated)


class TestBatching:
    def test_concurrent_calls_run_as_one_batch(self, tiny_bundle, gated):
        with gated_server(tiny_bundle, gated, max_batch_views=64) as srv, Client(f"127.0.0.1:{srv.port}") as c:
            gated.hold()
            first = c.stub.Predict.future(pb.PredictRequest(image=png()), timeout=30)
            assert gated.entered.wait(10)
            others = [c.stub.Predict.future(pb.PredictRequest(image=png(seed=i)), timeout=30) for i in range(3)]
            wait_until(lambda: srv.batcher.depth == 3)
            gated.release.set()
            assert all(f.result().predictions for f in [first, *others])
            assert gated.batches == [[N_VIEWS], [N_VIEWS] * 3]

    def test_full_queue_fails_fast_with_resource_exhausted(self, tiny_bundle, gated):
        one_image = dict(max_batch_views=N_VIEWS, max_queue=1, max_batch_images=1)
        with gated_server(tiny_bundle, gated, **one_image) as srv, Client(f"127.0.0.1:{srv.port}") as c:
            gated.hold()
            running = c.stub.Predict.future(pb.PredictRequest(image=png()), timeout=30)
            assert gated.entered.wait(10)
            queued = c.stub.Predict.future(pb.PredictRequest(image=png()), timeout=30)
            wait_until(lambda: srv.batcher.depth == 1)
            with pytest.raises(grpc.RpcError) as err:
                c.predict(png())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server busy" in err.value.details() and "retry with backoff" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                c.predict_batch([png()])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gated.release.set()
            assert running.result().predictions and queued.result().predictions
            assert c.predict(png()).predictions  # back to normal once the queue drains

    def test_deadline_exceeded_while_waiting_and_the_expired_call_never_runs(self, tiny_bundle, gated):
        with gated_server(tiny_bundle, gated) as srv, Client(f"127.0.0.1:{srv.port}") as c:
            gated.hold()
            running = c.stub.Predict.future(pb.PredictRequest(image=png()), timeout=30)
            assert gated.entered.wait(10)
            with pytest.raises(grpc.RpcError) as err:
                c.stub.Predict(pb.PredictRequest(image=png(seed=1)), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            # The call is over once it is counted: by its handler (which withdrew its queued views), or,
            # on a machine so loaded that the deadline passed before a handler thread took the call,
            # as a call that never ran.
            def counted(name: str, **labels) -> float:
                return srv.metrics.registry.get_sample_value(name, {"method": "Predict", **labels}) or 0

            wait_until(
                lambda: (
                    counted("classifier_requests_total", code="DEADLINE_EXCEEDED")
                    + counted("classifier_calls_not_run_total")
                    == 1
                )
            )
            gated.release.set()
            assert running.result().predictions
            assert c.predict(png(seed=2), tta=False).predictions
            assert gated.batches == [[N_VIEWS], [1]]  # the first call and the last; never the expired one


class TestPrecision:
    def test_model_info_says_what_runs(self, client):
        info = client.model_info()
        assert info.precision == "fp32" and list(info.providers) == ["CPUExecutionProvider"]

    def test_a_precision_the_bundle_lacks_is_a_clear_error(self, tiny_bundle):
        with pytest.raises(BundleError, match=r"the bundle has no int8 model \(it has: fp32\); export with --int8"):
            Server(server_config(tiny_bundle, precision="int8", metrics_port=0))


def self_signed_cert(folder):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a self-signed certificate (and the cryptography package is not used)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls(tiny_bundle, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    with Server(server_config(tiny_bundle, tls_cert=cert, tls_key=key)) as srv:
        with Client(f"127.0.0.1:{srv.port}", tls_ca=cert, timeout=30) as c:
            assert c.health() == "SERVING"
            assert c.predict(png()).predictions
        with Client(f"127.0.0.1:{srv.port}", timeout=5) as plain:
            with pytest.raises(grpc.RpcError) as err:
                plain.predict(png())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
