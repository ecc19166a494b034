"""Hand-written registration of a stratus.v1.Inference servicer: undecodable requests get INVALID_ARGUMENT.

The generated `add_InferenceServicer_to_server` lets a protobuf DecodeError (for example a string
field holding invalid UTF-8) escape as UNKNOWN with a stack-trace-like message. Registering the same
methods from the service descriptor with a tolerant deserializer turns that into a clear refusal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from stratus_workers.protocol.names import SERVICE


class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, type_name: str, error: str) -> None:
        self.message = (
            f"the {type_name} could not be decoded: {error}; string fields must be valid UTF-8 "
            "and the message must match stratus.v1"
        )


def _deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_class.DESCRIPTOR.name, str(exc))

    return parse


def _unary(method: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handle


def _streaming(method: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for item in method(request, context):
            yield item

    return handle


def add_inference_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    """Serve every stratus.v1.Inference method of `servicer` on `server`."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        implementation = getattr(servicer, method.name)
        kwargs = {
            "request_deserializer": _deserializer(request_class),
            "response_serializer": response_class.SerializeToString,
        }
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_streaming(implementation), **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(implementation), **kwargs)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
