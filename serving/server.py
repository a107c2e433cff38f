"""Build, start and stop the gRPC server for one bundle."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc

from serving.config import ServerConfig
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.servicer import ClassifierServicer
from serving.session import ModelSession

log = logging.getLogger("serving")

# Room for the protobuf envelope around the largest image we accept.
_MESSAGE_OVERHEAD = 64 * 1024


class Server:
    """A started gRPC server; `port` is the one actually bound (useful with port=0)."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.session = ModelSession(
            config.bundle,
            device=config.device,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
        )
        self.session.warm_up()
        limit = config.max_image_bytes + _MESSAGE_OVERHEAD
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_ClassifierServicer_to_server(ClassifierServicer(self.session, config), self.grpc_server)
        address = f"{config.host}:{config.port}"
        self.port = self.grpc_server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: address in use or not available")
        self.grpc_server.start()
        m = self.session.manifest
        log.info("serving %s %s on %s:%d (%s)", m.name, m.version, config.host, self.port, ", ".join(self.session.providers))

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish for up to `grace` seconds, then stop."""
        self.grpc_server.stop(self.config.grace_s if grace is None else grace).wait()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    server = Server(config)
    done = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s: draining for up to %.1fs", signal.Signals(signum).name, config.grace_s)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"serving on {config.host}:{server.port}", flush=True)
    done.wait()
    server.stop()
    return 0
