"""The one refusal type of the data plane: a gRPC status code and a message that says what to change."""

from __future__ import annotations

import grpc


class ProtocolError(Exception):
    """A request refused or failed with this gRPC status code; `message` is what the caller sees."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError) -> ProtocolError:
        """A failed call to another server, passed on with its code and details."""
        return cls(error.code(), error.details() or error.code().name)
