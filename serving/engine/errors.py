"""The failures a call's path raises, and the one rule that turns any of them into the gRPC status
its caller gets, for both protocols (as KServe's errors.py does for its REST and gRPC servers)."""

from __future__ import annotations

from typing import NoReturn

import grpc

from serving.bundle.preprocess import ImageError
from serving.engine.batcher import DeadlineExpired, QueueFull, ShuttingDown


class CallFailed(Exception):
    """Ends a whole call with a status; raised by the helpers, turned into context.abort by the RPCs."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class ItemFailed(Exception):
    """One image of a call failed, with its own status; the call's other images go on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(
    error: BaseException, *, queue_full: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED
) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failure is reported with, and its message for people. `queue_full`: the code
    for a full queue, which the Open Inference Protocol reports UNAVAILABLE, as Triton does (its
    clients retry on it), and classifier.v1 RESOURCE_EXHAUSTED."""
    if isinstance(error, (CallFailed, ItemFailed)):
        return error.code, str(error)
    if isinstance(error, ImageError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, QueueFull):
        return queue_full, f"the queue is full: {error}"
    if isinstance(error, DeadlineExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded before the model ran: {error}"
    if isinstance(error, ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    return grpc.StatusCode.INTERNAL, f"the model failed on this input: {type(error).__name__}: {error}"


def abort(
    context: grpc.ServicerContext,
    error: BaseException,
    *,
    queue_full: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
) -> NoReturn:
    """End the call with `error`'s status. grpc's context.abort always raises, but grpc ships no type
    information that says so; this function does, for the type checker and the reader."""
    context.abort(*status_for(error, queue_full=queue_full))
    raise AssertionError("grpc.ServicerContext.abort returned instead of raising")
