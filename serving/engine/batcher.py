"""Dynamic batching: requests from concurrent calls grouped into one model run, on one worker thread.

The batch step follows the contract of Triton's python backend (`execute(requests) -> responses`):
it takes a list of requests and returns a list of the same length, holding for each request either
its result or the exception that failed it, so that one bad request never fails its neighbours.

A batch closes when it holds `max_batch_views` rows (a request's size is `len(request)`, its number
of TTA views) or when its oldest request has waited `max_delay_us` microseconds, whichever comes
first, as in Triton's `max_queue_delay_microseconds`; but it waits only while more work is on its
way (callers inside `arriving()`, decoding their images), so a lone call runs at once instead of
paying the delay for company that cannot come. The queue is bounded: `submit` refuses work
at once when it is full (QueueFull) instead of letting latency grow without limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("serving.engine.batcher")


class QueueFull(Exception):
    """The queue holds as many requests as it may; retry later or on another replica."""


class DeadlineExpired(Exception):
    """A request's deadline passed while it waited in the queue, so it was not run."""


class ShuttingDown(Exception):
    """The batcher is closed or closing and takes no more work."""


# execute(requests) -> one result or exception per request, same length and order.
Execute = Callable[[list[Any]], Sequence[Any]]


class Arrival:
    """A caller on its way to `submit`, counted from `Batcher.arriving()` until it submits or gives up."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


@dataclass(frozen=True)
class BatchStats:
    """What one model run did; handed to `on_batch` for metrics, before any caller is answered."""

    queue_waits: list[float]  # seconds each request waited, from submit to the start of the run
    views: int  # rows in the batch
    seconds: float  # time spent in execute


@dataclass
class _Pending:
    request: Any
    size: int
    deadline: float | None  # on the batcher's clock
    enqueued: float
    future: Future


class Batcher:
    """`futures = batcher.submit([views_a, views_b], deadline=...)`; each future resolves to one result.

    Callers may `future.cancel()` a request they stopped waiting for; it is then skipped, not run.
    """

    def __init__(
        self,
        execute: Execute,
        *,
        max_batch_views: int,
        max_delay_us: int,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        instances: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_batch_views < 1 or max_queue < 1 or max_delay_us < 0 or instances < 1:
            raise ValueError("max_batch_views, max_queue and instances must be at least 1, max_delay_us at least 0")
        self._execute = execute
        self.max_batch_views = max_batch_views
        self.max_delay_s = max_delay_us / 1e6
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._arriving = 0  # callers inside arriving() that have not submitted yet
        self.clock = clock
        self._queue: deque[_Pending] = deque()
        self._queued_views = 0
        self._closed = False
        self._cond = threading.Condition()
        # `instances` threads each take a batch and run it, so that up to that many runs go at once, as
        # Triton's instance_group count: one run's idle moments (its operators' serial parts) are another's
        # working time.
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{i}", daemon=True) for i in range(instances)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting the one being run)."""
        with self._cond:
            return len(self._queue)

    @property
    def closed(self) -> bool:
        """True once `close` began: no more work is taken."""
        with self._cond:
            return self._closed

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Announce work on its way: while the block runs and until `submit(..., arrival=)` takes the
        Arrival it yields, a partial batch waits (up to the delay) for it. Work not announced this way is
        still taken; only a batch with nothing on its way runs without waiting."""
        arrival = Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            with self._cond:
                if not arrival.done:  # the caller gave up before submitting: nothing more to wait for
                    arrival.done = True
                    self._arriving -= 1
                    self._cond.notify()

    def submit(
        self, requests: Sequence[Any], *, deadline: float | None = None, arrival: Arrival | None = None
    ) -> list[Future]:
        """Queue requests (all or none); `deadline` is on `clock`. Raises QueueFull or ShuttingDown.
        `arrival`: the one `arriving()` gave this caller, now here (even when the requests are refused)."""
        now = self.clock()
        with self._cond:
            if arrival is not None and not arrival.done:
                arrival.done = True
                self._arriving -= 1
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if len(self._queue) + len(requests) > self.max_queue:
                raise QueueFull(
                    f"server busy: {len(self._queue)} images are waiting for the model and this call brings "
                    f"{len(requests)} more (limit {self.max_queue}); retry with backoff"
                )
            pending = [_Pending(r, max(1, len(r)), deadline, now, Future()) for r in requests]
            self._queue.extend(pending)
            self._queued_views += sum(p.size for p in pending)
            self._cond.notify()
        return [p.future for p in pending]

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work, let the batches being run finish, fail whatever is still queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        with self._cond:
            left, self._queue = list(self._queue), deque()
            self._queued_views = 0
        for p in left:
            if p.future.set_running_or_notify_cancel():
                p.future.set_exception(ShuttingDown("the server shut down before this image was run"))

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                # Wait for the batch to fill, but never keep the oldest request longer than max_delay, and
                # not at all when no more work is on its way. Another instance may take the queue meanwhile.
                while not self._closed and self._queue and self._queued_views < self.max_batch_views:
                    remaining = self._queue[0].enqueued + self.max_delay_s - self.clock()
                    if remaining <= 0 or self._arriving == 0:
                        break
                    self._cond.wait(remaining)
                if self._closed:
                    return None
                if self._queue:
                    break
            batch: list[_Pending] = []
            views = 0
            # A request larger than a whole batch still runs, alone.
            while self._queue and (not batch or views + self._queue[0].size <= self.max_batch_views):
                p = self._queue.popleft()
                batch.append(p)
                views += p.size
            self._queued_views -= views
            if self._queue:  # work left over: wake another instance for it
                self._cond.notify()
            return batch

    def _run(self, batch: list[_Pending]) -> None:
        now = self.clock()
        live = []
        for p in batch:
            if not p.future.set_running_or_notify_cancel():
                continue  # its caller stopped waiting
            if p.deadline is not None and p.deadline <= now:
                p.future.set_exception(
                    DeadlineExpired(f"the deadline passed after {now - p.enqueued:.3f}s in the queue")
                )
                continue
            live.append(p)
        if not live:
            return
        start = self.clock()
        try:
            results = list(self._execute([p.request for p in live]))
            if len(results) != len(live):
                raise RuntimeError(f"batch step returned {len(results)} results for {len(live)} requests")
        except Exception as e:  # the whole step failed: every request in it carries the error
            results = [e] * len(live)
        seconds = self.clock() - start
        if self._on_batch is not None:
            # Before the callers are answered, so that metrics scraped after a reply include this batch.
            try:
                self._on_batch(BatchStats([start - p.enqueued for p in live], sum(p.size for p in live), seconds))
            except Exception:  # a metrics failure must not leave callers waiting forever
                log.exception("on_batch failed")
        for p, r in zip(live, results, strict=True):
            if isinstance(r, BaseException):
                p.future.set_exception(r)
            else:
                p.future.set_result(r)
