"""The router's backends: one gRPC channel per model server, health-checked, supervised, picked by load.

`BackendPool.call` and `BackendPool.stream` are the one way the router calls a tier: they pick the
least-loaded healthy backend, count it in flight, mark it down and try the next on a backend failure,
and raise TierUnavailable when none is left.

Supervision does not trust a backend's own health answer alone. A call that makes no progress (no
message on a stream within `stall_timeout`, no answer to a unary call within a bound derived from the
backend's recent seconds per token) while the backend has made no progress on any other call either is
a stall: the backend is marked down, its calls are abandoned and tried elsewhere, and the health loop
brings it back when it answers again. A backend that stops answering health checks altogether (a
frozen process) has its calls abandoned at once unless it made progress since the check was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stratus_workers.api import inference_pb2 as pb
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
# Seconds per generated token assumed of a backend that has not answered yet: slow on purpose, so that a
# backend is never called stalled for being slower than a guess.
UNKNOWN_SECONDS_PER_TOKEN = 0.25
# The budget assumed of a request that leaves it to a server whose limit is not known yet.
UNKNOWN_TOKEN_LIMIT = 512
# A unary call may take this many times the tokens it asked for at the backend's recent pace.
PACE_SLACK = 2.0
# How much each new answer moves a backend's seconds per token (exponential moving average).
PACE_WEIGHT = 0.2


class TierUnavailable(Exception):
    """No backend of a tier could take the call."""


class BackendStalled(Exception):
    """A call was abandoned because its backend stopped making progress (the backend is marked down)."""


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
    # What the server says it is (ModelInfo), read once it first passes a health check.
    model: str = ""
    max_new_tokens: int = 0
    # When the backend last showed it works: a stream message, or an answer to a call.
    last_progress: float = field(default_factory=time.monotonic)
    # When a health check that got no answer at all was sent (None while checks are answered).
    unreachable_since: float | None = None
    # Recent seconds per generated token (None until an answer said).
    seconds_per_token: float | None = None

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

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def learn_pace(self, usage: pb.Usage, timing: pb.Timing) -> None:
        """Fold one answer's decode time per token into `seconds_per_token`."""
        tokens = usage.completion_tokens
        decode_ms = timing.total_ms - timing.ttft_ms
        if tokens < 2 or decode_ms <= 0:
            return
        pace = decode_ms / 1e3 / (tokens - 1)
        previous = self.seconds_per_token
        self.seconds_per_token = pace if previous is None else previous + PACE_WEIGHT * (pace - previous)

    def patience(self, stall_timeout: float, tokens: int | None) -> float:
        """How long a unary call generating up to `tokens` tokens (None: the server's limit) may take."""
        if tokens is None:
            tokens = self.max_new_tokens or UNKNOWN_TOKEN_LIMIT
        pace = self.seconds_per_token if self.seconds_per_token is not None else UNKNOWN_SECONDS_PER_TOKEN
        return stall_timeout + tokens * pace * PACE_SLACK


