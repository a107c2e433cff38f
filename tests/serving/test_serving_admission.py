"""serving.engine.admission: one call's guard and the shutdown gate, and the per-call pixel limit, without a network.

Threads meet at explicit events; the only clock that moves is time.monotonic() in deadline cases,
and those wait on a deadline already in the past, so nothing here depends on the machine's speed.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from serving.bundle.manifest import Preprocessing
from serving.bundle.preprocess import ImageError
from serving.engine.admission import Admission, CallGuard
from serving.engine.decode_worker import Job, call_pixels_admit
from serving.engine.errors import CallFailed


def guard(*, deadline=None, active=True, limit=100) -> CallGuard:
    return CallGuard(deadline=deadline, is_active=lambda: active, max_pixels=limit)


def admit(call_pixels: int, max_call_pixels: int):
    job = Job(
        preprocessing=Preprocessing(input_size=8, resize_size=8),
        views=[],
        formats=["PNG"],
        max_pixels=10**9,
        call_pixels=call_pixels,
        max_call_pixels=max_call_pixels,
    )
    seen: list[int] = []
    return call_pixels_admit(job, seen), seen


class TestCallGuard:
    def test_pixels_per_call_are_refused_past_the_calls_total(self):
        hook, seen = admit(60, 100)
        with hook(40):  # exactly the limit
            pass
        with (
            pytest.raises(ImageError, match="bring the call's total to 110, over the limit of 100 pixels per call"),
            hook(50),
        ):
            pass
        assert seen == [40, 50]

    def test_a_passed_deadline_ends_the_call(self):
        g = guard(deadline=time.monotonic() - 1)
        with pytest.raises(CallFailed) as err:
            g.check()
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    def test_a_caller_that_went_away_ends_the_call(self):
        with pytest.raises(CallFailed) as err:
            guard(active=False).check()
        assert err.value.code == grpc.StatusCode.CANCELLED


class TestAdmission:
    def test_close_returns_once_the_calls_in_progress_are_done(self):
        gate = Admission()
        inside, leave = threading.Event(), threading.Event()

        def call():
            with gate.admitted():
                inside.set()
                assert leave.wait(10)

        t = threading.Thread(target=call)
        t.start()
        assert inside.wait(10)
        closed = []
        closer = threading.Thread(target=lambda: closed.append(gate.close(30, settle=0)))
        closer.start()
        with pytest.raises(CallFailed), gate.admitted():  # refused from the moment closing begins
            pass
        assert closed == []
        leave.set()
        closer.join(10)
        assert closed == [True]

    def test_refused_calls_do_not_hold_shutdown_open(self):
        gate = Admission()
        stop = threading.Event()

        def knock():  # a client that retries at once, as a busy load balancer's would
            while not stop.is_set():
                try:
                    with gate.admitted():
                        pass
                except CallFailed:
                    pass

        knockers = [threading.Thread(target=knock) for _ in range(2)]
        for t in knockers:
            t.start()
        start = time.monotonic()
        assert gate.close(timeout=5, settle=0.1)
        took = time.monotonic() - start
        stop.set()
        for t in knockers:
            t.join(10)
        assert took < 2.5, f"close waited {took:.1f}s of its 5s while nothing was in progress"
