"""Thin, typed wrappers over the generated stubs: build requests, call, stream, check health."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.protocol.names import FINISH_FROM_PB, POLICIES, TIER_FROM_PB, policy_value, tier_value

# Display tables for the CLI, derived from protocol.names so they cannot drift from what the router accepts.
TIER_NAMES: dict[pb.Tier.ValueType, str] = {pb.TIER_UNSPECIFIED: "?", **TIER_FROM_PB}
FINISH_NAMES: dict[pb.FinishReason.ValueType, str] = {pb.FINISH_REASON_UNSPECIFIED: "", **FINISH_FROM_PB}
Message = dict[str, str]

__all__ = ["FINISH_NAMES", "POLICIES", "TIER_NAMES", "AsyncClient", "Client", "Message", "build_request"]


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    logprobs: bool = False,
    model: str = "",
    request_id: str = "",
    policy: str | None = None,
    top_logprobs: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    echo: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt or chat messages ([{"role": ..., "content": ...}])."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    request = pb.GenerateRequest(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=list(stop),
        return_logprobs=logprobs,
        model=model,
        request_id=request_id,
        top_logprobs=top_logprobs,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=logit_bias or {},
        echo=echo,
    )
    if prompt is not None:
        request.prompt = prompt
    else:
        request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ())
    if seed is not None:
        request.seed = seed
    if policy is not None:
        request.policy = policy_value(policy)
    return request


def _credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials when a CA is given (plus a client certificate when both cert and key are)."""
    if not tls_ca:
        if tls_cert or tls_key:
            raise ValueError("tls_cert and tls_key need tls_ca (the CA that signed the server)")
        return None
    with open(tls_ca, "rb") as ca:
        root = ca.read()
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("give tls_cert and tls_key together")
    if tls_cert and tls_key:
        with open(tls_cert, "rb") as cert, open(tls_key, "rb") as key:
            return grpc.ssl_channel_credentials(root, key.read(), cert.read())
    return grpc.ssl_channel_credentials(root)


def _dial(
    api: Any, target: str, tls_ca: str | None, tls_cert: str | None, tls_key: str | None, max_message_bytes: int
) -> Any:
    """A channel from `grpc` or `grpc.aio` (`api`): TLS when a CA is given, plaintext otherwise."""
    credentials = _credentials(tls_ca, tls_cert, tls_key)
    options = _channel_options(max_message_bytes)
    if credentials is not None:
        return api.secure_channel(target, credentials, options=options)
    return api.insecure_channel(target, options=options)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


class AsyncClient:
    """asyncio client: `async with AsyncClient("host:port") as c: r = await c.generate("Hi")`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 120.0,
        max_message_bytes: int = 4 << 20,
        channel: grpc.aio.Channel | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = _metadata(token)
        self._channel = channel or _dial(grpc.aio, target, tls_ca, tls_cert, tls_key, max_message_bytes)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        request = build_request(prompt, **kwargs)
        response: pb.GenerateResponse = await self._stub.Generate(
            request, timeout=timeout or self.timeout, metadata=self._metadata
        )
        return response

    async def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self._stub.GenerateStream(
            build_request(prompt, **kwargs), timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfoResponse:
        info: pb.ModelInfoResponse = await self._stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=timeout, metadata=self._metadata
        )
        return info

    async def score(
        self,
        continuation: str,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        tier: str | None = None,
        timeout: float | None = None,
    ) -> pb.ScoreResponse:
        """How likely the model (at a router: the cloud tier, or `tier`) finds `continuation` as the answer."""
        request = pb.ScoreRequest(request=build_request(prompt, messages=messages), continuation=continuation)
        if tier is not None:
            request.tier = tier_value(tier)
        response: pb.ScoreResponse = await self._stub.Score(
            request, timeout=timeout or self.timeout, metadata=self._metadata
        )
        return response

    async def healthy(self, service: str = "", timeout: float = 2.0) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class Client:
    """Blocking client with the same calls as AsyncClient, for scripts and simple devices."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 120.0,
        max_message_bytes: int = 4 << 20,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = _metadata(token)
        self._channel = _dial(grpc, target, tls_ca, tls_cert, tls_key, max_message_bytes)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        response: pb.GenerateResponse = self._stub.Generate(
            build_request(prompt, **kwargs), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return response

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateStreamResponse]:
        call = self._stub.GenerateStream(
            build_request(prompt, **kwargs), timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            yield from call
        finally:
            call.cancel()

    def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfoResponse:
        info: pb.ModelInfoResponse = self._stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=timeout, metadata=self._metadata
        )
        return info

    def healthy(self, service: str = "", timeout: float = 2.0) -> bool:
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
