"""Shutdown: calls accepted before it began are answered in full, later ones are refused UNAVAILABLE,
nothing outlives the grace period, and the metrics count what the callers saw.

What a test can hold still runs in-process behind a gated model (serving/server.py's `session=`),
so that which calls are in flight when the server stops is decided by the test, not by timing.
`serving serve` as a process under load checks the signal handling and the exit code, and asserts
only what holds however the calls and the signal interleave."""

from __future__ import annotations

import io
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from conftest import serve_args, serve_argv, served_ports, server_config
from PIL import Image
from test_serving_server import GatedSession, wait_until

from serving.bundle.manifest import read_manifest
from serving.bundle.session import ModelSession
from serving.client import Client
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.server import Server

CLIENTS = 6
GRACE_S = 20.0  # longer than any call here takes, so that only a call that hangs reaches it
# What serving/engine/admission.py answers a call that arrives once shutdown began (README, "Status codes").
REFUSED = "the server is shutting down; retry on another replica"


def png(seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def assert_full_answer(reply: pb.PredictResponse, manifest) -> None:
    """A reply with TTA asked for: every view ran, one probability per class, a top prediction."""
    assert list(reply.tta_views) == [v.name for v in manifest.tta.views]
    assert len(reply.probabilities) == len(manifest.classes)
    assert sum(reply.probabilities) == pytest.approx(1, abs=1e-4)
    assert reply.predictions and reply.predictions[0].label in manifest.classes


def counted_requests(srv: Server) -> Counter:
    """classifier_requests_total by (method, code), as the server's metrics have it."""
    return Counter(
        {
            (s.labels["method"], s.labels["code"]): int(s.value)
            for family in srv.metrics.registry.collect()
            for s in family.samples
            if s.name == "classifier_requests_total" and s.value
        }
    )


def sample(srv: Server, name: str, **labels) -> float:
    return srv.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def session(tiny_bundle):
    return ModelSession(tiny_bundle, device="cpu")


@pytest.fixture
def gated_server(tiny_bundle, session):
    """A started server whose model the test holds busy; stopped (gate open) at the end whatever happened."""
    gated = GatedSession(session)
    # One model run at a time: holding the gate holds the whole model, and later calls queue behind it.
    config = server_config(tiny_bundle, max_delay_us=0, grace_s=GRACE_S, model_instances=1)
    srv = Server(config, session=gated)
    try:
        yield srv, gated
    finally:
        gated.release.set()
        srv.stop(0)


def hold_calls_in_flight(srv: Server, gated: GatedSession, client: Client, n: int) -> list[grpc.Future]:
    """n Predict calls that the server has accepted and cannot finish until gated.release is set:
    the first one runs (held in the model), the others wait in the batcher's queue."""
    gated.hold()
    calls = [client.stub.Predict.future(pb.PredictRequest(image=png(0), tta=True), timeout=2 * GRACE_S)]
    assert gated.entered.wait(10)
    calls += [
        client.stub.Predict.future(pb.PredictRequest(image=png(i), tta=True), timeout=2 * GRACE_S) for i in range(1, n)
    ]
    wait_until(lambda: srv.batcher.depth == n - 1)
    return calls


def start_stopping(srv: Server, client: Client, seen: Counter) -> threading.Thread:
    """Begin `srv.stop()` in a thread; return once it refuses new calls. ModelInfo never waits for
    the model, so asking it until it is refused tells when refusing began without holding anything."""
    stopper = threading.Thread(target=srv.stop, name="stopper")
    stopper.start()

    def refused() -> bool:
        try:
            client.model_info()
            seen["ModelInfo", "OK"] += 1
            return False
        except grpc.RpcError as e:
            assert (e.code(), e.details()) == (grpc.StatusCode.UNAVAILABLE, REFUSED)
            seen["ModelInfo", "UNAVAILABLE"] += 1
            return True

    wait_until(refused)
    return stopper


def grace_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "grace period" in r.getMessage()]


