"""The Open Inference Protocol (KServe "v2", as NVIDIA Triton extends it): `inference.GRPCInferenceService`
beside classifier.v1 on the same port, so that tritonclient and perf_analyzer can call the server.

Every served model has one input and one output:

- IMAGE: datatype BYTES, one encoded image file per element, shape [batch] or [batch, 1]; sent in
  `raw_input_contents` (each element a 4-byte little-endian length, then its bytes) or in the typed
  `contents.bytes_contents`. Or datatype UINT8: RGB pixels, shape [batch, size, size, 3] at the
  model's input size, whose views are made as from a decoded image of that size.
- PROBABILITIES: FP32 [batch, classes], each row averaged over the image's TTA views as Predict's
  `probabilities`; always in `raw_output_contents` (the standard client decodes only raw outputs).
  With the output parameter `classification` = k, instead BYTES [batch, k] strings
  "probability:index:label", most probable first (Triton's classification extension).

Request parameters: `tta` (bool; unset: the bundle's choice), `timeout` (microseconds: a deadline
sooner than the call's own), `priority` (accepted; the batcher serves in arrival order).
A request runs as a whole: any bad image fails it, naming the element. Failures map to gRPC codes
as Triton's do: a full queue is UNAVAILABLE, an unknown model or version NOT_FOUND.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from itertools import islice

import grpc
import numpy as np

from serving.bundle.preprocess import ImageError
from serving.config import ServerConfig
from serving.engine.admission import CallGuard
from serving.engine.calls import Calls, deadline_of
from serving.engine.errors import CallFailed, abort, status_for
from serving.engine.predict import Prepared, prepare_pixels
from serving.engine.statistics import Duration, Snapshot
from serving.gen.inference import grpc_service_pb2 as pb
from serving.gen.inference import grpc_service_pb2_grpc as pb_grpc
from serving.protocols.echo import echo
from serving.protocols.interceptor import Malformed
from serving.protocols.tensors import (
    INPUT,
    OUTPUT,
    infer_response,
    read_images,
    request_deadline,
    request_tta,
    requested_outputs,
)
from serving.repository.layout import RepositoryError, Scanner, VersionDir
from serving.repository.registry import Registry, ServedModel
from serving.repository.watcher import Watcher

PLATFORM = "onnxruntime_onnx"
# Triton's names for the protocol extensions this server implements.
EXTENSIONS = (
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "parameters",
    "binary_tensor_data",  # HTTP/REST only (serving/protocols/rest.py)
)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """errors.status_for, with a full queue UNAVAILABLE, as Triton reports it (its clients retry on it)."""
    return status_for(error, queue_full=grpc.StatusCode.UNAVAILABLE)


def model_statistics(model: ServedModel, s: Snapshot) -> pb.ModelStatistics:
    def duration(d: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=model.name,
        version=model.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(s.success),
            fail=duration(s.fail),
            queue=duration(s.queue),
            compute_input=duration(s.compute_input),
            compute_infer=duration(s.compute_infer),
            compute_output=duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(d)) for size, d in sorted(s.batches.items())
        ],
    )


def pixel_dims(model: ServedModel) -> list[int]:
    """IMAGE's dimensions as UINT8 pixels, without the batch: [size, size, 3], NHWC."""
    size = model.session.manifest.preprocessing.input_size
    return [size, size, 3]


def config_parameters(model: ServedModel, config: ServerConfig) -> dict[str, str]:
    """What ModelConfig's parameters tell a client beyond the tensors: the other form IMAGE takes,
    what is done to an image before the model sees it, the TTA views, the classes, the bundle."""
    m = model.session.manifest
    p = m.preprocessing
    return {
        "image_bytes": f"IMAGE also takes BYTES, shape [batch, 1]: one encoded file per element "
        f"({', '.join(config.allowed_formats)}; at most {config.max_image_bytes} bytes each)",
        "preprocessing": f"an image (decoded file, or the UINT8 pixels as sent) has its shorter side resized to "
        f"{p.resize_size} px ({p.interpolation}), then each TTA view is a {p.input_size} px crop of it; "
        "normalization is in the graph",
        "tta_views": ",".join(v.name for v in m.tta.views),
        "tta_default": "true" if m.tta.default else "false",
        "classes": json.dumps(m.classes),
        "architecture": m.architecture,
        "bundle_version": m.version,
        "model_sha256": m.model.sha256,
    }


