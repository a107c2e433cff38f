"""Streams cannot take the server (serving.protocols.streams): 256 streams that open and send nothing leave
Predict and the health check answering, those past --max-streams are refused at once, and a stream
that waits past --stream-idle-s for its next request is closed."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from conftest import server_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_serving_server import png

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.gen.inference import grpc_service_pb2 as oip
from serving.gen.inference import grpc_service_pb2_grpc as oip_grpc
from serving.server import Server

IDLE_STREAMS = 256


def silent(stop: threading.Event):
    """A request stream that sends nothing until `stop`."""
    stop.wait()
    yield from ()


def p99(seconds: list[float]) -> float:
    return float(np.percentile(seconds, 99))


def timed_calls(stub, health, image: bytes, n: int) -> tuple[list[float], list[float]]:
    predict, check = [], []
    for _ in range(n):
        start = time.monotonic()
        stub.Predict(pb.PredictRequest(image=image), timeout=5)
        predict.append(time.monotonic() - start)
        start = time.monotonic()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        check.append(time.monotonic() - start)
    return predict, check


@pytest.fixture(scope="module")
def server(tiny_bundle):
    cfg = server_config(tiny_bundle, stream_idle_s=600)
    with Server(cfg) as srv:
        yield srv


def test_idle_streams_leave_predict_and_health_unaffected(server):
    image = png()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub, health = pb_grpc.ClassifierStub(channel), health_pb2_grpc.HealthStub(channel)
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        timed_calls(stub, health, image, 5)  # warm
        before_predict, before_check = timed_calls(stub, health, image, 40)
        stop = threading.Event()
        streams = [inference.ModelStreamInfer(silent(stop)) for _ in range(IDLE_STREAMS // 2)]
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(IDLE_STREAMS // 2)]
        try:
            # Wait until every stream has either its place or its refusal.
            deadline = time.monotonic() + 30
            while server.streams.open_streams < server.streams.limit:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            during_predict, during_check = timed_calls(stub, health, image, 40)
        finally:
            stop.set()
            for call in [*streams, *watches]:
                call.cancel()
    # Every call was answered within its 5 s deadline (with 16 idle streams, none was before the limit);
    # and no slower than a loaded machine's noise allows.
    assert p99(during_predict) < 2 * p99(before_predict) + 0.1, (before_predict, during_predict)
    assert p99(during_check) < 2 * p99(before_check) + 0.1, (before_check, during_check)


def test_streams_past_the_limit_are_refused_at_once(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        stop = threading.Event()
        held = [inference.ModelStreamInfer(silent(stop)) for _ in range(server.streams.limit)]
        try:
            deadline = time.monotonic() + 10
            while server.streams.open_streams < server.streams.limit:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(inference.ModelStreamInfer(silent(stop), timeout=10))
            assert time.monotonic() - start < 2
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-streams" in err.value.details()
        finally:
            stop.set()
            for call in held:
                call.cancel()


def test_a_stream_idle_past_its_limit_is_closed_and_a_busy_one_is_not(tiny_bundle):
    cfg = server_config(tiny_bundle, stream_idle_s=0.4)
    image = png()
    request = oip.ModelInferRequest(
        inputs=[oip.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(image).to_bytes(4, "little") + image],
    )

    def every(seconds: float, n: int):
        for _ in range(n):
            time.sleep(seconds)
            yield request

    with Server(cfg) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        busy = list(inference.ModelStreamInfer(every(0.1, 8), timeout=30))
        assert len(busy) == 8 and not any(r.error_message for r in busy)
        stop = threading.Event()
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(inference.ModelStreamInfer(silent(stop), timeout=30))
        stop.set()
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert 0.4 <= time.monotonic() - start < 0.4 + 2
        assert srv.streams.open_streams == 0
