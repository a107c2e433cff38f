"""The failures a call's path raises, each carrying the gRPC status its caller gets."""

from __future__ import annotations

import grpc


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
