"""Prometheus metrics for one server: its own registry and its own HTTP port.

Each Server owns a Metrics with a dedicated CollectorRegistry (not prometheus_client's global
one), so several servers can run in one process, as the tests do, without sharing counters.
The calls are counted by serving.protocols.interceptor, including those gRPC refuses before a handler runs.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app

from serving.bundle.manifest import Manifest
from serving.engine.batcher import BatchStats

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
        self.http_requests = Counter(
            "classifier_http_requests",
            "HTTP/REST calls answered, by method (the Open Inference Protocol's, as in classifier_requests_total) "
            "and HTTP status",
            ["method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "classifier_request_seconds",
            "Time from a call's arrival in its handler to its answer, seconds",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("classifier_in_flight_requests", "Calls being handled now", registry=r)
        self.queue_depth = Gauge("classifier_queue_depth", "Images waiting in the batcher's queue", registry=r)
        self.queue_wait = Histogram(
            "classifier_queue_wait_seconds",
            "Time an image waited in the queue before its batch ran, seconds",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "classifier_inference_seconds", "ONNX Runtime time per batch, seconds", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_views = Histogram(
            "classifier_batch_views",
            "Views (rows of the model input) per ONNX Runtime batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.images = Counter("classifier_images", "Images run through the model", registry=r)
        self.views = Counter("classifier_views", "TTA views run through the model", registry=r)
        self.predicted = Counter(
            "classifier_predicted_class",
            "Top-1 label of every image answered; watch its mix for drift",
            ["label"],
            registry=r,
        )
        self.not_run = Counter(
            "classifier_calls_not_run",
            "Calls that ended before their handler ran: a request over --max-message-bytes "
            "(refused by gRPC with RESOURCE_EXHAUSTED) or a caller that hung up or timed out while its call waited "
            "for a handler thread",
            ["method"],
            registry=r,
        )
        self.decoder_warnings = Counter(
            "classifier_decoder_warnings",
            "Warnings Pillow and libtiff raised while decoding requests' images "
            "(counted instead of logged: their text comes from the sender's bytes)",
            ["source"],
            registry=r,
        )
        self.decoders_replaced = Counter(
            "classifier_decoders_replaced",
            "Image decoding processes killed and replaced: the call's deadline passed (deadline), its caller left "
            "(cancelled), the image took longer than --decode-timeout-s (timeout), needed more than "
            "--decode-worker-memory-mb (memory), or crashed its decoder (crash)",
            ["reason"],
            registry=r,
        )
        self.model = Info("classifier_model", "The model version loaded last", registry=r)
        self.model_loads = Counter(
            "classifier_model_loads",
            "Model versions loaded (result=loaded) or refused (result=failed: broken bundle, over the memory budget)",
            ["model", "result"],
            registry=r,
        )
        self.files_changed = Counter(
            "classifier_model_files_changed",
            "Times a served version's files changed on disk (each change is checked again; the version in memory "
            "keeps serving unless they now hold another valid bundle)",
            ["model"],
            registry=r,
        )
        self.model_version = Gauge(
            "classifier_model_version", "The repository version number each model serves now", ["model"], registry=r
        )
        self.answers = Counter(
            "classifier_model_answers",
            "Images answered, by the model and version that answered",
            ["model", "version"],
            registry=r,
        )
        self._http: WSGIServer | None = None

    def model_loaded(self, manifest: Manifest, *, precision: str, sha256: str, providers: list[str]) -> None:
        self.model.info(
            {
                "name": manifest.name,
                "version": manifest.version,
                "sha256": sha256,
                "precision": precision,
                "architecture": manifest.architecture,
                "providers": ",".join(providers),
            }
        )
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
        addr = host.strip("[]")
        server_class = _ThreadingServer6 if ":" in addr else _ThreadingServer
        try:
            self._http = make_server(
                addr, port, only_metrics(make_wsgi_app(self.registry)), server_class, handler_class=_QuietHandler
            )
        except OSError as e:
            raise OSError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}; pick another --metrics-port "
                "(0 for a free one) or turn metrics off with --metrics-port off"
            ) from None
        threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True).start()
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def only_metrics(app: Callable) -> Callable:
    """The metrics app at /metrics, and 404 on every other path: prometheus_client's own server
    answers 200 with the metrics everywhere, so an HTTP health check pointed at this port
    (/v2/health/ready, /healthz) would pass whatever the server's state."""

    def routed(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: this port serves Prometheus metrics at /metrics only\n"]

    return routed


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the process's exit


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not news: no line per request on stderr."""