class BackendPool:
    """All backends of one router; a background task keeps their health current."""

    def __init__(
        self,
        backends: Iterable[Backend],
        *,
        interval: float = 2.0,
        check_timeout: float = 1.0,
        stall_timeout: float = 10.0,
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
        self.stall_timeout = stall_timeout
        # How often a waiting call looks at its backend's state.
        self._tick = min(0.5, stall_timeout / 4)
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

    def candidates(self, tier: Tier, model: str = "") -> list[BackendState]:
        """Healthy backends of `tier` (serving `model`, when given), least loaded first."""
        return sorted(
            (b for b in self.tier(tier) if b.healthy and (not model or b.model == model)),
            key=lambda b: (b.in_flight, b.failures),
        )

    def models(self) -> dict[str, set[Tier]]:
        """The model names the backends reported, each with the tiers that serve it."""
        names: dict[str, set[Tier]] = {}
        for backend in self.backends:
            if backend.model:
                names.setdefault(backend.model, set()).add(backend.tier)
        return names

    async def _pick(self, tier: Tier, prefer: BackendState | None, model: str) -> list[BackendState]:
        found = self.candidates(tier, model)
        if not found and self.has_tier(tier):
            # Health may be stale (a backend just came back): look again before giving up.
            for backend in self.tier(tier):
                await self.check(backend)
            found = self.candidates(tier, model)
        if not found:
            what = f"{tier} backend serving {model!r}" if model else f"{tier} backend"
            raise TierUnavailable(f"no healthy {what}" if self.has_tier(tier) else f"no {tier} tier")
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

    async def _supervised(self, backend: BackendState, step: Awaitable[R], patience: float) -> R:
        """`step` (a unary call, or a stream's next message), abandoned when `backend` stalls.

        It stalls when `patience` seconds pass without `step` finishing and the backend has shown no
        progress on any call for `stall_timeout`; or when a health check got no answer and nothing
        arrived from the backend since that check was sent. BackendStalled then, after cancelling `step`.
        """
        task = asyncio.ensure_future(step)
        started = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=self._tick)
                if done:
                    return task.result()
                now = time.monotonic()
                silent = backend.unreachable_since
                if silent is not None and backend.last_progress < silent and started < silent:
                    raise BackendStalled(f"{backend.name} stopped answering ({backend.last_error})")
                idle = now - backend.last_progress
                if now - started > patience and idle > self.stall_timeout:
                    reason = f"stalled: no progress in {min(idle, now - started):.1f} s"
                    backend.mark_down(reason)
                    raise BackendStalled(f"{backend.name} {reason}")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task

    async def call(
        self,
        tier: Tier,
        rpc: Callable[[BackendState], Awaitable[R]],
        *,
        prefer: BackendState | None = None,
        model: str = "",
        tokens: int | None = 1,
    ) -> tuple[R, BackendState]:
        """`rpc` on the least-loaded healthy backend of `tier` (`prefer` first when it is healthy).

        `model` restricts the choice to backends serving that model; `tokens` is how many tokens the call
        may generate, None for as many as the server allows (its stall bound grows with them). A backend
        failure or stall marks that backend down and tries the next; any other error is the caller's
        (ProtocolError with the backend's code).
        TierUnavailable when no backend could take the call.
        """
        last = ""
        for backend in await self._pick(tier, prefer, model):
            backend.in_flight += 1
            try:
                await self._cross_link(tier)
                answer = await self._supervised(backend, rpc(backend), backend.patience(self.stall_timeout, tokens))
                backend.progressed()
                return answer, backend
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in BACKEND_FAILURES:
                    backend.progressed()  # it answered, if only to refuse
                    raise ProtocolError.from_rpc(exc) from exc
                backend.mark_down(f"{exc.code().name}: {exc.details()}")
                last = f"{backend.name}: {exc.details()}"
            except BackendStalled as exc:
                last = str(exc)
            finally:
                backend.in_flight -= 1
        raise TierUnavailable(f"every {tier} backend failed (last: {last})")

    async def stream(
        self, tier: Tier, rpc: Callable[[BackendState], StreamingCall[R]], *, model: str = ""
    ) -> AsyncGenerator[tuple[BackendState, R], None]:
        """The messages of a server-streaming `rpc`, each with the backend that sent it.

        Fails over like `call`, but only before the first message: once a message is out, a failure or a
        stall is the caller's (ProtocolError; UNAVAILABLE for a stall), since what was sent cannot be taken
        back. A stream stalls when no message comes for `stall_timeout` while its backend shows no progress.
        """
        last = ""
        for backend in await self._pick(tier, None, model):
            backend.in_flight += 1
            call: StreamingCall[R] | None = None
            sent = False
            try:
                await self._cross_link(tier)
                call = rpc(backend)
                messages = call.__aiter__()
                while True:
                    more, message = await self._supervised(backend, _next(messages), self.stall_timeout)
                    backend.progressed()
                    if not more:
                        return
                    sent = True
                    yield backend, message
            except grpc.aio.AioRpcError as exc:
                if sent or exc.code() not in BACKEND_FAILURES:
                    raise ProtocolError.from_rpc(exc) from exc
                backend.mark_down(f"{exc.code().name}: {exc.details()}")
                last = f"{backend.name}: {exc.details()}"
            except BackendStalled as exc:
                if sent:
                    raise ProtocolError(grpc.StatusCode.UNAVAILABLE, f"{exc} in the middle of the answer") from exc
                last = str(exc)
            finally:
                backend.in_flight -= 1
                if call is not None:
                    call.cancel()
        raise TierUnavailable(f"every {tier} backend failed (last: {last})")

    async def check(self, backend: BackendState) -> bool:
        sent = time.monotonic()
        try:
            reply = await backend.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout)
            ok = bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
            reason = "" if ok else f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            backend.unreachable_since = None
        except grpc.aio.AioRpcError as exc:
            ok, reason = False, f"health check got no answer: {exc.code().name}: {exc.details()}"
            if backend.unreachable_since is None:
                backend.unreachable_since = sent
        if ok and not backend.model:
            await self._describe(backend)
        if ok and not backend.healthy:
            log.info("backend up", extra={"backend": backend.name, "tier": backend.tier})
            backend.progressed()  # a backend back from a stall starts with a clean slate
        if ok:
            backend.healthy, backend.last_error = True, ""
        else:
            backend.mark_down(reason)
        backend.checked.set()
        return ok

    async def _describe(self, backend: BackendState) -> None:
        """Learn the backend's model name and limits from its ModelInfo (tried again at the next check)."""
        try:
            info = await backend.stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.check_timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("no model info yet", extra={"backend": backend.name, "error": exc.details()})
            return
        backend.model, backend.max_new_tokens = info.model, info.max_new_tokens

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


async def _next(messages: AsyncIterator[R]) -> tuple[bool, Any]:
    """The next message of a stream as (True, message), or (False, None) at its end."""
    try:
        return True, await messages.__anext__()
    except StopAsyncIteration:
        return False, None
