"""Calls gRPC answers before our handlers run are counted too, and hostile bytes stay out of the log."""

from __future__ import annotations

import io
import random
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import serve_argv, served_ports, server_config
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_serving_server import GatedSession, png, wait_until

from serving.bundle.session import ModelSession
from serving.client import Client
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.server import Server


def requests_total(srv: Server, method: str, code: str) -> float:
    return srv.metrics.registry.get_sample_value("classifier_requests_total", {"method": method, "code": code}) or 0


def test_calls_over_max_concurrent_calls_are_counted(tiny_bundle):
    gated = GatedSession(ModelSession(tiny_bundle, device="cpu"))
    cfg = server_config(tiny_bundle, max_concurrent_calls=2, max_delay_us=0)
    with Server(cfg, session=gated) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        gated.hold()
        held = [c.stub.Predict.future(pb.PredictRequest(image=png(seed=i)), timeout=30) for i in range(2)]
        assert gated.entered.wait(10)
        wait_until(lambda: srv.metrics.in_flight._value.get() == 2)
        refused = 0
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                c.predict(png())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused += 1
        assert requests_total(srv, "Predict", "RESOURCE_EXHAUSTED") == refused
        gated.release.set()
        assert all(f.result().predictions for f in held)
        assert requests_total(srv, "Predict", "OK") == 2


def test_a_message_over_the_size_limit_is_counted_as_not_run(tiny_bundle):
    cfg = server_config(tiny_bundle, max_image_bytes=4096, max_message_bytes=8192)
    with Server(cfg) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                c.predict(b"\xff" * 10_000)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_until(
            lambda: srv.metrics.registry.get_sample_value("classifier_calls_not_run_total", {"method": "Predict"}) == 3
        )


def test_a_malformed_request_is_invalid_argument_without_a_traceback(tiny_bundle, caplog):
    cfg = server_config(tiny_bundle)
    with Server(cfg) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        raw = channel.unary_unary("/classifier.v1.Classifier/Predict")  # bytes in, bytes out
        with caplog.at_level("DEBUG"), pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)  # field 1 claims 4 GB of bytes
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the request is not a valid Predict message" in err.value.details()
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert requests_total(srv, "Predict", "INVALID_ARGUMENT") == 1


def hostile_tiffs(n: int) -> list[bytes]:
    """Byte-mutated TIFFs: libtiff complains about them on stderr, Pillow with warnings and logs."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
        buf, "TIFF", compression="tiff_deflate"
    )
    rng = random.Random(1)
    out = []
    for _ in range(n):
        data = bytearray(buf.getvalue())
        for _ in range(3):
            data[rng.randrange(8, len(data))] = rng.randrange(256)
        out.append(bytes(data))
    return out


def test_decoder_warnings_are_counted_not_logged(tiny_bundle):
    """As a process, since libtiff writes to the stderr file descriptor itself."""
    argv = serve_argv(tiny_bundle, "--workers", "2", metrics=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        ports = served_ports(line)
        assert "metrics" in ports, line + proc.stderr.read()
        with Client(f"127.0.0.1:{ports['grpc']}", timeout=30) as c:
            codes = {r.status.code for r in c.predict_batch(hostile_tiffs(60)).results}
            assert codes <= {0, grpc.StatusCode.INVALID_ARGUMENT.value[0]}
            assert c.predict(png()).predictions
        text = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).read().decode()
        counts = {
            s.labels["source"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "classifier_decoder_warnings_total"
        }
        assert counts.get("libtiff", 0) > 0 and counts.get("warning", 0) > 0, counts
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    noise = [line for line in err.splitlines() if "serving INFO" not in line]
    assert not noise, "decoder messages reached the log:\n" + "\n".join(noise[:10])
