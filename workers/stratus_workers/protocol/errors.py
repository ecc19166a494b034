"""The one refusal type of the data plane: a gRPC status code and a message that says what to change.

A refusal may name the request field at fault (`field`, a path such as `chat.messages[0].role`). It
travels in the `stratus-field` trailing metadata of the failed call, so the router passes it on and the
HTTP API can name the parameter the caller sent (`param` in OpenAI's error shape).
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

FIELD_METADATA = "stratus-field"


class ProtocolError(Exception):
    """A request refused or failed with this gRPC status code; `message` is what the caller sees."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError) -> ProtocolError:
        """A failed call to another server, passed on with its code, details and field."""
        field = ""
        for key, value in error.trailing_metadata() or ():
            if key == FIELD_METADATA and isinstance(value, str):
                field = value
        return cls(error.code(), error.details() or error.code().name, field)

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        """End the call being served with this refusal (its field in the trailing metadata)."""
        metadata = ((FIELD_METADATA, self.field),) if self.field else ()
        await context.abort(self.code, self.message, trailing_metadata=metadata)
        raise AssertionError("unreachable: abort raises")
