"""The classifier.v1 servicer: thin methods named after the RPCs; the work lives in serving.engine.calls and serving.engine.predict.

Each call decodes and preprocesses its images in its own handler thread, queues the views with the
batcher, and waits for the probabilities no longer than the call's deadline allows.
"""

from __future__ import annotations

import grpc
import numpy as np

from serving.config import ServerConfig
from serving.engine.admission import CallGuard
from serving.engine.calls import Calls
from serving.engine.errors import CallFailed, abort, status_for
from serving.engine.predict import Prepared, top
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.monitoring import Metrics
from serving.repository.registry import Registry, ServedModel


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, config: ServerConfig, metrics: Metrics, models: Registry, calls: Calls):
        self.config = config
        self.metrics = metrics
        self.models = models  # filled by Server.load once a model is warm
        self.calls = calls

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        try:
            with self.calls.opened(self.models.acquire(request.model, request.version), images=1) as call:
                model, arrival = call.model, call.arrival
                prepared = self._prepare(model, request, self.calls.guard(context), "Predict")
                if isinstance(prepared, Exception):
                    raise prepared
                [result] = self.calls.run(model, [prepared], context, arrival)
                if isinstance(result, Exception):
                    raise result
                return self._respond(model, request, prepared, result)
        except Exception as e:
            abort(context, e)

    def PredictBatch(self, request: pb.PredictBatchRequest, context: grpc.ServicerContext) -> pb.PredictBatchResponse:
        try:
            with self.calls.opened(self.models.acquire(request.model, request.version)) as call:
                model, arrival = call.model, call.arrival
                if len(request.requests) > self.config.max_batch_images:
                    raise CallFailed(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{len(request.requests)} images in one PredictBatch call, over the limit of "
                        f"{self.config.max_batch_images}; split them over several calls",
                    )
                guard = self.calls.guard(context)
                prepared = []
                for i, item in enumerate(request.requests):
                    guard.check()  # no more decoding once the caller's deadline passed or it hung up
                    prepared.append(self._prepare(model, item, guard, f"PredictBatch image {i}"))
                # Only the images that were prepared run; their results come back in that order.
                ran = iter(self.calls.run(model, [p for p in prepared if isinstance(p, Prepared)], context, arrival))
                outcomes = [p if isinstance(p, Exception) else (p, next(ran)) for p in prepared]
                results = [
                    self._batch_result(model, item, outcome)
                    for item, outcome in zip(request.requests, outcomes, strict=True)
                ]
                call.outcome.images = sum(r.status.code == 0 for r in results)
                return pb.PredictBatchResponse(results=results)
        except Exception as e:
            abort(context, e)

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        try:
            with self.calls.admission.admitted(), self.models.acquire(request.model, request.version) as model:
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
            bundle_version=m.version,
        )

    # Helpers shared by the RPCs.

    @property
    def model(self) -> ServedModel | None:
        """The model a call that names none gets (None while loading, or with several models)."""
        return self.models.default()

    def _prepare(
        self, model: ServedModel, request: pb.PredictRequest, guard: CallGuard, where: str
    ) -> Prepared | Exception:
        # A call that does not say gets what the bundle chose at export (manifest tta.default).
        tta = request.tta if request.HasField("tta") else None
        return self.calls.prepare(model, request.image, tta, guard, where)

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
