"""Build, start and stop the gRPC server for a bundle or a model repository: classifier, the Open
Inference Protocol, health, reflection, metrics, TLS.

Life of a server: it listens first and reports NOT_SERVING on the standard grpc.health.v1 service
while the model loads and warms up; SERVING once it can answer; NOT_SERVING again from the moment
it starts to drain. Orchestrators (Kubernetes gRPC probes, grpc_health_probe) and load balancers
read that service, and server reflection lets generic tools (grpcurl, grpcui) discover the API.
Each served model also has its own health name, SERVING while a version of it is served.

With a model repository, a Watcher scans it every `poll_s` seconds and on SIGHUP, and the Registry
switches versions live (serving/repository/registry.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from serving.bundle.session import ModelSession
from serving.config import ServerConfig, max_streams
from serving.engine.batcher import Batcher
from serving.engine.calls import Calls
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.gen.inference import grpc_service_pb2 as oip_pb
from serving.gen.inference import grpc_service_pb2_grpc as oip_grpc
from serving.monitoring import Metrics
from serving.protocols.classifier import ClassifierServicer
from serving.protocols.http import HttpApp, HttpServer
from serving.protocols.inference import InferenceServicer
from serving.protocols.interceptor import EdgeInterceptor
from serving.protocols.streams import StreamLimiter
from serving.repository.layout import parse_policies
from serving.repository.registry import Registry, ServedModel, memory_bound, open_model
from serving.repository.watcher import Watcher
from serving.signals import Signals

log = logging.getLogger("serving")

SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # classifier.v1.Classifier
OIP_SERVICE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
# Health is reported for the whole server ("") and for each inference service by name, as the protocol suggests.
HEALTH_NAMES = ("", SERVICE, OIP_SERVICE)


# Calls gRPC core holds for the server before a handler takes them, at least (see the options below).
PENDING_CALLS = 3000


class Server:
    """A started gRPC server; `port` is the one actually bound (useful with port=0).

    load=False starts it listening with health NOT_SERVING and no model; call `load()` later.
    `session` replaces the bundle's ModelSession (tests wrap one to hold the model busy).
    """

    def __init__(self, config: ServerConfig, *, session: ModelSession | None = None, load: bool = True):
        self.config = config
        self.metrics = Metrics()
        self.health = health.HealthServicer()
        for name in HEALTH_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.models = Registry(config, self.metrics, on_change=self._served_changed)
        self.metrics.watch_queue(self.models.queue_depth)
        self.watcher: Watcher | None = None
        self._health_names: set[str] = set()
        self._draining = False
        self.calls = Calls(config, self.metrics, self.models)
        self.streams = StreamLimiter(max_streams(config), config.stream_idle_s)
        self.servicer = ClassifierServicer(config, self.metrics, self.models, self.calls)
        self.inference = InferenceServicer(
            config,
            self.models,
            self.calls,
            ready=lambda: not self._draining and bool(self.models.served()),
            watcher=lambda: self.watcher,
        )
        pending = max(config.max_concurrent_calls, PENDING_CALLS)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="grpc"),
            interceptors=[
                EdgeInterceptor(
                    self.metrics,
                    (SERVICE, OIP_SERVICE),
                    max_concurrent_calls=config.max_concurrent_calls,
                    active_calls=lambda: _grpc_active_calls(self.grpc_server),
                    streams=self.streams,
                )
            ],
            options=[
                # Larger messages are refused by gRPC itself with RESOURCE_EXHAUSTED, before any handler runs.
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared socket
                # gRPC core queues each method's calls until a handler takes the next, and past
                # max_pending_requests (default 1000; all of them past the hard limit, 3000) drops new
                # ones at random as CANCELLED, before any code of ours sees them. Calls that arrived
                # expired count until taken off, so a burst of them cost the next valid caller its call
                # (issue 24). One bound, no random band, never below our own limit, whose refusals are
                # RESOURCE_EXHAUSTED and counted.
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", pending),
            ],
            # Past this many calls gRPC answers RESOURCE_EXHAUSTED instead of queueing without bound.
            maximum_concurrent_rpcs=config.max_concurrent_calls,
        )
        pb_grpc.add_ClassifierServicer_to_server(self.servicer, self.grpc_server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self.inference, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE, OIP_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server, reflection_pool()
        )
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None
        self._stopped = False
        try:
            self.port = self._bind()
            self.grpc_server.start()
            if config.http_port is not None:
                self.http = HttpServer(
                    HttpApp(config, self.inference, self.metrics, self.inference.ready), config, config.http_port
                )
            if config.metrics_port is not None:
                self.metrics_port = self.metrics.serve_http(config.host, config.metrics_port)
            if load:
                self.load(session)
        except BaseException:
            self.stop(0)
            raise

    def _bind(self) -> int:
        c = self.config
        address = f"{c.host}:{c.port}"
        try:
            if c.tls_cert is None or c.tls_key is None:  # ServerConfig allows both or neither
                port = self.grpc_server.add_insecure_port(address)
            else:
                client_ca = c.tls_client_ca.read_bytes() if c.tls_client_ca is not None else None
                # With a client CA, the TLS handshake itself refuses callers without a certificate it signed.
                credentials = grpc.ssl_server_credentials(
                    [(c.tls_key.read_bytes(), c.tls_cert.read_bytes())],
                    root_certificates=client_ca,
                    require_client_auth=client_ca is not None,
                )
                port = self.grpc_server.add_secure_port(address, credentials)
        except RuntimeError:  # newer grpcio raises instead of returning 0
            port = 0
        if port == 0:
            raise OSError(
                f"cannot listen on {address}: address in use or not available; pick another --port (0 for a free one)"
            )
        return port

    def load(self, session: ModelSession | None = None) -> None:
        """Load the bundle (unless a session is given) or the repository's versions, warm them up,
        start batching, report SERVING. With a repository, start watching it for new versions."""
        c = self.config
        if c.model_repository is None:
            assert c.bundle is not None  # ServerConfig holds exactly one of the two
            # Version 1: the Open Inference Protocol's clients expect an integer (the manifest's own
            # version, an export timestamp, is in the model's configuration as bundle_version).
            self.models.install(open_model(c, self.metrics, c.bundle, session=session, number=1))
        else:
            self.watcher = Watcher(self.models, c.model_repository, parse_policies(c.version_policy), poll_s=c.poll_s)
            self.watcher.poll()
            self.watcher.start()
            if not self.models.served():
                log.warning("%s: no model version could be loaded yet; watching for one", c.model_repository)
        log.info("listening on %s:%d", c.host, self.port)
        bound = memory_bound(c, [m.cost_bytes for m in self.models.served().values()])
        log.info("memory: at most %d MiB with what is loaded now (README, 'What a request may cost')", bound // 2**20)

    def reload(self) -> None:
        """Scan the repository now instead of at the next poll (what SIGHUP does); returns at once."""
        if self.watcher is not None:
            self.watcher.reload()

    def _served_changed(self, served: Mapping[str, ServedModel]) -> None:
        if self._stopped:
            return
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._health_names - set(served):
            self.health.set(name, not_serving)
        for name in served:
            self.health.set(name, serving)
        self._health_names |= set(served)
        for name in HEALTH_NAMES:
            self.health.set(name, serving if served else not_serving)

    @property
    def batcher(self) -> Batcher | None:
        model = self.models.default()
        return model.batcher if model else None

    def drain(self) -> None:
        """Report NOT_SERVING (and ServerReady false) from now on, for good; calls are still answered until `stop`."""
        self._draining = True
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None = None) -> None:
        """Drain, refuse new calls (UNAVAILABLE), let in-flight ones finish for up to `grace` seconds, then stop."""
        if self._stopped:
            return
        self._stopped = True
        if self.watcher is not None:
            self.watcher.stop()
        self.drain()
        grace = self.config.grace_s if grace is None else grace
        end = time.monotonic() + grace
        if not self.calls.admission.close(grace):
            log.warning("calls still in progress after the %.1fs grace period are cancelled", grace)
        # Decoding ends now, whatever the images: the calls still decoding are answered UNAVAILABLE.
        self.calls.close()
        self.streams.stop()
        if self.http is not None:
            self.http.stop()
        # What is left are health watchers and reflection streams; calls past the grace are cancelled.
        self.grpc_server.stop(max(0.0, end - time.monotonic())).wait()
        # Only now: until the handlers are done, they wait on the batcher for their results.
        self.models.close()
        self.metrics.close()

    @property
    def http_port(self) -> int | None:
        """The HTTP/REST port bound, None when --http-port is off."""
        return None if self.http is None else self.http.port

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(0)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The descriptors of every service the server answers, for reflection. The Open Inference
    Protocol's live in a pool of their own (scripts/gen_protos.py says why), so reflection gets a
    pool holding copies of all of them and their imports."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in (pb.DESCRIPTOR, oip_pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(file)
    return pool


def _grpc_active_calls(server: grpc.Server) -> int | None:
    """gRPC's own count of calls in progress, the one it compares with maximum_concurrent_rpcs.
    Private to grpcio (pinned in pyproject.toml); a test fails if a new release moves it."""
    return getattr(getattr(server, "_state", None), "active_rpc_count", None)


def serve(config: ServerConfig, signals: Signals | None = None) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; returns the exit code. SIGHUP scans
    the model repository at once. `signals`: the handlers the command installed before its imports
    (serving/cli.py), else installed here."""
    # Before loading, so that a signal during a slow load still ends in a clean exit.
    signals = signals or Signals().install()
    server = Server(config, load=False)
    # Only sets an event: the scan and any load run on the watcher's thread.
    signals.on_reload = server.reload
    try:
        if not signals.stop.is_set():
            server.load()
            scheme = "https" if config.tls_cert is not None else "http"
            http = "" if server.http_port is None else f", HTTP/REST on {scheme}://{config.host}:{server.http_port}/"
            metrics = (
                ""
                if server.metrics_port is None
                else f", metrics on http://{config.host}:{server.metrics_port}/metrics"
            )
            print(f"serving on {config.host}:{server.port}{http}{metrics}", flush=True)
        # The kernel may hand the signal to any thread (gRPC's, ONNX Runtime's) while Python runs the
        # handler only in the main thread, once it runs bytecode again: so wake it, never block for good.
        while not signals.stop.wait(0.1):
            pass
        log.info(
            "received %s: draining for %.1fs, then up to %.1fs for calls in flight",
            signals.received,
            config.drain_s,
            config.grace_s,
        )
        server.drain()
        # Load balancers poll health every few seconds; answering meanwhile loses no traffic.
        time.sleep(config.drain_s)
    finally:
        server.stop()
    return 0
