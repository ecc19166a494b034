"""The router's backends: one gRPC channel per model server, health-checked, picked by load.

`BackendPool.call` and `BackendPool.stream` are the one way the router calls a tier: they pick the
least-loaded healthy backend, count it in flight, mark it down and try the next on a backend failure,
and raise TierUnavailable when none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.router.config import Backend, LinkSettings, Tier
from stratus_workers.security import TLSFiles

R = TypeVar("R")
M = TypeVar("M", covariant=True)


class StreamingCall(Protocol[M]):
    """What `BackendPool.stream` needs of a server-streaming call (grpc.aio.UnaryStreamCall has it)."""

    def __aiter__(self) -> AsyncIterator[M]: ...

    def cancel(self) -> bool: ...

log = logging.getLogger(__name__)

# Codes that say "this backend cannot serve now" (try another one), as opposed to
# "this request is bad" (another backend would refuse it too).
BACKEND_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


class TierUnavailable(Exception):
    """No backend of a tier could take the call."""


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
        link: LinkSettings | None = None,
    ) -> None:
        self.tls = tls
        self.link = link or LinkSettings()
        self._random = random.Random()
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

    async def _pick(self, tier: Tier, prefer: BackendState | None) -> list[BackendState]:
        found = self.candidates(tier)
        if not found and self.has_tier(tier):
            # Health may be stale (a backend just came back): look again before giving up.
            for backend in self.tier(tier):
                await self.check(backend)
            found = self.candidates(tier)
        if not found:
            raise TierUnavailable(f"no healthy {tier} backend" if self.has_tier(tier) else f"no {tier} tier")
        if prefer is not None and prefer in found:
            found.remove(prefer)
            found.insert(0, prefer)
        return found

    async def _cross_link(self, tier: Tier) -> None:
        """Wait out the simulated edge-to-cloud round trip (benchmarks only; off by default)."""
        if tier != "cloud" or (self.link.delay_ms <= 0 and self.link.jitter_ms <= 0):
            return
        delay = self.link.delay_ms + self._random.uniform(-self.link.jitter_ms, self.link.jitter_ms)
        await asyncio.sleep(max(0.0, delay) / 1e3)

    async def call(
        self, tier: Tier, rpc: Callable[[BackendState], Awaitable[R]], *, prefer: BackendState | None = None
    ) -> tuple[R, BackendState]:
        """`rpc` on the least-loaded healthy backend of `tier` (`prefer` first when it is healthy).

        A backend failure marks that backend down and tries the next; any other error is the caller's
        (ProtocolError with the backend's code). TierUnavailable when no backend could take the call.
        """
        last = ""
        for backend in await self._pick(tier, prefer):
            backend.in_flight += 1
            try:
                await self._cross_link(tier)
                return await rpc(backend), backend
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in BACKEND_FAILURES:
                    raise ProtocolError.from_rpc(exc) from exc
                backend.mark_down(f"{exc.code().name}: {exc.details()}")
                last = f"{backend.name}: {exc.details()}"
            finally:
                backend.in_flight -= 1
        raise TierUnavailable(f"every {tier} backend failed (last: {last})")

    async def stream(
        self, tier: Tier, rpc: Callable[[BackendState], StreamingCall[R]]
    ) -> AsyncIterator[tuple[BackendState, R]]:
        """The messages of a server-streaming `rpc`, each with the backend that sent it.

        Fails over like `call`, but only before the first message: once a message is out, a failure is
        the caller's (ProtocolError), since what was sent cannot be taken back.
        """
        last = ""
        for backend in await self._pick(tier, None):
            backend.in_flight += 1
            call: StreamingCall[R] | None = None
            sent = False
            try:
                await self._cross_link(tier)
                call = rpc(backend)
                async for message in call:
                    sent = True
                    yield backend, message
                return
            except grpc.aio.AioRpcError as exc:
                if sent or exc.code() not in BACKEND_FAILURES:
                    raise ProtocolError.from_rpc(exc) from exc
                backend.mark_down(f"{exc.code().name}: {exc.details()}")
                last = f"{backend.name}: {exc.details()}"
            finally:
                backend.in_flight -= 1
                if call is not None:
                    call.cancel()
        raise TierUnavailable(f"every {tier} backend failed (last: {last})")

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
