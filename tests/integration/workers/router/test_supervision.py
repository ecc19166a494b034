"""Router supervision against a real model server process that freezes (SIGSTOP), in flight and between calls.

A stopped process keeps its sockets: connections open, calls are accepted by the kernel and never answered,
health checks time out. The router must see that for itself: mark the backend down, fail over (cascade) or
fail fast with UNAVAILABLE (edge-only without fallback) instead of waiting out the 60 s deadline, and bring
the backend back once it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import grpc
import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.client import AsyncClient
from stratus_workers.ports import free_port
from stratus_workers.serve.server import ModelServer, ServerSettings

pytestmark = pytest.mark.integration

ALWAYS_EDGE = {"confidenceThreshold": -100.0}
LONG = 400  # tokens: an answer the edge is still writing when it freezes


@contextlib.contextmanager
def resumed_at_exit(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)


async def metric(http: aiohttp.ClientSession, port: int, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def edge_up(http: aiohttp.ClientSession, router_http_port: int) -> float:
    async with http.get(f"http://127.0.0.1:{router_http_port}/metrics") as resp:
        text = await resp.text()
    line = next(line for line in text.splitlines() if line.startswith('stratus_router_backend_up{backend="edge"'))
    return float(line.rsplit(" ", 1)[1])


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


async def test_a_frozen_backend_is_marked_down_and_its_calls_fail_over_or_fail_fast(
    model_server, server_process, router_config, running_router
) -> None:
    edge_http = free_port()
    proc, edge_address = server_process("edge", http_port=edge_http)
    with resumed_at_exit(proc):
        await frozen_and_thawed(proc, edge_address, edge_http, model_server, router_config, running_router)


async def frozen_and_thawed(
    proc: subprocess.Popen[bytes], edge_address: str, edge_http: int, model_server, router_config, running_router
) -> None:
    async with model_server(tier="cloud", name="cloud") as cloud, aiohttp.ClientSession() as http:
        backends = [("edge", edge_address, "edge"), ("cloud", cloud.address, "cloud")]
        limits = {"stall_timeout_seconds": 2.0, "request_timeout_seconds": 60.0}
        failover = router_config("cascade", backends, cascade=ALWAYS_EDGE, cache={"enabled": False})
        strict = router_config("edge-only", backends, allowFallback=False, cache={"enabled": False})
        async with (
            running_router(failover.model_copy(update=limits)) as router_a,
            running_router(strict.model_copy(update=limits)) as router_b,
            AsyncClient(router_a.address, timeout=60) as a,
            AsyncClient(router_b.address, timeout=60) as b,
        ):
            assert (await a.generate("warm", max_new_tokens=8)).route.tier == pb.TIER_EDGE
            assert (await b.generate("warm", max_new_tokens=8)).route.tier == pb.TIER_EDGE

            # Frozen mid-answer: the cascade answers from the cloud, edge-only fails fast.
            cascaded = asyncio.ensure_future(a.generate("long", max_new_tokens=LONG))
            pinned = asyncio.ensure_future(b.generate("long", max_new_tokens=LONG))

            async def both_running() -> bool:
                return await metric(http, edge_http, "stratus_server_active_sequences") >= 2

            await until(both_running, "both answers started on the edge")
            proc.send_signal(signal.SIGSTOP)
            answer = await cascaded
            assert (answer.route.tier, answer.route.reason) == (pb.TIER_CLOUD, "edge-unavailable")
            assert answer.route.escalated and answer.route.degraded
            assert answer.usage.completion_tokens > 0
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pinned
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # not DEADLINE_EXCEEDED after 60 s
            assert "fallback is off" in (caught.value.details() or "")

            # Between calls: the backend is down, readiness and metrics say so, calls skip it.
            async def edge_down() -> bool:
                return await edge_up(http, router_a.http_port) == 0.0

            await until(edge_down, "the router reports the edge down")
            async with http.get(f"http://127.0.0.1:{router_a.http_port}/readyz") as resp:
                ready = await resp.json()
            assert resp.status == 200 and ready["detail"] == "healthy backends: cloud"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await b.generate("still frozen?", max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (await a.generate("still frozen?", max_new_tokens=2)).route.reason == "edge-unavailable"

            # Thawed: health checks bring it back.
            proc.send_signal(signal.SIGCONT)

            async def edge_back() -> bool:
                return await edge_up(http, router_a.http_port) == 1.0

            await until(edge_back, "the router reports the edge up again")
            assert (await a.generate("back", max_new_tokens=2)).route.tier == pb.TIER_EDGE

            # Frozen mid-stream: what was sent stays sent, and the stream ends with UNAVAILABLE at once.
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for chunk in a.stream("stream", max_new_tokens=LONG, policy="edge-only"):
                    received.append(chunk)
                    if len(received) == 1:
                        proc.send_signal(signal.SIGSTOP)
            assert received and caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "in the middle of the answer" in (caught.value.details() or "")


class EngineKilled(BaseException):
    """A fault the engine's per-step recovery (which catches Exception) does not handle: it ends the loop."""