def repository_index(
    scan: Mapping[str, Mapping[int, VersionDir]],
    served: Mapping[str, ServedModel],
    refusals: Mapping[tuple[str, int], str],
    *,
    ready_only: bool,
    unloaded: frozenset[str] = frozenset(),
) -> list[pb.RepositoryIndexResponse.ModelIndex]:
    """Every version folder of the repository (`scan`) and every served version: READY when it
    answers calls, else UNAVAILABLE with the reason (`refusals`: why a (model, version) was refused).
    A served version with a refusal is one whose files were edited in place into what cannot be
    loaded: READY (the copy in memory answers), with that reason."""
    entry = pb.RepositoryIndexResponse.ModelIndex
    index = [
        entry(
            name=m.name,
            version=m.version,
            state="READY",
            reason=f"serving the copy loaded before its files changed; they were refused: {refusals[m.name, m.number]}"
            if m.number is not None and (m.name, m.number) in refusals
            else "",
        )
        for m in served.values()
    ]
    listed = {(m.name, m.number) for m in served.values()}
    if not ready_only:
        index += [
            entry(
                name=name,
                version=str(number),
                state="UNAVAILABLE",
                reason="unloaded by RepositoryModelUnload; RepositoryModelLoad serves it again"
                if name in unloaded
                else f"refused: {refusals[name, number]}"
                if (name, number) in refusals
                else "not served: its model's version policy serves another version",
            )
            for name, versions in scan.items()
            for number in versions
            if (name, number) not in listed
        ]
    return sorted(index, key=lambda e: (e.name, int(e.version) if e.version.isdigit() else -1, e.version))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`ready`: whether the server takes inference calls now (a model served, not draining)."""

    def __init__(
        self,
        config: ServerConfig,
        models: Registry,
        calls: Calls,
        *,
        ready: Callable[[], bool],
        watcher: Callable[[], Watcher | None],
    ):
        self.config = config
        self.models = models
        self.calls = calls
        self.ready = ready
        self.watcher = watcher  # the repository's, once the server has started loading from one
        self.scanner = None if config.model_repository is None else Scanner(config.model_repository)

    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        try:
            with self._model(request.name, request.version):
                return pb.ModelReadyResponse(ready=self.ready())
        except CallFailed:
            return pb.ModelReadyResponse(ready=False)

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        try:
            version = metadata.version("lesson2-classifier")
        except metadata.PackageNotFoundError:  # run from a source tree that was not installed
            version = "unknown"
        return pb.ServerMetadataResponse(name="lesson2-classifier", version=version, extensions=EXTENSIONS)

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        with self._answering(context), self._model(request.name, request.version) as model:
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=model.name,
                versions=[model.version],
                platform=PLATFORM,
                # One datatype only, as the protocol allows: the pixels Triton's image clients send. IMAGE
                # also takes BYTES, encoded files, as the configuration's parameters say.
                inputs=[tensor(name=INPUT, datatype="UINT8", shape=[-1, *pixel_dims(model)])],
                outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, len(model.session.manifest.classes)])],
            )

    def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        with self._answering(context), self._model(request.name, request.version) as model:
            return pb.ModelConfigResponse(
                config=pb.ModelConfig(
                    name=model.name,
                    platform=PLATFORM,
                    backend="onnxruntime",
                    max_batch_size=self.config.max_batch_images,
                    input=[
                        pb.ModelInput(
                            name=INPUT,
                            data_type=pb.TYPE_UINT8,
                            format=pb.ModelInput.FORMAT_NHWC,
                            dims=pixel_dims(model),
                        )
                    ],
                    output=[
                        pb.ModelOutput(name=OUTPUT, data_type=pb.TYPE_FP32, dims=[len(model.session.manifest.classes)])
                    ],
                    dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=self.config.max_delay_us),
                    parameters={
                        key: pb.ModelParameter(string_value=value)
                        for key, value in config_parameters(model, self.config).items()
                    },
                )
            )

    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        with self._answering(context):
            if request.name:
                with self._model(request.name, request.version) as model:
                    models = [model]
            else:
                models = [m for _, m in sorted(self.models.served().items())]
            return pb.ModelStatisticsResponse(model_stats=[model_statistics(m, m.stats.snapshot()) for m in models])

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        with self._answering(context):
            return self._infer(request, context)

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest | Malformed], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        # As Triton: a failed request is answered in the stream with its error message; the stream goes on.
        for request in request_iterator:
            if isinstance(request, Malformed):
                yield pb.ModelStreamInferResponse(error_message=f"not a valid ModelInferRequest: {request.reason}")
                continue
            try:
                yield pb.ModelStreamInferResponse(infer_response=self._infer(request, context))
            except Exception as e:
                yield pb.ModelStreamInferResponse(error_message=status_of(e)[1])

    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        with self._answering(context):
            scan = self._scan()
            watcher = self.watcher()
            refusals = {} if watcher is None else {(m, n): why for m in scan for n, why in watcher.refusals(m).items()}
            return pb.RepositoryIndexResponse(
                models=repository_index(
                    scan,
                    self.models.served(),
                    refusals,
                    ready_only=request.ready,
                    unloaded=frozenset() if watcher is None else frozenset(watcher.unloaded),
                )
            )

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """Scan the repository now and answer once that scan has loaded or refused what it found:
        OK when the model is served, else why not. What is loaded is what the version policy wants
        of the folders on disk, as at every poll; the request cannot pass a model itself. A model
        unloaded by RepositoryModelUnload is served again."""
        with self._answering(context), self.calls.admission.admitted():
            watcher, name = self._repository_request(request, context, "load")
            if request.parameters:
                named = ", ".join(echo(p) for p in islice(request.parameters, 3))
                raise CallFailed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"load parameters ({named}) are not supported: put the bundle in the model repository's "
                    f"folder {echo(name)} as <version>/ and load again",
                )
            watcher.unloaded.discard(name)
            self._scan_before(watcher, context)
            if name not in self.models.served():
                raise self._not_loaded(watcher, name)
            return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Stop serving the model once the calls holding it are done; later polls leave it unloaded
        (its folders stay on disk) until a RepositoryModelLoad names it."""
        with self._answering(context), self.calls.admission.admitted():
            watcher, name = self._repository_request(request, context, "unload")
            unknown = {p for p in request.parameters if p != "unload_dependents"}  # no dependents here: a no-op
            if unknown:
                named = ", ".join(echo(p) for p in islice(sorted(unknown), 3))
                raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"unload parameters ({named}) are not supported")
            if name not in self.models.served() and name not in self._scan():
                raise CallFailed(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: {echo(name)} is not found")
            watcher.unloaded.add(name)
            self._scan_before(watcher, context)
            return pb.RepositoryModelUnloadResponse()

    def _repository_request(
        self,
        request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest,
        context: grpc.ServicerContext,
        verb: str,
    ) -> tuple[Watcher, str]:
        """The repository's watcher and the model a load or unload names: `model_name` as Triton
        lays the request out, or the first field alone (`repository_name` here), as KServe does."""
        watcher = self.watcher()
        if self.config.model_repository is None or watcher is None:
            raise CallFailed(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server serves one --bundle and cannot {verb} models; serve a --model-repository for that"
                if self.config.model_repository is None
                else "the server is still loading the repository; retry shortly",
            )
        name = request.model_name or request.repository_name
        if not name:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"name the model to {verb} (model_name)")
        return watcher, name

    def _scan_before(self, watcher: Watcher, context: grpc.ServicerContext) -> None:
        """Scan the repository now, and wait for that scan to end within the call's deadline."""
        deadline = deadline_of(context)
        if not watcher.scan_now(None if deadline is None else max(0.0, deadline - time.monotonic())):
            raise CallFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the repository scan did not end before the deadline; it goes on: see ModelReady",
            )

    # Helpers shared by the RPCs.

    def _scan(self) -> dict[str, dict[int, VersionDir]]:
        """The repository's folders now (none for a --bundle server)."""
        try:
            return {} if self.scanner is None else self.scanner.scan()
        except RepositoryError:  # its root was removed under the running server; the watcher logs where
            raise CallFailed(
                grpc.StatusCode.UNAVAILABLE, "the model repository cannot be read now; what is served keeps serving"
            ) from None

    def _not_loaded(self, watcher: Watcher, name: str) -> CallFailed:
        versions = self._scan().get(name, {})
        if not versions:
            return CallFailed(
                grpc.StatusCode.NOT_FOUND,
                f"the model repository's folder {echo(name)} holds no version folder; publish a bundle in it "
                "as <version>/ and load again",
            )
        refusals = watcher.refusals(name)
        if refusals:
            why = "; ".join(f"version {n}: {reason}" for n, reason in sorted(refusals.items()))
            return CallFailed(grpc.StatusCode.FAILED_PRECONDITION, f"{name} was refused: {why}")
        return CallFailed(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{name} is not served: its version policy wants none of versions {sorted(versions)} (see --version-policy)",
        )

    @contextmanager
    def _answering(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Any failure in the block ends the call with its status (and never a traceback)."""
        try:
            yield
        except Exception as e:
            abort(context, e, queue_full=grpc.StatusCode.UNAVAILABLE)

    @contextmanager
    def _model(self, name: str, version: str) -> Iterator[ServedModel]:
        """The served model a request names. `version`: empty for the one its policy serves, else
        what ServedModel.version says: the repository's version number, or a --bundle's manifest version."""
        with self.models.acquire(name, 0) as model:
            if version and version != model.version:
                raise CallFailed(
                    grpc.StatusCode.NOT_FOUND,
                    f"{model.name} version {echo(version)} is not served; served: {model.version} "
                    "(leave the version empty for the one served)",
                )
            yield model

    def _infer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        deadline = request_deadline(request, deadline_of(context))
        with self.calls.opened(self._model(request.model_name, request.model_version)) as call:
            model, outcome, arrival = call.model, call.outcome, call.arrival
            m = model.session.manifest
            images = read_images(
                request, m.preprocessing.input_size, self.config.max_batch_images, self.config.max_image_bytes
            )
            ks = requested_outputs(request, m.classes, len(images), self.config.max_message_bytes)
            tta = request_tta(request)
            guard = self.calls.guard(context, deadline)
            prepared = [self._prepare(model, image, tta, guard, i) for i, image in enumerate(images)]
            results = self.calls.run(model, prepared, context, arrival, deadline)
            rows = []
            for i, r in enumerate(results):
                if isinstance(r, Exception):
                    code, message = status_of(r)
                    raise CallFailed(code, f"input {INPUT} element {i}: {message}")
                rows.append(r)
            start = time.perf_counter()
            probabilities = np.stack(rows).astype(np.float32)
            response = infer_response(model, request, probabilities, ks, prepared[0].names)
            for row in probabilities:
                self.calls.metrics.predicted.labels(m.classes[int(np.argmax(row))]).inc()
            self.calls.metrics.answers.labels(model.name, model.version).inc(len(probabilities))
            outcome.images = len(probabilities)
            outcome.output_seconds = time.perf_counter() - start
            return response

    def _prepare(
        self, model: ServedModel, image: bytes | np.ndarray, tta: bool | None, guard: CallGuard, i: int
    ) -> Prepared:
        """One element's views; raises CallFailed naming the element when it cannot be used."""
        guard.check()  # no more decoding once the caller's deadline passed or it hung up
        where = f"ModelInfer input {INPUT} element {i}"
        if isinstance(image, np.ndarray):
            start = time.perf_counter()
            try:
                return prepare_pixels(model.session.manifest, image, tta=tta)
            except ImageError as e:
                raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {e}") from None
            finally:
                model.stats.prepared(time.perf_counter() - start)
        prepared = self.calls.prepare(model, image, tta, guard, where)
        if isinstance(prepared, Exception):
            code, message = status_of(prepared)
            raise CallFailed(code, f"input {INPUT} element {i}: {message}")
        return prepared
