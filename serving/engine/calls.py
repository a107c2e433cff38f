"""What every classifying call does, whichever protocol it came by: one scope (admission, the
model, its statistics, the batcher's arrival), decoding in the decoding processes within the call's
limits, queueing with the batcher, and waiting no longer than its deadline.

classifier.v1 (serving.protocols.classifier) and the Open Inference Protocol (serving.protocols.inference) both
go through one `Calls`, so that they share the shutdown gate, the decoding processes and the
batcher; serving.engine.errors says with what status each failure ends a call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import grpc
import numpy as np

from serving.bundle.preprocess import ImageError
from serving.config import ServerConfig, decoders
from serving.engine.admission import Admission, CallGuard
from serving.engine.batcher import Arrival, DeadlineExpired, ShuttingDown
from serving.engine.decode_worker import Job
from serving.engine.decoders import DecodePool
from serving.engine.errors import CallFailed, ItemFailed, status_for
from serving.engine.predict import Prepared
from serving.engine.statistics import Outcome
from serving.monitoring import Metrics
from serving.repository.registry import Registry, ServedModel

log = logging.getLogger("serving")

# gRPC reports "no deadline" as a time remaining of about 292 years; anything past a day is none.
_NO_DEADLINE_S = 86_400.0


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic()'s clock, or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else time.monotonic() + remaining


def wait_all(futures: list[Future], deadline: float | None) -> list[np.ndarray | Exception]:
    """Each future's result, or its exception when only that item failed. Raises CallFailed when
    the whole call must end: the deadline passed, the caller went away, or the server is stopping."""
    out: list[np.ndarray | Exception] = []
    try:
        for f in futures:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out.append(f.result(timeout))
            except TimeoutError:
                raise CallFailed(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting for the model"
                ) from None
            except CancelledError:
                raise CallFailed(grpc.StatusCode.CANCELLED, "the call was cancelled") from None
            except (DeadlineExpired, ShuttingDown) as e:
                raise CallFailed(*status_for(e)) from None
            except Exception as e:  # the batch step failed on this item only
                log.error("model run failed: %s: %s", type(e).__name__, e)
                out.append(e)
    except CallFailed:
        for f in futures:
            f.cancel()  # whatever is still queued need not run
        raise
    return out


@dataclass(frozen=True)
class Call:
    """A call in progress: the model answering it, the Outcome its statistics will count (set its
    `images` once known), and its Arrival, which the batcher waits for (serving.engine.batcher)."""

    model: ServedModel
    outcome: Outcome
    arrival: Arrival


class Calls:
    """The shared path of a call: `admission` (the shutdown gate), `prepare` each image in a decoding
    process under the call's `guard`, then `run` the prepared images through the model's batcher."""

    def __init__(self, config: ServerConfig, metrics: Metrics, models: Registry):
        self.config = config
        self.metrics = metrics
        self.models = models
        self.admission = Admission()
        self.decoders = DecodePool(
            decoders(config),
            config.decode_worker_memory_mb * 2**20,
            timeout_s=config.decode_timeout_s,
            on_replaced=lambda reason: metrics.decoders_replaced.labels(reason).inc(),
            on_warnings=self._decoder_warnings,
        )

    @contextmanager
    def opened(self, acquire: AbstractContextManager[ServedModel], images: int = 0) -> Iterator[Call]:
        """The one scope of a classifying call, whichever protocol it came by: admitted past the
        shutdown gate, holding the model `acquire` finds (serving.repository.registry.Registry.acquire), counted
        in its statistics (`images`, unless the call sets outcome.images), and announced to its
        batcher. Whatever the block raises ends the call; errors.status_for says with what status."""
        with (
            self.admission.admitted(),
            acquire as model,
            model.stats.counting(images) as outcome,
            model.batcher.arriving() as arrival,
        ):
            yield Call(model, outcome, arrival)

    def guard(self, context: grpc.ServicerContext, deadline: float | None = None) -> CallGuard:
        """The call's limits; `deadline` (monotonic) when the call asked for one sooner than gRPC's."""
        return CallGuard(
            deadline=deadline_of(context) if deadline is None else deadline,
            is_active=context.is_active,
            max_pixels=self.config.max_call_pixels,
        )

    def prepare(
        self, model: ServedModel, image: bytes, tta: bool | None, guard: CallGuard, where: str
    ) -> Prepared | Exception:
        """The image's views, or the error that fails this image alone. Raises CallFailed when the
        whole call must end (deadline passed, caller gone). tta=None: the bundle's choice."""
        start = time.perf_counter()
        m = model.session.manifest
        try:
            if len(image) > self.config.max_image_bytes:
                raise ImageError(
                    f"image is {len(image)} bytes, over the limit of {self.config.max_image_bytes}; the model sees "
                    f"{m.preprocessing.input_size}x{m.preprocessing.input_size} pixels, so send a smaller file"
                )
            views = m.tta.views_for(tta)
            job = Job(
                preprocessing=m.preprocessing,
                views=views,
                formats=self.config.allowed_formats,
                max_pixels=self.config.max_image_pixels,
                call_pixels=guard.pixels,
                max_call_pixels=guard.max_pixels,
            )
            guard.check()
            decoded = self.decoders.decode(job, image, guard.check)
            guard.pixels += decoded.pixels
            return Prepared(decoded.views, [v.name for v in views])
        except CallFailed:
            raise
        except (ImageError, ItemFailed) as e:
            return e
        finally:
            model.stats.prepared(time.perf_counter() - start)

    def _decoder_warnings(self, counts: dict[str, int]) -> None:
        for source, n in counts.items():
            self.metrics.decoder_warnings.labels(source).inc(n)

    def close(self) -> None:
        """Kill the decoding processes: calls still decoding fail at once."""
        self.decoders.close()

    def run(
        self,
        model: ServedModel,
        prepared: list[Prepared],
        context: grpc.ServicerContext,
        arrival: Arrival,
        deadline: float | None = None,
    ) -> list[np.ndarray | Exception]:
        """Each image's probabilities (or the error of its run alone), waiting no longer than the
        call's deadline, or `deadline` (monotonic) when the call asked for one sooner."""
        if deadline is None:
            deadline = deadline_of(context)
        futures = model.batcher.submit([p.views for p in prepared], deadline=deadline, arrival=arrival)
        # A caller that hangs up or times out frees its place: queued views it left are not run.
        context.add_callback(lambda: [f.cancel() for f in futures])
        return wait_all(futures, deadline)
