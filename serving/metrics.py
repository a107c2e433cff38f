"""Prometheus metrics for one server: its own registry, its own HTTP port, a gRPC interceptor.

Each Server owns a Metrics with a dedicated CollectorRegistry (not prometheus_client's global
one), so several servers can run in one process, as the tests do, without sharing counters.
Calls that gRPC itself refuses before a handler runs (a message over max_message_bytes, more than
max_concurrent_calls) are not counted here: they never reach the server's code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from serving.batcher import BatchStats
from serving.bundle import Manifest

# Seconds: a tiny model on a CPU answers in milliseconds, a large one with TTA on a busy CPU in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Views per batch: powers of two up to well past the default max_batch_views (64).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "classifier_requests", "Calls answered, by RPC method and gRPC status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "classifier_request_seconds", "Time from a call's arrival in its handler to its answer, seconds",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("classifier_in_flight_requests", "Calls being handled now", registry=r)
        self.queue_depth = Gauge("classifier_queue_depth", "Images waiting in the batcher's queue", registry=r)
        self.queue_wait = Histogram(
            "classifier_queue_wait_seconds", "Time an image waited in the queue before its batch ran, seconds",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference = Histogram(
            "classifier_inference_seconds", "ONNX Runtime time per batch, seconds", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_views = Histogram(
            "classifier_batch_views", "Views (rows of the model input) per ONNX Runtime batch", buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.images = Counter("classifier_images", "Images run through the model", registry=r)
        self.views = Counter("classifier_views", "TTA views run through the model", registry=r)
        self.predicted = Counter(
            "classifier_predicted_class", "Top-1 label of every image answered; watch its mix for drift", ["label"],
            registry=r,
        )
        self.model = Info("classifier_model", "The model being served", registry=r)
        self._http = None

    def model_loaded(self, manifest: Manifest, *, precision: str, sha256: str, providers: list[str]) -> None:
        self.model.info({
            "name": manifest.name, "version": manifest.version, "sha256": sha256, "precision": precision,
            "architecture": manifest.architecture, "providers": ",".join(providers),
        })
        for label in manifest.classes:
            self.predicted.labels(label)  # every class at 0 from the start, so rates exist before the first hit

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, stats: BatchStats) -> None:
        for wait in stats.queue_waits:
            self.queue_wait.observe(wait)
        self.inference.observe(stats.seconds)
        self.batch_views.observe(stats.views)
        self.images.inc(len(stats.queue_waits))
        self.views.inc(stats.views)

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP; returns the port bound (useful with port=0)."""
        try:
            self._http, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}; pick another --metrics-port "
                          "(0 for a free one) or turn metrics off with --metrics-port off") from None
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts, times and tracks in flight every unary call to `service` (e.g. classifier.v1.Classifier)."""

    def __init__(self, metrics: Metrics, service: str):
        self.metrics = metrics
        self.prefix = f"/{service}/"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(self.prefix):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._measured(method[len(self.prefix):], handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _measured(self, name: str, behaviour):
        m = self.metrics

        def measured(request, context):
            start = time.perf_counter()
            m.in_flight.inc()
            try:
                response = behaviour(request, context)
            except BaseException:
                # context.abort sets the code before raising; anything else is a bug: UNKNOWN, as gRPC reports it.
                m.requests.labels(name, _code_name(context.code(), grpc.StatusCode.UNKNOWN)).inc()
                raise
            else:
                m.requests.labels(name, _code_name(context.code(), grpc.StatusCode.OK)).inc()
                return response
            finally:
                m.latency.labels(name).observe(time.perf_counter() - start)
                m.in_flight.dec()

        return measured


def _code_name(code, default: grpc.StatusCode) -> str:
    return (code if isinstance(code, grpc.StatusCode) else default).name
