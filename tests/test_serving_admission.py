"""serving.admission: the decode budget, one call's guard and the shutdown gate, without a network.

Threads meet at explicit events; the only clock that moves is time.monotonic() in deadline cases,
and those wait on a deadline already in the past, so nothing here depends on the machine's speed.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from serving.admission import Admission, CallFailed, CallGuard, PixelBudget
from serving.preprocess import ImageError


def never_gives_up() -> None:
    pass


class TestPixelBudget:
    def test_a_second_holder_waits_until_the_first_releases(self):
        budget = PixelBudget(100)
        release_first, second_in = threading.Event(), threading.Event()

        def first():
            with budget.hold(60, never_gives_up):
                assert release_first.wait(10)

        def second():
            with budget.hold(60, never_gives_up):
                second_in.set()

        a = threading.Thread(target=first)
        a.start()
        while budget.used != 60:
            time.sleep(0.001)
        b = threading.Thread(target=second)
        b.start()
        assert not second_in.wait(0.2), "60 + 60 pixels fit a budget of 100"
        release_first.set()
        assert second_in.wait(10)
        a.join(10), b.join(10)
        assert budget.used == 0

    def test_an_image_larger_than_the_budget_runs_alone(self):
        budget = PixelBudget(100)
        with budget.hold(10_000, never_gives_up):
            assert budget.used == 100

    def test_giving_up_while_waiting_holds_nothing(self):
        budget = PixelBudget(100)
        checks = []

        def give_up():
            checks.append(1)
            raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "late")

        with budget.hold(100, never_gives_up):
            with pytest.raises(CallFailed, match="late"), budget.hold(1, give_up):
                pass
            assert budget.used == 100 and checks == [1]
        assert budget.used == 0

    def test_released_after_an_error_in_the_block(self):
        budget = PixelBudget(100)
        with pytest.raises(MemoryError), budget.hold(50, never_gives_up):
            raise MemoryError
        assert budget.used == 0


def guard(*, deadline=None, active=True, limit=100, pixels=1000) -> CallGuard:
    return CallGuard(deadline=deadline, is_active=lambda: active, budget=PixelBudget(pixels), max_pixels=limit)


class TestCallGuard:
    def test_pixels_per_call_add_up_over_images(self):
        g = guard(limit=100)
        with g.admit(60):
            pass
        with (
            pytest.raises(ImageError, match="bring the call's total to 110, over the limit of 100 pixels per call"),
            g.admit(50),
        ):
            pass
        with g.admit(40):  # a smaller one still fits
            pass
        assert g.pixels == 100

    def test_a_passed_deadline_ends_the_call(self):
        g = guard(deadline=time.monotonic() - 1)
        with pytest.raises(CallFailed) as err:
            g.check()
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    def test_a_caller_that_went_away_ends_the_call(self):
        with pytest.raises(CallFailed) as err, guard(active=False).admit(1):
            pass
        assert err.value.code == grpc.StatusCode.CANCELLED

    def test_waiting_for_the_budget_stops_at_the_deadline(self):
        g = CallGuard(deadline=time.monotonic() + 0.05, is_active=lambda: True, budget=PixelBudget(10), max_pixels=100)
        with g._budget.hold(10, never_gives_up), pytest.raises(CallFailed) as err, g.admit(5):
            pass
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


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
