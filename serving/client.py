"""A small Python client for the Classifier service."""

from __future__ import annotations

from pathlib import Path

import grpc

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc


class Client:
    """`with Client("localhost:50051") as c: c.predict(Path("cat.jpg").read_bytes())`"""

    def __init__(self, target: str, *, timeout: float | None = 30.0, max_message_bytes: int = 64 * 2**20):
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def predict(self, image: bytes, *, top_k: int = 0, tta: bool | None = None) -> pb.PredictResponse:
        request = pb.PredictRequest(image=image, top_k=top_k)
        if tta is not None:
            request.tta = tta
        return self.stub.Predict(request, timeout=self.timeout)

    def predict_file(self, path: Path | str, **kwargs) -> pb.PredictResponse:
        return self.predict(Path(path).read_bytes(), **kwargs)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
