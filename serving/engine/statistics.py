"""Per-model counts and cumulative durations, as the Open Inference Protocol's ModelStatistics reports them.

Prometheus (serving.monitoring) keeps histograms for the whole server; a client such as perf_analyzer
instead asks one model for running totals and divides the difference between two readings. These
totals cover every call that reached the model, through either protocol.

Units: counts of images (one batcher request each) and of model runs; durations in nanoseconds.
With one image a request, as perf_analyzer sends by default, an image is Triton's "request".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from serving.engine.batcher import BatchStats


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += round(seconds * 1e9)


@dataclass
class Snapshot:
    """A consistent copy of a model's totals at one moment."""

    success: Duration = field(default_factory=Duration)  # requests answered; time from model acquired to answer
    fail: Duration = field(default_factory=Duration)  # requests failed once their model was known; same time
    queue: Duration = field(default_factory=Duration)  # per image: submit to the start of its batch
    compute_input: Duration = field(default_factory=Duration)  # per image: decoding and making its views
    compute_infer: Duration = field(default_factory=Duration)  # per image: its views' share of its batch's run
    compute_output: Duration = field(default_factory=Duration)  # per request: building the response
    inference_count: int = 0  # images answered
    execution_count: int = 0  # model runs
    last_inference_ms: int = 0  # wall clock of the last answer, ms since the epoch; 0 before any
    batches: dict[int, Duration] = field(default_factory=dict)  # images in a run -> runs and their time


@dataclass
class Outcome:
    """What a request counted by `ModelStats.counting` fills in as it goes."""

    images: int = 0  # images answered, once known
    output_seconds: float = 0.0  # time spent building the response


class ModelStats:
    """Running totals for one served version; thread-safe. The batcher reports its runs through
    `observe_batch`; the servicers report each request's outcome through `request`."""

    def __init__(self, wall_clock=time.time) -> None:
        self._lock = threading.Lock()
        self._totals = Snapshot()
        self._wall_clock = wall_clock

    def observe_batch(self, stats: BatchStats) -> None:
        images = len(stats.queue_waits)
        with self._lock:
            t = self._totals
            for wait in stats.queue_waits:
                t.queue.add(wait)
            # The run's time is shared among its images (by their count: views per image are equal
            # within a call, and a per-image split is what a reader divides by).
            t.compute_infer.add(stats.seconds, images)
            t.execution_count += 1
            t.batches.setdefault(images, Duration()).add(stats.seconds)

    def prepared(self, seconds: float) -> None:
        with self._lock:
            self._totals.compute_input.add(seconds)

    def request(self, *, ok: bool, seconds: float, images: int = 0, output_seconds: float = 0.0) -> None:
        """One request ended: answered (`images` of them) or failed."""
        with self._lock:
            t = self._totals
            if ok:
                t.success.add(seconds)
                t.compute_output.add(output_seconds)
                t.inference_count += images
                t.last_inference_ms = int(self._wall_clock() * 1000)
            else:
                t.fail.add(seconds)

    @contextmanager
    def counting(self, images: int = 0) -> Iterator[Outcome]:
        """Count the block as one request: failed if it raises, else answered with the Outcome's images."""
        start = time.perf_counter()
        outcome = Outcome(images)
        try:
            yield outcome
        except BaseException:
            self.request(ok=False, seconds=time.perf_counter() - start)
            raise
        self.request(
            ok=True, seconds=time.perf_counter() - start, images=outcome.images, output_seconds=outcome.output_seconds
        )

    def snapshot(self) -> Snapshot:
        with self._lock:
            t = self._totals
            return replace(
                t,
                **{
                    name: replace(getattr(t, name))
                    for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
                },
                batches={k: replace(v) for k, v in t.batches.items()},
            )
