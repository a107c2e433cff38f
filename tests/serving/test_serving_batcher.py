"""The batcher without a model or a network: lists of views in, one result or error per request out."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.engine.batcher import Batcher, BatchStats, DeadlineExpired, QueueFull, ShuttingDown


class Step:
    """A batch step that records the sizes of every batch it gets and can be held busy.

    Each request is an array whose rows are views; the result is the sum of its values, so a test
    can tell which request got which answer. A request holding -1 fails alone, as a bad item."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()

    def __call__(self, requests):
        self.batches.append([len(r) for r in requests])
        self.entered.set()
        assert self.release.wait(10), "test never released the batch step"
        return [ValueError("bad item") if (r == -1).any() else float(r.sum()) for r in requests]


def views(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 2), value, np.float32)


@pytest.fixture
def step():
    return Step()


def make(step, *, max_batch_views=4, max_delay_us=0, max_queue=16, **kw) -> Batcher:
    return Batcher(step, max_batch_views=max_batch_views, max_delay_us=max_delay_us, max_queue=max_queue, **kw)


@pytest.fixture
def closing():
    made = []
    yield made.append
    for b in made:
        b.close(timeout=10)


class TestBatching:
    def test_requests_queued_behind_a_busy_step_are_grouped_up_to_max_views(self, step, closing):
        b = make(step, max_batch_views=4)
        closing(b)
        step.hold()
        [first] = b.submit([views(2, 1.0)])
        assert step.entered.wait(10)  # the step is busy with the first request alone
        rest = b.submit([views(2, 2.0), views(2, 3.0), views(2, 4.0)])
        assert b.depth == 3
        step.release.set()
        assert [f.result(10) for f in [first, *rest]] == [4.0, 8.0, 12.0, 16.0]
        assert step.batches == [[2], [2, 2], [2]]

    def test_a_full_batch_runs_without_waiting_for_the_delay(self, step, closing):
        b = make(step, max_batch_views=4, max_delay_us=60_000_000)
        closing(b)
        start = time.monotonic()
        futures = b.submit([views(2), views(2)])
        assert [f.result(10) for f in futures] == [4.0, 4.0]
        assert step.batches == [[2, 2]] and time.monotonic() - start < 10

    def test_a_partial_batch_waits_for_a_caller_on_its_way(self, step, closing):
        b = make(step, max_batch_views=100, max_delay_us=60_000_000)
        closing(b)
        with b.arriving() as arrival:
            [first] = b.submit([views(3)])
            time.sleep(0.2)
            assert step.batches == [] and not first.done()  # waiting for the caller still decoding
            [second] = b.submit([views(2)], arrival=arrival)
            assert first.result(10) == 6.0 and second.result(10) == 4.0
        assert step.batches == [[3, 2]]

    def test_the_wait_for_a_caller_on_its_way_ends_at_the_delay(self, step, closing):
        b = make(step, max_batch_views=100, max_delay_us=50_000)
        closing(b)
        with b.arriving():
            start = time.monotonic()
            [f] = b.submit([views(3)])
            assert f.result(10) == 6.0
            assert time.monotonic() - start >= 0.05
        assert step.batches == [[3]]

    def test_a_lone_request_runs_without_waiting_for_the_delay(self, step, closing):
        # Nothing is on its way: waiting the delay would only add latency.
        b = make(step, max_batch_views=100, max_delay_us=60_000_000)
        closing(b)
        [f] = b.submit([views(3)])
        assert f.result(10) == 6.0 and step.batches == [[3]]

    def test_a_caller_that_gives_up_on_its_way_ends_the_wait(self, step, closing):
        b = make(step, max_batch_views=100, max_delay_us=60_000_000)
        closing(b)
        with b.arriving():
            [f] = b.submit([views(3)])
            time.sleep(0.1)
            assert not f.done()
        # The caller left without submitting (its image was bad): the batch runs now, not in a minute.
        assert f.result(10) == 6.0 and step.batches == [[3]]

    def test_a_refused_submit_counts_as_arrived(self, step, closing):
        b = make(step, max_batch_views=100, max_delay_us=60_000_000, max_queue=1)
        closing(b)
        with b.arriving() as arrival:
            [f] = b.submit([views(3)])
            with pytest.raises(QueueFull):
                b.submit([views(1), views(1)], arrival=arrival)
            assert f.result(10) == 6.0  # nothing else is on its way

    def test_a_request_larger_than_a_batch_runs_alone(self, step, closing):
        b = make(step, max_batch_views=4)
        closing(b)
        [f] = b.submit([views(9)])
        assert f.result(10) == 18.0 and step.batches == [[9]]

    def test_stats_are_reported_before_callers_are_answered(self, step, closing):
        seen: list[BatchStats] = []
        b = make(step, on_batch=seen.append)
        closing(b)
        [f] = b.submit([views(3)])
        f.result(10)
        assert len(seen) == 1 and seen[0].views == 3 and len(seen[0].queue_waits) == 1 and seen[0].seconds >= 0


