"""What work the server takes on: calls while it shuts down (`Admission`), and one call's deadline,
caller and pixels while its images are decoded (`CallGuard`).

How many images are decoded at once, and what each may cost, is bounded by the decoding processes
themselves (serving.engine.decoders).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from serving.engine.errors import CallFailed


class Admission:
    """Counts the calls in progress; once closed, refuses new ones so that shutdown can wait for the rest.

    gRPC's own graceful stop ends calls that reached the server but no handler yet with CANCELLED
    (grpc/grpc#41785), which tells a client nothing useful. Refusing them here first answers them
    UNAVAILABLE, the code clients retry on another replica."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._open = True

    @contextmanager
    def admitted(self) -> Iterator[None]:
        with self._cond:
            if not self._open:
                raise CallFailed(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def close(self, timeout: float, *, settle: float = 0.1) -> bool:
        """Refuse new calls; wait up to `timeout` seconds until none is in progress, and at least
        `settle` seconds so that calls already on their way in are refused here rather than cut off
        by gRPC. Refused calls do not extend the wait. True when no call is left in progress."""
        start = time.monotonic()
        end = start + timeout
        with self._cond:
            self._open = False
            while True:
                now = time.monotonic()
                if self._active == 0 and now >= min(start + settle, end):
                    return True
                if now >= end:
                    return self._active == 0
                self._cond.wait((min(start + settle, end) if self._active == 0 else end) - now)


class CallGuard:
    """One call's limits while it prepares its images: its deadline, its caller still being there,
    and the pixels it decodes in total (counted by serving.engine.calls, enforced in the decoding process)."""

    def __init__(self, *, deadline: float | None, is_active: Callable[[], bool], max_pixels: int):
        self.deadline = deadline  # on time.monotonic()'s clock; None: the caller set none
        self._is_active = is_active
        self.max_pixels = max_pixels
        self.pixels = 0  # decoded so far by this call

    def check(self) -> None:
        """Raise CallFailed when the call's work is no longer wanted."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while the images were being decoded")
        if not self._is_active():
            raise CallFailed(grpc.StatusCode.CANCELLED, "the caller went away")