class TestStopWithCallsInFlight:
    def test_accepted_calls_finish_later_ones_are_refused_and_the_metrics_agree(self, gated_server, caplog):
        srv, gated = gated_server
        manifest = gated.manifest
        caplog.set_level(logging.WARNING, logger="serving")
        seen: Counter = Counter()  # (method, code) of every call, as the caller got it
        with Client(f"127.0.0.1:{srv.port}", timeout=2 * GRACE_S) as c:
            accepted = hold_calls_in_flight(srv, gated, c, 3)
            stopper = start_stopping(srv, c, seen)

            assert c.health() == "NOT_SERVING"
            for method, call in [
                ("Predict", lambda: c.predict(png(9))),
                ("PredictBatch", lambda: c.predict_batch([png(9)])),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, REFUSED)
                seen[method, "UNAVAILABLE"] += 1
            assert stopper.is_alive(), "stop returned while accepted calls were still in flight"

            gated.release.set()
            for call in accepted:
                assert_full_answer(call.result(timeout=GRACE_S), manifest)
                seen["Predict", "OK"] += 1
        stopper.join(GRACE_S)
        assert not stopper.is_alive(), f"stop outlived its {GRACE_S:.0f}s grace period"
        assert not grace_warnings(caplog)

        assert counted_requests(srv) == seen
        assert sample(srv, "classifier_in_flight_requests") == 0
        assert all(sample(srv, "classifier_calls_not_run_total", method=m) == 0 for m, _ in seen)

    def test_clients_that_retry_at_once_do_not_hold_stop_open(self, gated_server, caplog):
        """Refused calls are not calls in progress: clients that retry at once (as a load balancer's
        would) must not keep the server stopping until its grace period ends."""
        srv, gated = gated_server
        caplog.set_level(logging.WARNING, logger="serving")
        target = f"127.0.0.1:{srv.port}"
        stop_knocking = threading.Event()
        codes: Counter = Counter()
        lock = threading.Lock()

        def knock(seed: int) -> None:
            with Client(target, timeout=5) as c:
                while not stop_knocking.is_set():
                    try:
                        c.predict(png(seed), tta=False)
                        code = "OK"
                    except grpc.RpcError as e:
                        code = e.code().name if e.details() != REFUSED else "refused"
                    with lock:
                        codes[code] += 1

        with Client(target, timeout=2 * GRACE_S) as c:
            [accepted] = hold_calls_in_flight(srv, gated, c, 1)
            stopper = start_stopping(srv, c, Counter())
            knockers = [threading.Thread(target=knock, args=(s,), daemon=True) for s in range(CLIENTS)]
            for t in knockers:
                t.start()
            try:
                wait_until(lambda: codes["refused"] >= 10 * CLIENTS)  # a retry storm while stop waits
                assert stopper.is_alive()
                gated.release.set()
                assert accepted.result(timeout=GRACE_S).predictions
                stopper.join(GRACE_S)
            finally:
                stop_knocking.set()
                for t in knockers:
                    t.join(30)
        assert not stopper.is_alive(), f"stop outlived its {GRACE_S:.0f}s grace period"
        assert not grace_warnings(caplog), "refused calls held shutdown open until the grace period ended"
        # Once it stopped listening: UNAVAILABLE (nothing listens), or CANCELLED for a call that reached
        # gRPC in the instant it stopped (grpc/grpc#41785); both as the README's status table says.
        assert set(codes) <= {"refused", "UNAVAILABLE", "CANCELLED"}, codes


# --- `serving serve` as a process


@dataclass
class Call:
    started: float  # time.monotonic()
    ended: float
    code: str  # grpc.StatusCode name
    reply: pb.PredictResponse | None


