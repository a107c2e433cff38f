"""The server's edge: every call to the classifier and to the Open Inference Protocol counted by
method and the status its caller got.

gRPC answers some calls before any handler of ours runs. Counting only in the handlers would hide
exactly the calls operators need to see under overload, so this interceptor also counts:

- calls past `maximum_concurrent_rpcs`, which gRPC refuses with RESOURCE_EXHAUSTED. gRPC decides
  that from its count of active calls under the lock it holds while it calls `intercept_service`,
  so reading the same count here makes the same decision (`active_calls`);
- calls that end before their handler runs: a request over the message-size limit, or a caller
  that went away while its call waited for a handler thread (`classifier_calls_not_run_total`);
- requests that are not valid protobuf: gRPC would answer INTERNAL and log a traceback; they are
  answered INVALID_ARGUMENT here instead (on a stream, the handler gets them as Malformed).

A stream (ModelStreamInfer) counts as one call, with the status it ended with; the requests it
carries are counted in each model's ModelStatistics.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from typing import NoReturn

import grpc

from serving.monitoring import Metrics
from serving.protocols.streams import StreamLimiter


class Malformed:
    """What the request deserializer returns for bytes that are not a valid message."""

    def __init__(self, reason: str):
        self.reason = reason


class _Call:
    __slots__ = ("ran",)

    def __init__(self) -> None:
        self.ran = False


class EdgeInterceptor(grpc.ServerInterceptor):
    """Counts, times and tracks in flight every call to `services` (e.g. classifier.v1.Classifier);
    the method label is the bare method name, which no two of our services share.

    active_calls: gRPC's own count of calls in progress, which it compares with `max_concurrent_calls`
    (None when unknown: then its refusals cannot be counted)."""

    def __init__(
        self,
        metrics: Metrics,
        services: Sequence[str],
        *,
        max_concurrent_calls: int | None,
        active_calls: Callable[[], int | None],
        streams: StreamLimiter | None = None,
    ):
        self.streams = streams
        self.metrics = metrics
        self.prefixes = tuple(f"/{service}/" for service in services)
        self.max_concurrent_calls = max_concurrent_calls
        self.active_calls = active_calls

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is not None
            and self.streams is not None
            and (handler.request_streaming or handler.response_streaming)
        ):
            handler = _limited(handler, method, self.streams)
        prefix = next((p for p in self.prefixes if method.startswith(p)), None)
        if prefix is None:
            return handler
        name = method[len(prefix) :]
        if handler is None:
            self.metrics.requests.labels(name, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return handler
        if handler.unary_unary is None and handler.stream_stream is None:
            return handler
        if self._refused_by_grpc():
            self.metrics.requests.labels(name, grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            return handler  # gRPC answers it; none of our code needs to run
        call = _Call()
        if handler.stream_stream is not None:
            behaviour = self._measured_stream(name, handler.stream_stream, call)
            wrap = grpc.stream_stream_rpc_method_handler
        else:
            behaviour = self._measured(name, handler.unary_unary, call)
            wrap = grpc.unary_unary_rpc_method_handler
        # The handler function is dropped without having run when the call ended first.
        weakref.finalize(behaviour, self._ended, name, call)
        return wrap(
            behaviour,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _refused_by_grpc(self) -> bool:
        if self.max_concurrent_calls is None:
            return False
        active = self.active_calls()
        return active is not None and active >= self.max_concurrent_calls

    def _ended(self, name: str, call: _Call) -> None:
        if not call.ran:
            self.metrics.not_run.labels(name).inc()

    def _began(self, call: _Call) -> float:
        call.ran = True
        self.metrics.in_flight.inc()
        return time.perf_counter()

    def _finished(self, name: str, code: grpc.StatusCode, start: float) -> None:
        self.metrics.requests.labels(name, code.name).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - start)
        self.metrics.in_flight.dec()

    def _measured(self, name: str, behaviour, call: _Call):
        def measured(request, context):
            start = self._began(call)
            code = grpc.StatusCode.UNKNOWN  # anything that escapes the handler is a bug: gRPC reports UNKNOWN
            try:
                if isinstance(request, Malformed):
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    context.abort(code, f"the request is not a valid {name} message: {request.reason}")
                response = behaviour(request, context)
                code = _seen_by_caller(context)
                return response
            except BaseException:
                code = _seen_by_caller(context, default=code)  # context.abort sets the code before raising
                raise
            finally:
                self._finished(name, code, start)

        return measured

    def _measured_stream(self, name: str, behaviour, call: _Call):
        def measured(requests, context):
            start = self._began(call)
            code = grpc.StatusCode.UNKNOWN
            try:
                yield from behaviour(requests, context)
                code = _seen_by_caller(context)
            except GeneratorExit:  # the caller went away mid-stream
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _seen_by_caller(context, default=code)
                raise
            finally:
                self._finished(name, code, start)

        return measured


def _limited(handler: grpc.RpcMethodHandler, method: str, streams: StreamLimiter) -> grpc.RpcMethodHandler:
    """`handler` (a stream of any service) run only while it has one of the limiter's places."""

    def refuse(context: grpc.ServicerContext) -> NoReturn:
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{streams.limit} streams are open already, the most this server keeps at once (--max-streams); "
            "retry later, or send unary calls (ModelInfer, Predict)",
        )
        raise AssertionError("context.abort returned")

    def held(behaviour, *, watched: bool):
        # `first` is the request iterator of a stream_stream call (its waits watched for idleness), or
        # the one request of a unary_stream call.
        def limited(first, context):
            stream = streams.open(method, context)
            if stream is None:
                refuse(context)
            try:
                yield from behaviour(streams.requests(stream, first) if watched else first, context)
            finally:
                streams.close(stream)

        return limited

    if handler.stream_stream is not None:
        wrap, limited = grpc.stream_stream_rpc_method_handler, held(handler.stream_stream, watched=True)
    elif handler.unary_stream is not None:  # a health Watch: long-lived by design, so counted, never idle
        wrap, limited = grpc.unary_stream_rpc_method_handler, held(handler.unary_stream, watched=False)
    else:  # stream_unary: none of the services served has one
        return handler
    return wrap(
        limited, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _seen_by_caller(context: grpc.ServicerContext, default: grpc.StatusCode = grpc.StatusCode.OK) -> grpc.StatusCode:
    """The code a caller gets as the handler ends: the one it set (else `default`), unless the
    caller's deadline passed or it hung up first, which is what the caller then sees."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    code = context.code()
    if not isinstance(code, grpc.StatusCode) and not context.is_active():
        return grpc.StatusCode.CANCELLED
    return code if isinstance(code, grpc.StatusCode) else default


def _lenient(deserialize):
    """A request deserializer that hands bytes it cannot parse to the handler as Malformed."""
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, or whatever a deserializer raises
            return Malformed(f"{type(e).__name__}: {e}")

    return parse