class TestErrors:
    def test_a_failing_item_fails_only_itself(self, step, closing):
        b = make(step, max_batch_views=8)
        closing(b)
        step.hold()
        b.submit([views(1)])
        assert step.entered.wait(10)
        good, bad, good2 = b.submit([views(2), views(2, -1.0), views(2)])
        step.release.set()
        assert good.result(10) == 4.0 and good2.result(10) == 4.0
        with pytest.raises(ValueError, match="bad item"):
            bad.result(10)
        assert step.batches[-1] == [2, 2, 2]

    @pytest.mark.parametrize("failure", ["raises", "wrong length"])
    def test_a_failing_step_fails_every_request_in_its_batch_and_the_batcher_goes_on(self, failure, closing):
        calls = []

        def step(requests):
            calls.append(len(requests))
            if len(calls) == 1:
                if failure == "raises":
                    raise RuntimeError("graph exploded")
                return [1.0]
            return [0.0] * len(requests)

        b = Batcher(step, max_batch_views=8, max_delay_us=0, max_queue=8)
        closing(b)
        a, c = b.submit([views(1), views(1)])
        for f in (a, c):
            with pytest.raises(RuntimeError, match="graph exploded" if failure == "raises" else "1 results for 2"):
                f.result(10)
        [d] = b.submit([views(1)])
        assert d.result(10) == 0.0

    def test_queue_full_is_refused_at_once_and_all_or_nothing(self, step, closing):
        b = make(step, max_batch_views=1, max_queue=2)
        closing(b)
        step.hold()
        b.submit([views(1)])
        assert step.entered.wait(10)  # running: no longer counts as queued
        b.submit([views(1)])
        with pytest.raises(QueueFull, match=r"1 images are waiting .* brings 2 more \(limit 2\)"):
            b.submit([views(1), views(1)])
        assert b.depth == 1  # nothing of the refused call was queued
        b.submit([views(1)])
        with pytest.raises(QueueFull):
            b.submit([views(1)])
        step.release.set()

    def test_an_expired_request_is_not_run(self, step, closing):
        clock = FakeClock()
        b = make(step, max_batch_views=8, clock=clock)
        closing(b)
        step.hold()
        b.submit([views(1)])
        assert step.entered.wait(10)
        late, on_time = b.submit([views(1)], deadline=clock() + 1)[0], b.submit([views(1)], deadline=clock() + 100)[0]
        clock.now += 10
        step.release.set()
        with pytest.raises(DeadlineExpired, match="deadline passed"):
            late.result(10)
        assert on_time.result(10) == 2.0
        assert step.batches == [[1], [1]]  # the late one never reached the step

    def test_a_cancelled_request_is_not_run(self, step, closing):
        b = make(step, max_batch_views=8)
        closing(b)
        step.hold()
        b.submit([views(1)])
        assert step.entered.wait(10)
        gone, kept = b.submit([views(3), views(1)])
        assert gone.cancel()
        step.release.set()
        assert kept.result(10) == 2.0
        assert step.batches == [[1], [1]]


class TestClose:
    def test_close_finishes_the_running_batch_and_fails_the_queued(self, step):
        b = make(step, max_batch_views=1)
        step.hold()
        [running] = b.submit([views(1)])
        assert step.entered.wait(10)
        [queued] = b.submit([views(1)])
        closer = threading.Thread(target=b.close, kwargs={"timeout": 10})
        closer.start()
        wait_until(lambda: b.closed)
        step.release.set()
        closer.join(10)
        assert running.result(10) == 2.0
        with pytest.raises(ShuttingDown):
            queued.result(10)
        with pytest.raises(ShuttingDown, match="shutting down"):
            b.submit([views(1)])


class Overlap:
    """A batch step that counts how many of its calls run at the same moment; each takes 50 ms."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0

    def __call__(self, requests):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        return [float(r.sum()) for r in requests]


class TestInstances:
    @pytest.mark.parametrize("instances", [1, 2, 3])
    def test_up_to_instances_batches_run_at_once(self, instances, closing):
        step = Overlap()
        b = make(step, max_batch_views=1, max_queue=32, instances=instances)
        closing(b)
        futures = b.submit([views(1, float(i)) for i in range(12)])
        assert [f.result(10) for f in futures] == [2.0 * i for i in range(12)]
        assert step.most == instances

    def test_close_lets_every_running_batch_finish(self, step):
        b = make(step, max_batch_views=1, instances=2)
        step.hold()
        running = b.submit([views(1), views(1)])
        wait_until(lambda: len(step.batches) == 2)  # both instances are inside the step
        closer = threading.Thread(target=b.close, kwargs={"timeout": 10})
        closer.start()
        wait_until(lambda: b.closed)
        step.release.set()
        closer.join(10)
        assert not closer.is_alive() and [f.result(10) for f in running] == [2.0, 2.0]


def wait_until(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.001)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
