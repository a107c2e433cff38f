"""A small Python client for the Classifier service and its standard health service."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc


class Client:
    """`with Client("localhost:50051") as c: c.predict(Path("cat.jpg").read_bytes())`

    tls_ca: PEM bytes or file of the certificate authority that signed the server's certificate
    (for a self-signed server, its own certificate); None talks plaintext.
    tls_cert, tls_key: PEM bytes or files of this client's own certificate chain and private key,
    for a server that requires client certificates (mutual TLS); both or neither, and only with tls_ca.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = 64 * 2**20,
        tls_ca: bytes | Path | str | None = None,
        tls_cert: bytes | Path | str | None = None,
        tls_key: bytes | Path | str | None = None,
    ):
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both to present a client certificate, or neither")
        if tls_cert is not None and tls_ca is None:
            raise ValueError("a client certificate (tls_cert, tls_key) is sent only over TLS: give tls_ca too")
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls_ca is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca), private_key=_pem(tls_key), certificate_chain=_pem(tls_cert)
            )
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def predict(
        self, image: bytes, *, top_k: int = 0, tta: bool | None = None, model: str = "", version: int = 0
    ) -> pb.PredictResponse:
        """`model` and `version` pick one of a model repository's models (empty, 0: the only one, at the
        version its policy serves); the reply's model_version names the version that answered."""
        request = _request(image, top_k, tta)
        request.model, request.version = model, version
        return self.stub.Predict(request, timeout=self.timeout)

    def predict_file(self, path: Path | str, **kwargs) -> pb.PredictResponse:
        return self.predict(Path(path).read_bytes(), **kwargs)

    def predict_batch(
        self, images: Iterable[bytes], *, top_k: int = 0, tta: bool | None = None, model: str = "", version: int = 0
    ) -> pb.PredictBatchResponse:
        """One call for several images, all to one model; check each result's status.code (0 is OK)
        before its response."""
        request = pb.PredictBatchRequest(
            requests=[_request(image, top_k, tta) for image in images], model=model, version=version
        )
        return self.stub.PredictBatch(request, timeout=self.timeout)

    def model_info(self, *, model: str = "", version: int = 0) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(model=model, version=version), timeout=self.timeout)

    def health(self, service: str = "") -> str:
        """The server's health status name (SERVING, NOT_SERVING, ...) for `service` ("" is the whole server)."""
        reply = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the channel connects (the server listens; it may still be loading its model)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pem(source: bytes | Path | str | None) -> bytes | None:
    """PEM bytes given as they are, or read from a file."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def _request(image: bytes, top_k: int, tta: bool | None) -> pb.PredictRequest:
    request = pb.PredictRequest(image=image, top_k=top_k)
    if tta is not None:
        request.tta = tta
    return request
