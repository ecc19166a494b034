"""The router's backends: one gRPC channel per model server, health-checked, picked by load."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.router.config import Backend, Tier
from stratus_workers.security import TLSFiles

log = logging.getLogger(__name__)

# Codes that say "this backend cannot serve now" (try another one), as opposed to
# "this request is bad" (another backend would refuse it too).
BACKEND_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


@dataclass
class BackendState:
    config: Backend
    channel: grpc.aio.Channel
    stub: pb_grpc.InferenceStub
    health: health_pb2_grpc.HealthStub
    healthy: bool = False
    in_flight: int = 0
    failures: int = 0
    last_error: str = "not checked yet"
    checked: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def tier(self) -> Tier:
        return self.config.tier

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            log.warning("backend down", extra={"backend": self.name, "reason": reason})
        self.healthy = False
        self.failures += 1
        self.last_error = reason


class BackendPool:
    """All backends of one router; a background task keeps their health current."""

    def __init__(
        self,
        backends: Iterable[Backend],
        *,
        interval: float = 2.0,
        check_timeout: float = 1.0,
        max_message_bytes: int = 4 << 20,
        tls: TLSFiles | None = None,
    ) -> None:
        self.tls = tls
        # Channels bind to the running event loop, so they are opened in start(), not here.
        self._configs = list(backends)
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Reconnect quickly after a backend restarts instead of backing off for long.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.backends: list[BackendState] = []
        self.interval = interval
        self.check_timeout = check_timeout
        self._task: asyncio.Task[None] | None = None

    def _open(self) -> None:
        for backend in self._configs:
            channel = (
                grpc.aio.secure_channel(backend.address, self.tls.channel_credentials(), options=self._options)
                if self.tls
                else grpc.aio.insecure_channel(backend.address, options=self._options)
            )
            self.backends.append(
                BackendState(backend, channel, pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel))
            )

    def tier(self, tier: Tier) -> list[BackendState]:
        return [b for b in self.backends if b.tier == tier]

    def has_tier(self, tier: Tier) -> bool:
        return any(b.tier == tier for b in self._configs)

    def candidates(self, tier: Tier) -> list[BackendState]:
        """Healthy backends of `tier`, least loaded first."""
        return sorted((b for b in self.tier(tier) if b.healthy), key=lambda b: (b.in_flight, b.failures))

    async def check(self, backend: BackendState) -> bool:
        try:
            reply = await backend.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout)
            ok = bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
            reason = "" if ok else f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        except grpc.aio.AioRpcError as exc:
            ok, reason = False, f"{exc.code().name}: {exc.details()}"
        if ok and not backend.healthy:
            log.info("backend up", extra={"backend": backend.name, "tier": backend.tier})
        if ok:
            backend.healthy, backend.last_error = True, ""
        else:
            backend.mark_down(reason)
        backend.checked.set()
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check_all()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if not self.backends:
            self._open()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stratus-health")

    async def wait_checked(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(b.checked.wait() for b in self.backends)), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.gather(*(b.channel.close() for b in self.backends))
        self.backends.clear()
