"""What work the server takes on: calls while it shuts down, and pixels decoded at once and per call.

Decoding is where a request costs the most memory (a transparent WebP needs about 20 bytes a pixel
while it becomes RGB and then views: 1 GB at 50 megapixels), so it is bounded twice: `PixelBudget`
caps the pixels all calls decode at the same moment, and `CallGuard` caps the pixels one
PredictBatch call may decode in total. Both stop waiting or working as soon as the caller's deadline passes or it hangs up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from serving.preprocess import ImageError

# While waiting for decode budget, how often to look whether the caller is still there, seconds.
_POLL_S = 0.05


class CallFailed(Exception):
    """Ends a whole call with a status; raised by the helpers, turned into context.abort by the RPCs."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


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


class PixelBudget:
    """At most `limit` pixels decoded at once across all calls; an image over the whole limit
    waits until it can run alone. `hold` waits for room no longer than the caller's deadline."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("the pixel budget must be at least 1")
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    @contextmanager
    def hold(self, pixels: int, check: Callable[[], None]) -> Iterator[None]:
        """Hold `pixels` of the budget while the block runs. `check` raises to give up waiting
        (deadline passed, caller gone); it is called at least every 50 ms while waiting."""
        need = min(max(1, pixels), self.limit)
        with self._cond:
            while self._used + need > self.limit:
                check()
                self._cond.wait(_POLL_S)
            self._used += need
        try:
            yield
        finally:
            with self._cond:
                self._used -= need
                self._cond.notify_all()


class CallGuard:
    """One call's limits while it prepares its images: its deadline, its caller still being there,
    and the pixels it decodes in total. `admit` is the hook `serving.preprocess.load_views` takes."""

    def __init__(self, *, deadline: float | None, is_active: Callable[[], bool], budget: PixelBudget, max_pixels: int):
        self.deadline = deadline  # on time.monotonic()'s clock; None: the caller set none
        self._is_active = is_active
        self._budget = budget
        self.max_pixels = max_pixels
        self.pixels = 0  # decoded so far by this call

    def check(self) -> None:
        """Raise CallFailed when the call's work is no longer wanted."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while the images were being decoded")
        if not self._is_active():
            raise CallFailed(grpc.StatusCode.CANCELLED, "the caller went away")

    @contextmanager
    def admit(self, pixels: int) -> Iterator[None]:
        self.check()
        if self.pixels + pixels > self.max_pixels:
            raise ImageError(
                f"this image's {pixels} pixels would bring the call's total to {self.pixels + pixels}, over the "
                f"limit of {self.max_pixels} pixels per call; send it in another call"
            )
        self.pixels += pixels
        with self._budget.hold(pixels, self.check):
            self.check()  # the wait may have been long
            yield
