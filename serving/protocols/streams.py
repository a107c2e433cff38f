"""Streams bounded: how many are open at once, and how long one may wait for its next request.

gRPC's threaded server gives every call a handler thread for as long as it lasts, and a stream
lasts as long as its caller likes: 16 streams that open and send nothing (ModelStreamInfer, a
health Watch, a reflection session) would hold all 16 threads, and Predict and the health check
would time out behind them. So at most `limit` streams are open at once, which leaves the other
threads to unary calls whatever streams are opened; past it a new stream is refused at once with
RESOURCE_EXHAUSTED. A stream that waits longer than `idle_s` for its next request is cancelled, so
that idle callers cannot keep those places either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

log = logging.getLogger("serving")

T = TypeVar("T")


class _Stream:
    __slots__ = ("cancel", "method", "waiting_since")

    def __init__(self, method: str, cancel: Callable[[], object]):
        self.method = method
        self.cancel = cancel
        self.waiting_since: float | None = None  # when it began to wait for a request; None while working


class StreamLimiter:
    """Counts open streams against `limit`; cancels those idle past `idle_s` (0: never)."""

    def __init__(self, limit: int, idle_s: float, *, on_idle: Callable[[str], None] = lambda method: None):
        self.limit = limit
        self.idle_s = idle_s
        self.on_idle = on_idle
        self._lock = threading.Lock()
        self._open: set[_Stream] = set()
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._open)

    def open(self, method: str, context: grpc.ServicerContext) -> _Stream | None:
        """A place for a new stream, or None when `limit` are open."""
        with self._lock:
            if len(self._open) >= self.limit:
                return None
            stream = _Stream(method, context.cancel)
            self._open.add(stream)
            if self.idle_s and self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="stream-watchdog", daemon=True)
                self._watchdog.start()
            return stream

    def close(self, stream: _Stream) -> None:
        with self._lock:
            self._open.discard(stream)

    def requests(self, stream: _Stream, requests: Iterator[T]) -> Iterator[T]:
        """`requests`, with the time spent waiting for each one watched."""
        while True:
            stream.waiting_since = time.monotonic()
            try:
                request = next(requests)
            except StopIteration:
                return
            finally:
                stream.waiting_since = None
            yield request

    def _watch(self) -> None:
        period = min(1.0, self.idle_s / 4)
        while not self._stopped.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._open if s.waiting_since is not None and now - s.waiting_since > self.idle_s]
            for stream in idle:
                log.info(
                    "%s: no request for %.0f s; the stream is closed (--stream-idle-s)", stream.method, self.idle_s
                )
                self.on_idle(stream.method)
                stream.cancel()

    def stop(self) -> None:
        """Stop the idle-stream watchdog (streams still open end with the server)."""
        self._stopped.set()
        if self._watchdog is not None:
            self._watchdog.join(5)
