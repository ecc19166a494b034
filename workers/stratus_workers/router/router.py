"""The routing core: one preamble (policy, deadline, output cache) before the policy's stream, one account after.

`stream` passes a policy's chunks on, `generate` collects them into one GenerateResponse; the policies
themselves live in `policies.py`, and every backend call goes through the BackendPool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.names import (
    POLICY_FROM_PB,
    POLICY_TO_PB,
    TIER_FROM_PB,
    TIER_TO_PB,
    TIERS,
    Tier,
    tier_name,
)
from stratus_workers.router.backends import BackendPool, TierUnavailable
from stratus_workers.router.cache import OutputCache, cache_key
from stratus_workers.router.config import Policy, RouterConfig
from stratus_workers.router.metrics import RouterMetrics
from stratus_workers.router.policies import Decision, Policies, Turn, replay, time_left

log = logging.getLogger(__name__)


class Router:
    """Routes stratus.v1 requests over a BackendPool according to a RouterConfig.

    Model names: `name` (the router's own) routes by policy; the name a backend reports (its ModelInfo)
    is answered only by backends serving that model, on the tier(s) that serve it; any other name is
    NOT_FOUND.
    """

    def __init__(self, config: RouterConfig, pool: BackendPool, tokenizer: Any = None, name: str = "stratus") -> None:
        self.config = config
        self.pool = pool
        self.name = name
        cache = config.routing.cache
        self.cache = OutputCache(cache.max_entries, cache.ttl_seconds)
        self.metrics = RouterMetrics(pool, self.cache)
        self.policies = Policies(pool, config.routing, tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self.policies.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.policies.tokenizer = tokenizer

    def models(self) -> dict[str, tuple[Tier, ...]]:
        """Every model name this router answers to, with the tiers behind it (all of them for its own)."""
        names: dict[str, tuple[Tier, ...]] = {self.name: TIERS}
        for model, tiers in sorted(self.pool.models().items()):
            names.setdefault(model, tuple(t for t in TIERS if t in tiers))
        return names

    def _model(self, name: str) -> tuple[Tier, ...]:
        """The tiers that answer for model `name` ("" is the router itself); NOT_FOUND for an unknown one."""
        tiers = self.models().get(name or self.name)
        if tiers is None:
            known = ", ".join(repr(n) for n in self.models())
            raise ProtocolError(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} does not exist here; use one of {known} ({self.name!r} routes by policy)",
                "model",
            )
        return tiers

    def resolve(self, request: pb.GenerateRequest) -> tuple[Policy, str]:
        """The policy that answers `request` and the model its backends must serve ("" for any).

        INVALID_ARGUMENT for an unknown policy value, or one that contradicts a tier's model name.
        """
        if request.policy and request.policy not in POLICY_FROM_PB:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"policy is {request.policy}, which is no RoutingPolicy; use "
                + ", ".join(f"{value} ({name})" for name, value in POLICY_TO_PB.items())
                + " or leave it unset for the router's configured policy",
                "policy",
            )
        asked = POLICY_FROM_PB.get(request.policy)
        tiers = self._model(request.model)
        if not request.model or request.model == self.name:
            return asked or self.config.routing.policy, ""
        if len(tiers) > 1:
            return asked or self.config.routing.policy, request.model
        pinned: Policy = "cloud-only" if tiers[0] == "cloud" else "edge-only"
        if asked is not None and asked != pinned:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model {request.model!r} is served by the {tiers[0]} tier only, so policy {asked!r} cannot "
                f"apply; name model {self.name!r} to route by policy",
                "policy",
            )
        return pinned, request.model

    def _deadline(self, started: float, timeout: float | None) -> float:
        limit = self.config.request_timeout_seconds
        return started + min(timeout or limit, limit)

    async def score(self, request: pb.ScoreRequest, timeout: float | None = None) -> pb.ScoreResponse:
        """Have one tier (the cloud unless asked) score a continuation, failing over within the tier."""
        if request.tier and request.tier not in TIER_FROM_PB:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tier is {request.tier}, which is no Tier; use "
                + ", ".join(f"{value} ({name})" for name, value in TIER_TO_PB.items())
                + " or leave it unset for the cloud",
                "tier",
            )
        tier: Tier = TIER_FROM_PB.get(request.tier, "cloud")
        model = request.request.model
        if model == self.name:
            model = ""
        if model and tier not in self._model(model):
            raise ProtocolError(
                grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served by the {tier} tier", "request.model"
            )
        forwarded = pb.ScoreRequest()
        forwarded.CopyFrom(request)
        forwarded.request.model = model
        deadline = self._deadline(time.monotonic(), timeout)
        try:
            response, _ = await self.pool.call(
                tier, lambda b: b.stub.Score(forwarded, timeout=time_left(deadline)), model=model
            )
        except TierUnavailable as exc:
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, f"cannot score on the {tier} tier: {exc}") from exc
        scored: pb.ScoreResponse = response
        return scored

    async def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> pb.GenerateResponse:
        """The whole answer: the policy's stream, collected."""
        collected = _Collector()
        async for chunk in self._answer(request, timeout, streaming=False):
            collected.add(chunk)
        response = collected.response()
        if response is None:
            raise ProtocolError(grpc.StatusCode.INTERNAL, "the answer ended without its final chunk")
        return response

    def stream(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        """The answer as it is produced: text chunks, then the final chunk with the route."""
        return self._answer(request, timeout, streaming=True)

    async def _answer(
        self, request: pb.GenerateRequest, timeout: float | None, *, streaming: bool
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        started = time.monotonic()
        policy: Policy | str = ""
        turn: Turn | None = None
        # Every request is counted once: answered (in _stamp), refused or failed, cancelled, or timed out.
        outcome = ("error", "")
        try:
            policy, model = self.resolve(request)
            request.model = model  # the router's own name means nothing to a backend
            key, hit = self._cached(request, policy)
            if hit is not None:
                for chunk in self._replay_cached(hit, request, started):
                    yield chunk
                outcome = ("cached", "OK")
                return
            turn = Turn(request, policy, started, self._deadline(started, timeout), streaming, model=model)
            collected = _Collector()
            async for chunk in self.policies.run(turn):
                if chunk.HasField("route"):
                    assert turn.decision is not None, "a policy ended without a decision"
                    self._stamp(turn.decision, chunk, request, started)
                    outcome = ("answered", "OK")
                collected.add(chunk)
                yield chunk
        except ProtocolError as exc:
            outcome = ("error", exc.code.name)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if outcome[1] != "OK":
                late = turn is not None and time.monotonic() >= turn.deadline
                outcome = ("deadline", "DEADLINE_EXCEEDED") if late else ("cancelled", "CANCELLED")
            raise
        finally:
            reason, code = outcome
            if reason in ("error", "deadline", "cancelled"):
                tier = turn.decision.tier if turn is not None and turn.decision is not None else ""
                self.metrics.requests.labels(policy, tier, reason, code or "UNKNOWN").inc()
            self.metrics.latency.labels(policy).observe(time.monotonic() - started)
        response = collected.response()
        if (
            key is not None
            and response is not None
            and response.finish_reason != pb.FINISH_REASON_CANCELLED
            and not response.route.degraded
        ):
            self.cache.put(key, response)

    def _stamp(
        self, decision: Decision, final: pb.GenerateStreamResponse, request: pb.GenerateRequest, started: float
    ) -> None:
        """Put the decision on the final chunk and count the answer."""
        final.route.CopyFrom(decision.route())
        final.request_id = request.request_id
        final.timing.total_ms = (time.monotonic() - started) * 1e3
        metrics = self.metrics
        metrics.requests.labels(decision.policy, decision.tier, decision.reason, "OK").inc()
        tokens = final.usage.completion_tokens
        (metrics.cloud_tokens if decision.tier == "cloud" else metrics.edge_tokens).inc(tokens)
        if decision.escalated:
            metrics.escalations.labels(decision.reason).inc()
            metrics.escalated_edge_tokens.inc(decision.edge_tokens)
        if decision.edge_stopped:
            metrics.edge_stops.inc()
        if decision.speculative is not None:
            metrics.drafted.inc(decision.speculative.drafted)
            metrics.accepted.inc(decision.speculative.accepted)
            metrics.rounds.inc(decision.speculative.rounds)
            metrics.drafted_ahead.inc(decision.speculative.ahead_used)
        log.debug(
            "routed",
            extra={
                "policy": decision.policy,
                "tier": decision.tier,
                "reason": decision.reason,
                "backend": decision.backend,
            },
        )

    # -- the output cache -------------------------------------------------------------------

    def _cached(self, request: pb.GenerateRequest, policy: Policy) -> tuple[bytes | None, pb.GenerateResponse | None]:
        if not self.config.routing.cache.enabled:
            return None, None
        key = cache_key(request, policy)
        if key is None:
            return None, None
        hit = self.cache.get(key)
        self.metrics.cache.labels("hit" if hit is not None else "miss").inc()
        if hit is not None:
            self.metrics.requests.labels(policy, tier_name(hit.route.tier), "cached", "OK").inc()
        return key, hit

    @staticmethod
    def _replay_cached(
        hit: pb.GenerateResponse, request: pb.GenerateRequest, started: float
    ) -> list[pb.GenerateStreamResponse]:
        chunks = replay(hit, logprobs=request.return_logprobs)
        final = chunks[-1]
        final.route.cached = True
        final.request_id = request.request_id
        elapsed = (time.monotonic() - started) * 1e3
        final.timing.CopyFrom(pb.Timing(ttft_ms=elapsed, total_ms=elapsed))
        return chunks


class _Collector:
    """Rebuilds a whole GenerateResponse from a stream: the unary answer, and what the cache stores."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[pb.TokenLogprob] = []
        self.prompt_logprobs: list[pb.TokenLogprob] = []
        self.final: pb.GenerateStreamResponse | None = None

    def add(self, chunk: pb.GenerateStreamResponse) -> None:
        self.parts.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        self.prompt_logprobs.extend(chunk.prompt_logprobs)
        if chunk.HasField("route"):
            self.final = chunk

    def response(self) -> pb.GenerateResponse | None:
        if self.final is None:
            return None
        return pb.GenerateResponse(
            text="".join(self.parts),
            finish_reason=self.final.finish_reason,
            usage=self.final.usage,
            logprobs=self.logprobs,
            route=self.final.route,
            timing=self.final.timing,
            model=self.final.model,
            request_id=self.final.request_id,
            prompt_logprobs=self.prompt_logprobs,
        )
