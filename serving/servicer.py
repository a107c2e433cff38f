"""The gRPC servicer: thin methods named after the RPCs; the work lives in serving.predict."""

from __future__ import annotations

import grpc

from serving.config import ServerConfig
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.predict import predict_image
from serving.preprocess import ImageError
from serving.session import ModelSession


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, session: ModelSession, config: ServerConfig):
        self.session = session
        self.config = config

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        m = self.session.manifest
        if len(request.image) > self.config.max_image_bytes:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"image is {len(request.image)} bytes, over the limit of {self.config.max_image_bytes}",
            )
        tta = request.tta if request.HasField("tta") else True
        try:
            result = predict_image(self.session, request.image, tta=tta, max_pixels=self.config.max_image_pixels)
        except ImageError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.PredictResponse(
            predictions=[
                pb.Prediction(label=m.classes[i], index=i, probability=p) for i, p in result.top(request.top_k)
            ],
            probabilities=result.probabilities.tolist(),
            model_name=m.name,
            model_version=m.version,
            tta_views=result.views,
        )

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        m = self.session.manifest
        return pb.ModelInfoResponse(
            model_name=m.name,
            model_version=m.version,
            architecture=m.architecture,
            classes=m.classes,
            input_size=m.preprocessing.input_size,
            tta_views=[v.name for v in m.tta.views],
            metrics=m.metrics,
            model_sha256=m.model.sha256,
            schema_version=m.schema_version,
        )
