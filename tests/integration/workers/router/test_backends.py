"""The one failover primitive: BackendPool.call and .stream over real gRPC servers whose failures are scripted.

The servers stand in for model servers so that each failure mode (down, refusing, dying mid-stream) can be
set per backend; the pool, the channels, the health checks and the wire are the real ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.servicer import add_inference_servicer
from stratus_workers.router.backends import BackendPool, BackendState, TierUnavailable
from stratus_workers.router.config import Backend

pytestmark = pytest.mark.integration


class Scripted(pb_grpc.InferenceServicer):
    """A backend that answers with its name, or fails with `fail` (after `sent` stream messages)."""

    def __init__(self, name: str, fail: grpc.StatusCode | None = None, sent: int = 0) -> None:
        self.name = name
        self.fail = fail
        self.sent = sent
        self.calls = 0

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        self.calls += 1
        if self.fail is not None:
            await context.abort(self.fail, f"{self.name} fails")
        return pb.GenerateResponse(text=self.name)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        self.calls += 1
        for i in range(3):
            if self.fail is not None and i == self.sent:
                await context.abort(self.fail, f"{self.name} fails after {i}")
            yield pb.GenerateStreamResponse(text=f"{self.name}:{i}")


@asynccontextmanager
async def serving(servicer: Scripted) -> AsyncIterator[str]:
    server = grpc.aio.server()
    add_inference_servicer(servicer, server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@asynccontextmanager
async def pool_of(*servicers: Scripted, tier: str = "edge") -> AsyncIterator[BackendPool]:
    async with AsyncExitStack() as stack:
        addresses = [await stack.enter_async_context(serving(s)) for s in servicers]
        backends = [Backend(name=s.name, address=a, tier=tier) for s, a in zip(servicers, addresses, strict=True)]
        pool = BackendPool(backends, interval=60.0)
        pool.start()
        await pool.wait_checked()
        try:
            yield pool
        finally:
            await pool.close()


def generate(backend: BackendState) -> Any:
    return backend.stub.Generate(pb.GenerateRequest(prompt="x"), timeout=5)


def generate_stream(backend: BackendState) -> Any:
    return backend.stub.GenerateStream(pb.GenerateRequest(prompt="x"), timeout=5)


def by_name(pool: BackendPool, name: str) -> BackendState:
    return next(b for b in pool.backends if b.name == name)


async def test_call_fails_over_past_a_failing_backend_and_marks_it_down() -> None:
    down, up = Scripted("a", grpc.StatusCode.UNAVAILABLE), Scripted("b")
    async with pool_of(down, up) as pool:
        answer, backend = await pool.call("edge", generate, prefer=by_name(pool, "a"))
        assert (answer.text, backend.name) == ("b", "b")
        assert down.calls == 1 and not by_name(pool, "a").healthy and by_name(pool, "a").failures == 1
        assert [b.in_flight for b in pool.backends] == [0, 0]
        await pool.call("edge", generate)
        assert down.calls == 1  # marked down: not tried again until a health check says otherwise


async def test_call_passes_a_refusal_on_without_trying_another_backend() -> None:
    refusing, other = Scripted("a", grpc.StatusCode.INVALID_ARGUMENT), Scripted("b")
    async with pool_of(refusing, other) as pool:
        with pytest.raises(ProtocolError) as caught:
            await pool.call("edge", generate, prefer=by_name(pool, "a"))
        assert (caught.value.code, caught.value.message) == (grpc.StatusCode.INVALID_ARGUMENT, "a fails")
        assert other.calls == 0 and by_name(pool, "a").healthy
        assert [b.in_flight for b in pool.backends] == [0, 0]


async def test_call_says_why_no_backend_could_take_it() -> None:
    async with pool_of(Scripted("a", grpc.StatusCode.INTERNAL), Scripted("b", grpc.StatusCode.UNKNOWN)) as pool:
        with pytest.raises(TierUnavailable, match=r"every edge backend failed \(last: (a|b): (a|b) fails\)"):
            await pool.call("edge", generate)
        with pytest.raises(TierUnavailable, match="no cloud tier"):
            await pool.call("cloud", generate)


async def test_stale_health_is_checked_again_before_giving_up() -> None:
    async with pool_of(Scripted("a")) as pool:
        by_name(pool, "a").mark_down("a failure the health loop has not revisited yet")
        answer, _ = await pool.call("edge", generate)
        assert answer.text == "a" and by_name(pool, "a").healthy


async def test_stream_fails_over_only_before_the_first_message() -> None:
    early, late, fine = (
        Scripted("early", grpc.StatusCode.UNAVAILABLE, sent=0),
        Scripted("late", grpc.StatusCode.UNAVAILABLE, sent=1),
        Scripted("fine"),
    )
    async with pool_of(early, fine) as pool:
        pool.backends.sort(key=lambda b: b.name != "early")  # equal load: the pool keeps this order
        got = [(b.name, m.text) async for b, m in pool.stream("edge", generate_stream)]
        assert got == [("fine", "fine:0"), ("fine", "fine:1"), ("fine", "fine:2")]
        assert early.calls == 1 and not by_name(pool, "early").healthy
    async with pool_of(late, Scripted("spare")) as pool:
        pool.backends.sort(key=lambda b: b.name != "late")
        received: list[str] = []
        with pytest.raises(ProtocolError) as caught:
            async for _, message in pool.stream("edge", generate_stream):
                received.append(message.text)
        assert received == ["late:0"]  # already sent: the answer cannot move to the spare
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert [b.in_flight for b in pool.backends] == [0, 0]


async def test_leaving_a_stream_early_releases_the_backend() -> None:
    async with pool_of(Scripted("a")) as pool:
        stream = pool.stream("edge", generate_stream)
        async for _, message in stream:
            assert message.text == "a:0"
            assert by_name(pool, "a").in_flight == 1
            break
        await stream.aclose()
        assert by_name(pool, "a").in_flight == 0