@pytest.mark.parametrize("fault_kind", ["dies", "hangs"])
async def test_a_dead_or_stuck_engine_loop_behind_the_router_fails_over(
    tiny_model_dir, model_server, router_config, running_router, fault_kind
) -> None:
    """Issue 12's must-show: the edge's engine loop dies mid-answer, or stays alive but stops advancing (a
    forward pass that never returns: the process, its gRPC server and its thread all live on); the server
    says NOT_SERVING, the answer in flight and every later one come from the cloud, and the router reports
    the edge down."""
    import threading

    from stratus_workers.models import load_model

    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")  # a private copy: it gets a fault
    armed = threading.Event()
    release = threading.Event()

    def fault(module: object, args: object) -> None:
        if armed.is_set():
            if fault_kind == "dies":
                raise EngineKilled("injected fault in the edge model's forward pass")
            release.wait(60)

    loaded.model.model.layers[0].mlp.register_forward_pre_hook(fault)
    settings = ServerSettings(
        model=str(tiny_model_dir), name="edge", tier="edge", port=0, http_port=0, engine_step_timeout=1.0
    )
    edge = ModelServer(settings, loaded=loaded)
    await edge.start()
    assert edge.engine is not None and edge.engine.stall_timeout == settings.engine_step_timeout
    async with (
        contextlib.AsyncExitStack() as stack,
        model_server(tier="cloud", name="cloud") as cloud,
        aiohttp.ClientSession() as http,
    ):
        stack.push_async_callback(edge.stop, 0.5)
        stack.callback(release.set)  # first: the stuck step returns before the server stops
        backends = [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")]
        config = router_config("cascade", backends, cascade=ALWAYS_EDGE, cache={"enabled": False})
        async with running_router(config) as router, AsyncClient(router.address, timeout=60) as client:
            assert (await client.generate("fine", max_new_tokens=2)).route.tier == pb.TIER_EDGE
            in_flight = asyncio.ensure_future(client.generate("long", max_new_tokens=LONG))
            assert edge.engine is not None
            for _ in range(400):
                if edge.engine.active:
                    break
                await asyncio.sleep(0.01)
            armed.set()
            answer = await in_flight
            assert (answer.route.tier, answer.route.reason, answer.route.degraded) == (
                pb.TIER_CLOUD,
                "edge-unavailable",
                True,
            )
            async with AsyncClient(edge.address) as direct:
                assert not await direct.healthy()  # NOT_SERVING
            async with http.get(f"http://127.0.0.1:{edge.http_port}/readyz") as ready:
                why = {"dies": "injected fault", "hangs": "inside one step for over 1 s"}[fault_kind]
                assert ready.status == 503 and why in (await ready.json())["detail"]

            async def edge_down() -> bool:
                return await edge_up(http, router.http_port) == 0.0

            await until(edge_down, "the router reports the edge down", seconds=5)
            later = await client.generate("later", max_new_tokens=2)
            assert (later.route.tier, later.route.reason) == (pb.TIER_CLOUD, "edge-unavailable")
