"""The Open Inference Protocol over HTTP/REST (KServe v2, as Triton serves it, with its binary
tensor extension) on --http-port, and at `/` a page for trying a model from a browser.

Each route turns its request into the gRPC message (serving.protocols.rest) and calls the method of
the InferenceServicer that gRPC calls: one implementation of every call, so both protocols share
admission, limits, the decoding processes, the batcher, deadlines, statistics and metrics. The app
is plain ASGI on uvicorn, in a thread with its own event loop; calls that wait (infer, repository
load and unload) run in a pool of --workers threads, as gRPC's handlers do, and health, metadata and
configuration are answered on the loop itself, so that a busy model never delays a health check.

What a request may cost is bounded before it is read: headers by h11 (HEADER_BYTES), connections by
--max-concurrent-calls (more are answered 503), a body by --max-message-bytes (413) and BODY_TIMEOUT_S
(408), and only a call that holds one of the --workers places reads its body, so at most that many
bodies are in memory; JSON longer than --max-json-bytes is refused unparsed, and at most JSON_PARSERS
requests are parsed at once (parsed JSON takes several times its size).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, NoReturn

import grpc
import uvicorn

from serving.config import JSON_PARSERS, ServerConfig, json_limit
from serving.engine.errors import CallFailed, status_for
from serving.gen.inference import grpc_service_pb2 as pb
from serving.monitoring import Metrics
from serving.protocols import rest
from serving.protocols.inference import InferenceServicer

log = logging.getLogger("serving")

HEADER_BYTES = 64 * 2**10  # a request line and headers longer than this are refused by h11
BODY_TIMEOUT_S = 30.0  # a body must arrive within this, from its first byte to its last
KEEP_ALIVE_S = 30  # an idle connection is closed after this

# The HTTP status for each gRPC code, as KServe and Triton map them.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_MODEL = re.compile(
    r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>ready|config|stats|infer))?"
)
_REPOSITORY = re.compile(r"/v2/repository/models/(?P<model>[^/]+)/(?P<action>load|unload)")
_JSON = [(b"content-type", b"application/json")]
# The page is self-contained: it may run its own inline script and style and call this server, nothing else.
_PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-cache"),
]


class Aborted(Exception):
    """What HttpCall.abort raises: the call ends with this status (`http_status`: when not the code's own)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None):
        super().__init__(message)
        self.code = code
        self.http_status = http_status or HTTP_STATUS.get(code, 500)


class HttpCall:
    """The part of grpc.ServicerContext the servicer's methods use, for a call that came over HTTP:
    no transport deadline (the request's `timeout` parameter sets one), active until its caller
    hangs up, and abort raising Aborted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = True
        self._callbacks: list[Callable[[], object]] = []

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return self._active

    def add_callback(self, callback: Callable[[], object]) -> bool:
        with self._lock:
            if self._active:
                self._callbacks.append(callback)
                return True
        callback()
        return False

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)

    def end(self) -> None:
        """The caller hung up, or its answer was sent: the callbacks run (they free queued work)."""
        with self._lock:
            self._active = False
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = tuple(_JSON)


def json_reply(doc: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(doc).encode())


def error_reply(status: int, message: str) -> Reply:
    return json_reply({"error": message}, status)


@dataclass(frozen=True)
class Route:
    """One endpoint: `name` labels its metrics (the gRPC method's name, where it has one), `answer`
    makes the reply, `waits`: run in the worker pool with a body slot, else on the event loop."""

    name: str
    answer: Callable[[HttpCall, dict[str, str], bytes], Reply]
    waits: bool = False


class HttpApp:
    """The ASGI application. `ready`: whether the server takes inference calls now (gRPC's ServerReady)."""

    def __init__(self, config: ServerConfig, servicer: InferenceServicer, metrics: Metrics, ready: Callable[[], bool]):
        self.config = config
        self.servicer = servicer
        self.metrics = metrics
        self.ready = ready
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="http")
        self._places: asyncio.Semaphore | None = None  # made on the server's loop: --workers calls at once
        self._parsers = threading.BoundedSemaphore(JSON_PARSERS)
        page = resources.files("serving.protocols").joinpath("page.html")
        self.page = page.read_bytes() if page.is_file() else None

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        start = time.perf_counter()
        route, args, reply = self._route(scope["method"], scope["path"])
        code = grpc.StatusCode.OK
        self.metrics.in_flight.inc()
        try:
            if reply is None:
                assert route is not None
                reply, code = await self._answer(route, args, scope, receive)
            await send({"type": "http.response.start", "status": reply.status, "headers": list(reply.headers)})
            await send({"type": "http.response.body", "body": reply.body})
        finally:
            self.metrics.in_flight.dec()
            name = route.name if route is not None else "unknown"
            self.metrics.http_requests.labels(name, str(reply.status if reply is not None else 500)).inc()
            if route is not None and route.name != "page":  # the Open Inference Protocol's methods
                self.metrics.requests.labels(name, code.name).inc()
                self.metrics.latency.labels(name).observe(time.perf_counter() - start)

    async def _answer(
        self, route: Route, args: dict[str, str], scope: dict, receive: Callable[[], Awaitable[dict]]
    ) -> tuple[Reply, grpc.StatusCode]:
        call = HttpCall()
        try:
            if not route.waits:
                return self._run(route, call, args, b"")
            if self._places is None:
                self._places = asyncio.Semaphore(self.config.workers)
            headers = dict(scope["headers"])
            async with self._places:
                body = await self._body(headers, receive)
                watch = asyncio.ensure_future(_hang_up(receive, call))
                try:
                    return await asyncio.get_running_loop().run_in_executor(
                        self.pool, self._run, route, call, args, body, headers
                    )
                finally:
                    watch.cancel()
        except Aborted as e:
            return error_reply(e.http_status, str(e)), e.code
        finally:
            call.end()

    def _run(
        self, route: Route, call: HttpCall, args: dict[str, str], body: bytes, headers: dict | None = None
    ) -> tuple[Reply, grpc.StatusCode]:
        try:
            if headers is not None:
                args = {**args, "header_length": headers.get(rest.HEADER_LENGTH.encode(), b"").decode("latin-1")}
            return route.answer(call, args, body), grpc.StatusCode.OK
        except Aborted as e:
            return error_reply(e.http_status, str(e)), e.code
        except Exception as e:  # CallFailed from the translation, or a bug: never a traceback to the caller
            code, message = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("HTTP %s failed", route.name)
            return error_reply(HTTP_STATUS.get(code, 500), message), code

    async def _body(self, headers: dict[bytes, bytes], receive: Callable[[], Awaitable[dict]]) -> bytes:
        limit = self.config.max_message_bytes
        declared = headers.get(b"content-length", b"0").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            raise Aborted(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request body is {declared} bytes, over the limit of {limit} (--max-message-bytes)",
                413,
            )
        if headers.get(b"content-encoding", b"identity").lower() != b"identity":
            raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, "compressed requests are not accepted; send them plain")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise Aborted(grpc.StatusCode.CANCELLED, "the caller hung up")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise Aborted(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the request body is over the limit of {limit} bytes (--max-message-bytes)",
                            413,
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise Aborted(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                408,
            ) from None

    # Routing.

    def _route(self, method: str, path: str) -> tuple[Route | None, dict[str, str], Reply | None]:
        """The route for a request, its path's arguments, or the reply when there is none."""
        routes: dict[str, Route] = {}
        args: dict[str, str] = {}
        if path in ("/", "/index.html"):
            routes = {"GET": Route("page", self._page)}
        elif path in ("/v2", "/v2/"):
            routes = {"GET": Route("ServerMetadata", self._server_metadata)}
        elif path == "/v2/health/live":
            routes = {"GET": Route("ServerLive", lambda call, args, body: json_reply({"live": True}))}
        elif path == "/v2/health/ready":
            routes = {"GET": Route("ServerReady", self._server_ready)}
        elif path == "/v2/models/stats":
            routes = {"GET": Route("ModelStatistics", self._statistics)}
        elif path == "/v2/repository/index":
            routes = {"POST": Route("RepositoryIndex", self._index, waits=True)}
        elif m := _REPOSITORY.fullmatch(path):
            args = {"model": m["model"], "version": ""}
            routes = {"POST": Route(f"RepositoryModel{m['action'].title()}", self._repository, waits=True)}
            args["action"] = m["action"]
        elif m := _MODEL.fullmatch(path):
            args = {"model": m["model"], "version": m["version"] or ""}
            routes = {
                None: {"GET": Route("ModelMetadata", self._model_metadata)},
                "ready": {"GET": Route("ModelReady", self._model_ready)},
                "config": {"GET": Route("ModelConfig", self._model_config)},
                "stats": {"GET": Route("ModelStatistics", self._statistics)},
                "infer": {"POST": Route("ModelInfer", self._infer, waits=True)},
            }[m["action"]]
        if not routes:
            return None, args, error_reply(404, f"no such endpoint: {rest.show(path)}; see /v2 and README")
        if method not in routes:
            allowed = ", ".join(routes)
            reply = Reply(405, json.dumps({"error": f"{method} is not allowed here; use {allowed}"}).encode())
            return None, args, Reply(405, reply.body, (*reply.headers, (b"allow", allowed.encode())))
        return routes[method], args, None

    # The endpoints, each calling the servicer's method of the same name.

    def _page(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        if self.page is None:
            return error_reply(404, "this installation has no page (serving/protocols/page.html is missing)")
        return Reply(200, self.page, tuple(_PAGE_HEADERS))

    def _server_metadata(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        return json_reply(rest.as_json(self.servicer.ServerMetadata(pb.ServerMetadataRequest(), call)))

    def _server_ready(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        # The status answers (Triton's clients and probes read only it); the body is KServe's.
        if self.servicer.ServerReady(pb.ServerReadyRequest(), call).ready:
            return json_reply({"ready": True})
        return json_reply({"ready": False, "error": "not ready: the model is loading, or the server is draining"}, 503)

    def _model_ready(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        request = pb.ModelReadyRequest(name=args["model"], version=args["version"])
        ready = self.servicer.ModelReady(request, call).ready
        doc = {"name": args["model"][:200], "ready": ready}
        if ready:
            return json_reply(doc)
        return json_reply(doc | {"error": "not served, or the server is draining"}, 503)

    def _model_metadata(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        request = pb.ModelMetadataRequest(name=args["model"], version=args["version"])
        return json_reply(rest.as_json(self.servicer.ModelMetadata(request, call)))

    def _model_config(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        request = pb.ModelConfigRequest(name=args["model"], version=args["version"])
        # Triton answers the configuration itself, not wrapped.
        return json_reply(rest.as_json(self.servicer.ModelConfig(request, call).config))

    def _statistics(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        request = pb.ModelStatisticsRequest(name=args.get("model", ""), version=args.get("version", ""))
        return json_reply(rest.as_json(self.servicer.ModelStatistics(request, call)))

    def _index(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        doc = self._small_json(body, "the repository index request")
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"ready must be true or false, got {rest.show(ready)}")
        index = self.servicer.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), call)
        return json_reply([rest.as_json(m) for m in index.models])

    def _repository(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        doc = self._small_json(body, f"the {args['action']} request")
        parameters = doc.get("parameters", {})
        if not isinstance(parameters, dict):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, "parameters must be a JSON object")
        if args["action"] == "load":
            load = pb.RepositoryModelLoadRequest(model_name=args["model"])
            for key in parameters:  # refused by the servicer, which names them
                load.parameters[key].string_param = ""
            self.servicer.RepositoryModelLoad(load, call)
        else:
            unload = pb.RepositoryModelUnloadRequest(model_name=args["model"])
            for key, value in parameters.items():
                if isinstance(value, bool):
                    unload.parameters[key].bool_param = value
                else:
                    unload.parameters[key].string_param = str(value)[:200]
            self.servicer.RepositoryModelUnload(unload, call)
        return Reply(200)

    def _infer(self, call: HttpCall, args: dict[str, str], body: bytes) -> Reply:
        with self._parsers:  # the parsed JSON and its translation are dropped before the model is waited on
            infer = rest.infer_request(
                body,
                args.get("header_length") or None,
                model=args["model"],
                version=args["version"],
                max_json_bytes=json_limit(self.config),
            )
        del body
        response = self.servicer.ModelInfer(infer.request, call)
        binary = infer.binary if len(infer.binary) == len(response.outputs) else [False] * len(response.outputs)
        content, header_length = rest.infer_response(response, binary)
        if header_length is None:
            return Reply(200, content)
        return Reply(
            200,
            content,
            (
                (b"content-type", b"application/octet-stream"),
                (rest.HEADER_LENGTH.encode(), str(header_length).encode()),
            ),
        )

    def _small_json(self, body: bytes, what: str) -> dict:
        """A request body that is a small JSON object, or none at all."""
        if not body.strip():
            return {}
        if len(body) > 2**16:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is {len(body)} bytes; it takes a few")
        doc = rest.parse_json(body, what)
        if not isinstance(doc, dict):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be a JSON object")
        return doc


async def _hang_up(receive: Callable[[], Awaitable[dict]], call: HttpCall) -> None:
    """End `call` when its caller disconnects: queued work it left is then not run."""
    while (await receive())["type"] != "http.disconnect":
        pass
    call.end()


class HttpServer:
    """`app` served on `config.host`:`port` by uvicorn in a thread; `port` is the one bound.
    TLS (and client certificates) as the gRPC port has them."""

    def __init__(self, app: HttpApp, config: ServerConfig, port: int):
        self.app = app
        self._socket = listen(config.host, port)
        self.port: int = self._socket.getsockname()[1]
        tls: dict[str, Any] = {}
        if config.tls_cert is not None and config.tls_key is not None:
            tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
            if config.tls_client_ca is not None:
                tls |= {"ssl_ca_certs": str(config.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                http="h11",
                loop="asyncio",
                lifespan="off",
                log_config=None,
                log_level="warning",
                access_log=False,
                server_header=False,
                limit_concurrency=config.max_concurrent_calls,
                timeout_keep_alive=KEEP_ALIVE_S,
                timeout_graceful_shutdown=1,
                h11_max_incomplete_event_size=HEADER_BYTES,
                **tls,
            )
        )
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                self._socket.close()
                raise OSError(f"the HTTP server on port {self.port} did not start: {self._failed}")
            time.sleep(0.005)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self._socket]))
        except BaseException as e:  # reported by __init__ while starting, logged after
            self._failed = e
            if self.server.started:
                log.exception("the HTTP server stopped")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._socket.close()
        self.app.pool.shutdown(wait=False, cancel_futures=True)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (IPv6 when host is an IPv6 address; port 0: a free one)."""
    address = host.strip("[]")
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off only on sockets that say TCP,
    # and with it on, a response's body waits for the client's delayed ACK of its headers (+40 ms).
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot serve HTTP on {host}:{port}: {e.strerror or e}; pick another --http-port "
            "(0 for a free one) or turn it off with --http-port off"
        ) from None
    return sock