@pytest.fixture
def serving_process(tiny_bundle):
    argv = serve_argv(tiny_bundle, "--drain-s", "2", "--grace-s", str(GRACE_S), "--workers", "8")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = served_ports(line).get("grpc")
        assert port, line + proc.stderr.read()
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_under_load_answers_every_accepted_call_and_exits_0(serving_process, tiny_bundle):
    proc, target = serving_process
    manifest = read_manifest(tiny_bundle)
    calls: list[Call] = []
    lock = threading.Lock()
    under_load = threading.Event()

    def hammer(seed: int) -> None:
        """Call until the server stops answering: each client's last call is its first refusal."""
        with Client(target, timeout=2 * GRACE_S) as c:
            for i in range(100_000):
                started, reply = time.monotonic(), None
                try:
                    reply = c.predict(png(seed * 1000 + i % 5), tta=True)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    calls.append(Call(started, time.monotonic(), code, reply))
                    if len(calls) >= 30:
                        under_load.set()
                if code != "OK":
                    return

    threads = [threading.Thread(target=hammer, args=(s,), daemon=True) for s in range(CLIENTS)]
    for t in threads:
        t.start()
    assert under_load.wait(60), "the server answered too few calls before the signal"

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    with Client(target, timeout=10) as c:
        # --drain-s 2: still reachable, telling load balancers to go away (once the signal is handled).
        wait_until(lambda: c.health() == "NOT_SERVING", timeout=10)

    for t in threads:
        t.join(2 + GRACE_S + 10)
    assert not any(t.is_alive() for t in threads), "a call hung after SIGTERM"
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-3000:]

    for call in calls:
        if call.code == "OK":
            assert_full_answer(call.reply, manifest)
        elif call.started < signalled:
            pytest.fail(f"a call made before SIGTERM, so accepted before shutdown began, ended {call.code}")
        else:
            # Refused by the server, or made once nothing listened: UNAVAILABLE. CANCELLED: the call
            # reached gRPC in the instant it stopped listening (grpc/grpc#41785; README, "Status codes").
            assert call.code in {"UNAVAILABLE", "CANCELLED"}, call.code
        assert call.ended - call.started < GRACE_S, f"a call took {call.ended - call.started:.1f}s"
    assert any(call.code == "OK" and call.started > signalled for call in calls), "no call answered while draining"


# `serving serve` as its console script starts it, signalled while it is still importing. The process
# signals itself as each import of grpc, numpy or onnxruntime begins: the instant is then certain on
# any machine, where a signal sent from here after a sleep would race with the imports.
SIGNAL_DURING_IMPORTS = """
import os, signal, sys
signum = getattr(signal, sys.argv.pop(1))

class SignalDuringImport:
    def find_spec(self, name, path=None, target=None):
        if name in ("grpc", "numpy", "onnxruntime"):
            os.kill(os.getpid(), signum)
        return None

sys.meta_path.insert(0, SignalDuringImport())
sys.argv[0] = "serving"
from serving.cli import main
sys.exit(main())
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
class TestSignalsWhileStarting:
    def start(self, tmp_path, tiny_bundle, signame: str) -> subprocess.Popen:
        repo = tmp_path / "repo"
        shutil.copytree(tiny_bundle, repo / "colours" / "1")
        flags = ("--poll-s", "0", "--drain-s", "0")
        argv = [
            sys.executable,
            "-c",
            SIGNAL_DURING_IMPORTS,
            signame,
            "serve",
            *serve_args(repo, *flags, repository=True),
        ]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def test_sighup_is_survived_and_the_server_comes_up(self, tmp_path, tiny_bundle):
        """The README says to send SIGHUP after publishing a version, whenever the server started."""
        proc = self.start(tmp_path, tiny_bundle, "SIGHUP")
        try:
            line = proc.stdout.readline()
            port = served_ports(line).get("grpc")
            assert port, f"exit code {proc.wait(30)}: {proc.stderr.read()[-3000:]}"
            with Client(f"127.0.0.1:{port}", timeout=30) as c:
                assert c.health() == "SERVING"
                assert c.model_info().model_version == "1"
            proc.send_signal(signal.SIGHUP)  # and once it serves: a scan, nothing else
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, proc.stderr.read()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    @pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
    def test_sigterm_or_sigint_exits_0_without_serving(self, tmp_path, tiny_bundle, signame):
        proc = self.start(tmp_path, tiny_bundle, signame)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-3000:]
        assert "serving on" not in out
        assert f"received {signame}" in err
