"""The gRPC servicer: thin methods named after the RPCs; the work lives in serving.predict and serving.batcher.

Each call decodes and preprocesses its images in its own handler thread, queues the views with the
batcher, and waits for the probabilities no longer than the call's deadline allows.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError, Future
from typing import NoReturn

import grpc
import numpy as np

from serving import decoder_log
from serving.admission import Admission, CallFailed, CallGuard, PixelBudget
from serving.batcher import Arrival, DeadlineExpired, QueueFull, ShuttingDown
from serving.config import ServerConfig
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.metrics import Metrics
from serving.models import Registry, ServedModel
from serving.predict import Prepared, prepare, top
from serving.preprocess import ImageError

log = logging.getLogger("serving")

# gRPC reports "no deadline" as a time remaining of about 292 years; anything past a day is none.
_NO_DEADLINE_S = 86_400.0


class ItemFailed(Exception):
    """One image of a call failed for a reason of the server's, not of the image: its own status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failure is reported with, and its message for people."""
    if isinstance(error, (CallFailed, ItemFailed)):
        return error.code, str(error)
    if isinstance(error, ImageError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, DeadlineExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded before the model ran: {error}"
    if isinstance(error, ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    return grpc.StatusCode.INTERNAL, f"the model failed on this input: {type(error).__name__}: {error}"


def abort(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with `error`'s status. grpc's context.abort always raises, but grpc ships no type
    information that says so; this function does, for the type checker and the reader."""
    context.abort(*status_for(error))
    raise AssertionError("grpc.ServicerContext.abort returned instead of raising")


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


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, config: ServerConfig, metrics: Metrics, models: Registry):
        self.config = config
        self.metrics = metrics
        self.models = models  # filled by Server.load once a model is warm
        self.admission = Admission()
        self.decode_budget = PixelBudget(config.max_decode_pixels)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        try:
            with (
                self.admission.admitted(),
                self.models.acquire(request.model, request.version) as model,
                model.batcher.arriving() as arrival,
            ):
                prepared = self._prepare(model, request, self._guard(context), "Predict")
                if isinstance(prepared, Exception):
                    raise prepared
                [result] = self._run(model, [prepared], context, arrival)
                if isinstance(result, Exception):
                    raise result
                return self._respond(model, request, prepared, result)
        except Exception as e:
            abort(context, e)

    def PredictBatch(self, request: pb.PredictBatchRequest, context: grpc.ServicerContext) -> pb.PredictBatchResponse:
        try:
            with (
                self.admission.admitted(),
                self.models.acquire(request.model, request.version) as model,
                model.batcher.arriving() as arrival,
            ):
                if len(request.requests) > self.config.max_batch_images:
                    raise CallFailed(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{len(request.requests)} images in one PredictBatch call, over the limit of "
                        f"{self.config.max_batch_images}; split them over several calls",
                    )
                guard = self._guard(context)
                prepared = []
                for i, item in enumerate(request.requests):
                    guard.check()  # no more decoding once the caller's deadline passed or it hung up
                    prepared.append(self._prepare(model, item, guard, f"PredictBatch image {i}"))
                # Only the images that were prepared run; their results come back in that order.
                ran = iter(self._run(model, [p for p in prepared if isinstance(p, Prepared)], context, arrival))
                outcomes = [p if isinstance(p, Exception) else (p, next(ran)) for p in prepared]
                return pb.PredictBatchResponse(
                    results=[
                        self._batch_result(model, item, outcome)
                        for item, outcome in zip(request.requests, outcomes, strict=True)
                    ]
                )
        except Exception as e:
            abort(context, e)

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        try:
            with self.admission.admitted(), self.models.acquire(request.model, request.version) as model:
                pass
        except CallFailed as e:
            abort(context, e)
        m = model.session.manifest
        return pb.ModelInfoResponse(
            model_name=model.name,
            model_version=model.version,
            architecture=m.architecture,
            classes=m.classes,
            input_size=m.preprocessing.input_size,
            tta_views=[v.name for v in m.tta.views],
            metrics=m.metrics,
            model_sha256=m.model.sha256,
            schema_version=m.schema_version,
            precision=model.session.precision,
            providers=model.session.providers,
            tta_default=m.tta.default,
            tta_reason=m.tta.reason,
            metrics_held_out=m.metrics_held_out,
        )

    # Helpers shared by the RPCs.

    @property
    def model(self) -> ServedModel | None:
        """The model a call that names none gets (None while loading, or with several models)."""
        return self.models.default()

    def _guard(self, context: grpc.ServicerContext) -> CallGuard:
        return CallGuard(
            deadline=deadline_of(context),
            is_active=context.is_active,
            budget=self.decode_budget,
            max_pixels=self.config.max_call_pixels,
        )

    def _prepare(
        self, model: ServedModel, request: pb.PredictRequest, guard: CallGuard, where: str
    ) -> Prepared | Exception:
        """The image's views, or the error that fails this image alone. Raises CallFailed when the
        whole call must end (deadline passed, caller gone)."""
        # A call that does not say gets what the bundle chose at export (manifest tta.default).
        tta = request.tta if request.HasField("tta") else None
        try:
            with decoder_log.counted(self._decoder_warning):
                return prepare(
                    model.session.manifest,
                    request.image,
                    tta=tta,
                    max_bytes=self.config.max_image_bytes,
                    max_pixels=self.config.max_image_pixels,
                    formats=self.config.allowed_formats,
                    admit=guard.admit,
                )
        except CallFailed:
            raise
        except ImageError as e:
            return e
        except MemoryError:
            log.exception("%s: out of memory preparing a %d-byte image", where, len(request.image))
            return ItemFailed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the server ran out of memory preparing this image; retry later or send a smaller image",
            )
        except Exception as e:  # a decoder bug on this input: it fails this image, never the server or the call
            log.exception("%s: preparing a %d-byte image failed", where, len(request.image))
            return ItemFailed(
                grpc.StatusCode.INTERNAL, f"the server failed to prepare this image: {type(e).__name__}: {e}"
            )

    def _decoder_warning(self, source: str) -> None:
        self.metrics.decoder_warnings.labels(source).inc()

    def _run(
        self, model: ServedModel, prepared: list[Prepared], context: grpc.ServicerContext, arrival: Arrival
    ) -> list[np.ndarray | Exception]:
        deadline = deadline_of(context)
        futures = model.batcher.submit([p.views for p in prepared], deadline=deadline, arrival=arrival)
        # A caller that hangs up or times out frees its place: queued views it left are not run.
        context.add_callback(lambda: [f.cancel() for f in futures])
        return wait_all(futures, deadline)

    def _respond(
        self, model: ServedModel, request: pb.PredictRequest, prepared: Prepared, probs: np.ndarray
    ) -> pb.PredictResponse:
        m = model.session.manifest
        ranked = top(probs, request.top_k)
        self.metrics.predicted.labels(m.classes[ranked[0][0]]).inc()
        self.metrics.answers.labels(model.name, model.version).inc()
        return pb.PredictResponse(
            predictions=[pb.Prediction(label=m.classes[i], index=i, probability=p) for i, p in ranked],
            probabilities=probs.tolist(),
            model_name=model.name,
            model_version=model.version,
            tta_views=prepared.names,
        )

    def _batch_result(
        self,
        model: ServedModel,
        request: pb.PredictRequest,
        outcome: Exception | tuple[Prepared, np.ndarray | Exception],
    ) -> pb.PredictBatchResult:
        """One PredictBatch entry: `outcome` is the error that stopped the image before it ran, or
        its prepared views with the model's probabilities (or the error the model run raised)."""
        if isinstance(outcome, Exception):
            failure = outcome
        else:
            prepared, probs = outcome
            if not isinstance(probs, Exception):
                return pb.PredictBatchResult(
                    status=pb.Status(code=0), response=self._respond(model, request, prepared, probs)
                )
            failure = probs
        code, message = status_for(failure)
        return pb.PredictBatchResult(status=pb.Status(code=code.value[0], message=message))
