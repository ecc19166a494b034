"""The routing core: picks a tier per request by policy, calls it with failover, and says why."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.router.backends import BACKEND_FAILURES, BackendPool, BackendState
from stratus_workers.router.cache import OutputCache, cache_key
from stratus_workers.router.config import Policy, RouterConfig, Tier
from stratus_workers.router.policy import CascadeVerdict, judge_edge_answer, prompt_fits_edge
from stratus_workers.router.speculative import CloudLost, SpeculativeOutcome, speculate
from stratus_workers.serve.server import RequestError, render_prompt, sampling_params

log = logging.getLogger(__name__)

POLICY_FROM_PB: dict[pb.RoutingPolicy.ValueType, Policy] = {
    pb.ROUTING_POLICY_CLOUD_ONLY: "cloud-only",
    pb.ROUTING_POLICY_EDGE_ONLY: "edge-only",
    pb.ROUTING_POLICY_CASCADE: "cascade",
    pb.ROUTING_POLICY_SPECULATIVE: "speculative",
}
POLICY_TO_PB: dict[str, pb.RoutingPolicy.ValueType] = {v: k for k, v in POLICY_FROM_PB.items()}
TIER_PB = {"edge": pb.TIER_EDGE, "cloud": pb.TIER_CLOUD}
TIER_NAME = {pb.TIER_EDGE: "edge", pb.TIER_CLOUD: "cloud", pb.TIER_UNSPECIFIED: ""}
# The router enforces no length limit of its own; the verifying server's context bounds the answer.
SPECULATIVE_MAX_NEW_TOKENS = 4096
OTHER: dict[Tier, Tier] = {"edge": "cloud", "cloud": "edge"}
EDGE_ERROR_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "edge-timeout",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "edge-overloaded",
    grpc.StatusCode.INVALID_ARGUMENT: "edge-rejected",
}


class RouterError(Exception):
    """A failure to hand back to the caller with this gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TierUnavailable(Exception):
    """No backend of a tier could take the request."""


@dataclass
class Decision:
    """What the router did with one request; becomes the response's RouteInfo."""

    policy: Policy
    tier: Tier
    reason: str
    backend: str = ""
    verdict: CascadeVerdict | None = None
    escalated: bool = False
    degraded: bool = False
    speculative: SpeculativeOutcome | None = None

    def route(self) -> pb.RouteInfo:
        info = pb.RouteInfo(
            tier=TIER_PB[self.tier],
            reason=self.reason,
            policy=POLICY_TO_PB[self.policy],
            backend=self.backend,
            escalated=self.escalated,
            degraded=self.degraded,
        )
        if self.speculative is not None:
            info.draft_tokens = self.speculative.drafted
            info.accepted_tokens = self.speculative.accepted
            info.rounds = self.speculative.rounds
        if self.verdict is not None:
            info.confidence = self.verdict.confidence
            info.threshold = self.verdict.threshold
        return info


class _PoolCollector(Collector):
    def __init__(self, pool: BackendPool, cache: OutputCache) -> None:
        self.pool = pool
        self.cache = cache

    def collect(self) -> Any:
        up = GaugeMetricFamily(
            "stratus_router_backend_up", "1 when the backend passes health checks.", labels=["backend", "tier"]
        )
        inflight = GaugeMetricFamily(
            "stratus_router_backend_in_flight", "Requests in flight per backend.", labels=["backend", "tier"]
        )
        for b in self.pool.backends:
            up.add_metric([b.name, b.tier], 1.0 if b.healthy else 0.0)
            inflight.add_metric([b.name, b.tier], float(b.in_flight))
        yield up
        yield inflight
        ratio = GaugeMetricFamily("stratus_router_cache_hit_ratio", "Output cache hits / lookups since start.")
        ratio.add_metric([], self.cache.hit_ratio)
        yield ratio
        entries = GaugeMetricFamily("stratus_router_cache_entries", "Answers held in the output cache.")
        entries.add_metric([], float(len(self.cache)))
        yield entries


class RouterMetrics:
    def __init__(self, pool: BackendPool, cache: OutputCache) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stratus_router_requests",
            "Requests by policy, answering tier, reason and code.",
            ["policy", "tier", "reason", "code"],
            registry=r,
        )
        self.escalations = Counter(
            "stratus_router_escalations", "Cascade escalations to the cloud by reason.", ["reason"], registry=r
        )
        self.latency = Histogram(
            "stratus_router_request_seconds",
            "End-to-end latency at the router.",
            ["policy"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.cloud_tokens = Counter("stratus_router_cloud_tokens", "Tokens generated by the cloud tier.", registry=r)
        self.edge_tokens = Counter("stratus_router_edge_tokens", "Tokens generated by the edge tier.", registry=r)
        self.cache = Counter("stratus_router_cache_lookups", "Output cache lookups by result.", ["result"], registry=r)
        self.drafted = Counter("stratus_router_draft_tokens", "Speculative tokens drafted by the edge.", registry=r)
        self.accepted = Counter(
            "stratus_router_accepted_tokens", "Speculative draft tokens the cloud accepted.", registry=r
        )
        self.auth_rejections = Counter(
            "stratus_router_auth_rejections",
            "Calls refused for a missing or bad bearer token.",
            ["surface"],
            registry=r,
        )
        self.rounds = Counter("stratus_router_verify_rounds", "Speculative verification round trips.", registry=r)
        r.register(_PoolCollector(pool, cache))


class Router:
    """Routes stratus.v1 requests over a BackendPool according to a RouterConfig."""

    def __init__(self, config: RouterConfig, pool: BackendPool, tokenizer: Any = None) -> None:
        self.config = config
        self.pool = pool
        self.tokenizer = tokenizer
        cache = config.routing.cache
        self.cache = OutputCache(cache.max_entries, cache.ttl_seconds)
        self.metrics = RouterMetrics(pool, self.cache)
        self._random = random.Random()

    @property
    def eos(self) -> frozenset[int]:
        value = getattr(self.tokenizer, "eos_token_id", None)
        return frozenset([value]) if isinstance(value, int) else frozenset()

    async def link(self) -> None:
        """Wait out the simulated edge-to-cloud round trip (benchmarks only; off by default)."""
        link = self.config.routing.link
        if link.delay_ms > 0 or link.jitter_ms > 0:
            delay = link.delay_ms + self._random.uniform(-link.jitter_ms, link.jitter_ms)
            await asyncio.sleep(max(0.0, delay) / 1e3)

    # -- helpers --------------------------------------------------------------------------

    def policy_for(self, request: pb.GenerateRequest) -> Policy:
        return POLICY_FROM_PB.get(request.policy, self.config.routing.policy)

    def prompt_tokens(self, request: pb.GenerateRequest) -> int | None:
        if self.tokenizer is None:
            return None
        try:
            return len(render_prompt(self.tokenizer, request))
        except RequestError:
            return None  # malformed: let the backend say what is wrong

    def _timeout(self, deadline: float, cap: float | None = None) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed at the router")
        return min(remaining, cap) if cap is not None else remaining

    async def _candidates(self, tier: Tier) -> list[BackendState]:
        found = self.pool.candidates(tier)
        if not found and self.pool.has_tier(tier):
            # Health may be stale (a backend just came back): look again before giving up.
            for backend in self.pool.tier(tier):
                await self.pool.check(backend)
            found = self.pool.candidates(tier)
        return found

    async def _call(
        self, tier: Tier, request: pb.GenerateRequest, timeout: float
    ) -> tuple[pb.GenerateResponse, BackendState]:
        """Call the least-loaded healthy backend of `tier`, failing over to the next on backend failure."""
        candidates = await self._candidates(tier)
        if not candidates:
            raise TierUnavailable(f"no healthy {tier} backend" if self.pool.has_tier(tier) else f"no {tier} tier")
        last = ""
        for backend in candidates:
            backend.in_flight += 1
            try:
                if tier == "cloud":
                    await self.link()
                response: pb.GenerateResponse = await backend.stub.Generate(request, timeout=timeout)
                return response, backend
            except grpc.aio.AioRpcError as exc:
                if exc.code() in BACKEND_FAILURES:
                    backend.mark_down(f"{exc.code().name}: {exc.details()}")
                    last = f"{backend.name}: {exc.details()}"
                    continue
                raise RouterError(exc.code(), exc.details() or exc.code().name) from exc
            finally:
                backend.in_flight -= 1
        raise TierUnavailable(f"every {tier} backend failed (last: {last})")

    def _finish(
        self, decision: Decision, response: pb.GenerateResponse, request: pb.GenerateRequest, started: float
    ) -> pb.GenerateResponse:
        response.route.CopyFrom(decision.route())
        if not request.return_logprobs:
            del response.logprobs[:]
        response.request_id = request.request_id
        response.timing.total_ms = (time.monotonic() - started) * 1e3
        self._account(decision, response.usage.completion_tokens, "OK")
        return response

    def _account(self, decision: Decision, tokens: int, code: str) -> None:
        self.metrics.requests.labels(decision.policy, decision.tier, decision.reason, code).inc()
        (self.metrics.cloud_tokens if decision.tier == "cloud" else self.metrics.edge_tokens).inc(tokens)
        if decision.escalated:
            self.metrics.escalations.labels(decision.reason).inc()
        log.debug(
            "routed",
            extra={
                "policy": decision.policy,
                "tier": decision.tier,
                "reason": decision.reason,
                "backend": decision.backend,
            },
        )

    # -- policies -------------------------------------------------------------------------

    async def _single_tier(
        self, tier: Tier, policy: Policy, request: pb.GenerateRequest, deadline: float
    ) -> tuple[pb.GenerateResponse, Decision]:
        try:
            response, backend = await self._call(tier, request, self._timeout(deadline))
            return response, Decision(policy, tier, "policy", backend.name)
        except TierUnavailable as exc:
            if not self.config.routing.allow_fallback:
                raise RouterError(grpc.StatusCode.UNAVAILABLE, f"{exc}; fallback is off for this deployment") from exc
            other = OTHER[tier]
            try:
                response, backend = await self._call(other, request, self._timeout(deadline))
            except TierUnavailable as exc2:
                raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no tier can serve: {exc}; {exc2}") from exc2
            return response, Decision(policy, other, f"{tier}-unavailable", backend.name, degraded=True)

    async def _cascade_edge(
        self, request: pb.GenerateRequest, deadline: float
    ) -> tuple[pb.GenerateResponse | None, Decision]:
        """Ask the edge first; returns its answer when it stands, else the decision to escalate."""
        settings = self.config.routing.cascade
        if not prompt_fits_edge(self.prompt_tokens(request), settings):
            return None, Decision("cascade", "cloud", "prompt-too-long")
        edge_request = pb.GenerateRequest()
        edge_request.CopyFrom(request)
        edge_request.return_logprobs = True
        edge_request.policy = pb.ROUTING_POLICY_UNSPECIFIED
        try:
            response, backend = await self._call(
                "edge", edge_request, self._timeout(deadline, settings.edge_timeout_seconds)
            )
        except TierUnavailable:
            return None, Decision("cascade", "cloud", "edge-unavailable", escalated=True, degraded=True)
        except RouterError as exc:
            reason = EDGE_ERROR_REASONS.get(exc.code, "edge-error")
            return None, Decision("cascade", "cloud", reason, escalated=True)
        verdict = judge_edge_answer([lp.logprob for lp in response.logprobs], settings)
        decision = Decision(
            "cascade",
            "edge" if not verdict.escalate else "cloud",
            verdict.reason,
            backend.name,
            verdict=verdict,
            escalated=verdict.escalate,
        )
        return response, decision

    async def _cascade(self, request: pb.GenerateRequest, deadline: float) -> tuple[pb.GenerateResponse, Decision]:
        edge_answer, decision = await self._cascade_edge(request, deadline)
        if edge_answer is not None and decision.tier == "edge":
            return edge_answer, decision
        try:
            response, backend = await self._call("cloud", request, self._timeout(deadline))
        except TierUnavailable as exc:
            if edge_answer is not None:  # a doubtful edge answer beats none
                decision.tier, decision.reason, decision.degraded, decision.escalated = (
                    "edge",
                    "cloud-unavailable",
                    True,
                    False,
                )
                return edge_answer, decision
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no tier can serve: {decision.reason}; {exc}") from exc
        decision.backend = backend.name
        return response, decision

    # -- the two calls --------------------------------------------------------------------

    def _speculative_blocker(self) -> str:
        """Why the speculative policy cannot run now ("" when it can)."""
        if self.tokenizer is None:
            return "no-tokenizer"
        if not self.pool.candidates("cloud"):
            return "cloud-unavailable"
        if not self.pool.candidates("edge"):
            return "edge-unavailable"
        return ""

    async def _speculative_run(
        self, request: pb.GenerateRequest, deadline: float, decision: Decision
    ) -> AsyncIterator[str | SpeculativeOutcome]:
        try:
            prompt = render_prompt(self.tokenizer, request)
            params = sampling_params(request, max_new_tokens=SPECULATIVE_MAX_NEW_TOKENS, default_new_tokens=128)
        except RequestError as exc:
            raise RouterError(exc.code, exc.message) from exc
        edges = self.pool.candidates("edge")
        clouds = self.pool.candidates("cloud")
        if not clouds:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, "no healthy cloud backend to verify drafts")
        edge, cloud = (edges[0] if edges else None), clouds[0]
        decision.backend = f"{edge.name}+{cloud.name}" if edge else cloud.name
        cloud.in_flight += 1
        try:
            async for item in speculate(
                prompt=prompt,
                request=request,
                max_new_tokens=params.max_new_tokens,
                tokenizer=self.tokenizer,
                eos=self.eos,
                edge=edge,
                cloud=cloud,
                settings=self.config.routing.speculative,
                timeout=lambda: self._timeout(deadline),
                link=self.link,
            ):
                if isinstance(item, SpeculativeOutcome):
                    decision.speculative = item
                    if item.edge_lost:
                        decision.reason, decision.degraded = "edge-lost", True
                    self.metrics.drafted.inc(item.drafted)
                    self.metrics.accepted.inc(item.accepted)
                    self.metrics.rounds.inc(item.rounds)
                yield item
        except CloudLost as exc:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"the verifying cloud backend failed: {exc}") from exc
        finally:
            cloud.in_flight -= 1

    async def _speculative(self, request: pb.GenerateRequest, deadline: float) -> tuple[pb.GenerateResponse, Decision]:
        decision = Decision("speculative", "cloud", "speculative")
        parts: list[str] = []
        first = 0.0
        outcome: SpeculativeOutcome | None = None
        started = time.monotonic()
        async for item in self._speculative_run(request, deadline, decision):
            if isinstance(item, str):
                first = first or time.monotonic()
                parts.append(item)
            else:
                outcome = item
        assert outcome is not None
        response = pb.GenerateResponse(
            text="".join(parts),
            finish_reason=outcome.finish,  # type: ignore[arg-type]
            usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=len(outcome.tokens)),
            timing=pb.Timing(ttft_ms=((first or time.monotonic()) - started) * 1e3),
        )
        if request.return_logprobs:
            response.logprobs.extend(
                pb.TokenLogprob(token_id=t, token=self.tokenizer.decode([t]), logprob=lp)
                for t, lp in zip(outcome.tokens, outcome.logprobs, strict=False)
            )
        return response, decision

    async def _answer(
        self, policy: Policy, request: pb.GenerateRequest, deadline: float
    ) -> tuple[pb.GenerateResponse, Decision]:
        if policy == "cascade":
            return await self._cascade(request, deadline)
        if policy == "speculative":
            why = self._speculative_blocker()
            if not why:
                return await self._speculative(request, deadline)
            response, decision = await self._single_tier("cloud", policy, request, deadline)
            if decision.tier == "cloud":
                decision.reason, decision.degraded = why, True
            return response, decision
        tier: Tier = "cloud" if policy == "cloud-only" else "edge"
        return await self._single_tier(tier, policy, request, deadline)

    def _cached(self, request: pb.GenerateRequest, policy: Policy) -> tuple[bytes | None, pb.GenerateResponse | None]:
        if not self.config.routing.cache.enabled:
            return None, None
        key = cache_key(request, policy)
        if key is None:
            return None, None
        hit = self.cache.get(key)
        self.metrics.cache.labels("hit" if hit is not None else "miss").inc()
        if hit is not None:
            hit.route.cached = True
            hit.request_id = request.request_id
            self.metrics.requests.labels(policy, TIER_NAME[hit.route.tier], "cached", "OK").inc()
        return key, hit

    async def score(self, request: pb.ScoreRequest, timeout: float | None = None) -> pb.ScoreResponse:
        """Have one tier (the cloud unless asked) score a continuation, failing over within the tier."""
        tier: Tier = "edge" if request.tier == pb.TIER_EDGE else "cloud"
        deadline = time.monotonic() + min(
            timeout or self.config.request_timeout_seconds, self.config.request_timeout_seconds
        )
        candidates = await self._candidates(tier)
        if not candidates:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no healthy {tier} backend to score with")
        for backend in candidates:
            try:
                if tier == "cloud":
                    await self.link()
                response: pb.ScoreResponse = await backend.stub.Score(request, timeout=self._timeout(deadline))
                return response
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in BACKEND_FAILURES:
                    raise RouterError(exc.code(), exc.details() or exc.code().name) from exc
                backend.mark_down(f"{exc.code().name}: {exc.details()}")
        raise RouterError(grpc.StatusCode.UNAVAILABLE, f"every {tier} backend failed to score")

    async def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> pb.GenerateResponse:
        started = time.monotonic()
        policy = self.policy_for(request)
        deadline = started + min(timeout or self.config.request_timeout_seconds, self.config.request_timeout_seconds)
        key, hit = self._cached(request, policy)
        if hit is not None:
            hit.timing.total_ms = (time.monotonic() - started) * 1e3
            return hit
        try:
            response, decision = await self._answer(policy, request, deadline)
        except RouterError as exc:
            self.metrics.requests.labels(policy, "", "error", exc.code.name).inc()
            raise
        finally:
            self.metrics.latency.labels(policy).observe(time.monotonic() - started)
        response = self._finish(decision, response, request, started)
        if key is not None and not decision.degraded:
            self.cache.put(key, response)
        return response

    async def stream(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        started = time.monotonic()
        policy = self.policy_for(request)
        deadline = started + min(timeout or self.config.request_timeout_seconds, self.config.request_timeout_seconds)
        key, hit = self._cached(request, policy)
        if hit is not None:
            async for chunk in _replay_response(hit, request, started):
                yield chunk
            return
        collected = _Collector()
        try:
            async for chunk in self._stream_answer(policy, request, deadline, started):
                collected.add(chunk)
                yield chunk
        finally:
            self.metrics.latency.labels(policy).observe(time.monotonic() - started)
        final = collected.response()
        if key is not None and final is not None and not final.route.degraded:
            self.cache.put(key, final)

    async def _stream_answer(
        self, policy: Policy, request: pb.GenerateRequest, deadline: float, started: float
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        if policy == "cascade":
            edge_answer, decision = await self._cascade_edge(request, deadline)
            if edge_answer is not None and decision.tier == "edge":
                async for chunk in self._replay(edge_answer, decision, request, started):
                    yield chunk
                return
            tiers: list[Tier] = ["cloud"]
        else:
            blocker = self._speculative_blocker() if policy == "speculative" else ""
            if policy == "speculative" and not blocker:
                async for chunk in self._speculative_stream(request, deadline, started):
                    yield chunk
                return
            first: Tier = "edge" if policy == "edge-only" else "cloud"
            reason = blocker or "policy"
            decision = Decision(policy, first, reason, degraded=policy == "speculative")
            tiers = [first, OTHER[first]] if self.config.routing.allow_fallback else [first]
        async for chunk in self._proxy_stream(tiers, decision, request, deadline, started):
            yield chunk

    async def _speculative_stream(
        self, request: pb.GenerateRequest, deadline: float, started: float
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        decision = Decision("speculative", "cloud", "speculative")
        first = 0.0
        async for item in self._speculative_run(request, deadline, decision):
            if isinstance(item, str):
                first = first or time.monotonic()
                yield pb.GenerateStreamResponse(text=item)
                continue
            now = time.monotonic()
            self._account(decision, len(item.tokens), "OK")
            yield pb.GenerateStreamResponse(
                finish_reason=item.finish,  # type: ignore[arg-type]
                usage=pb.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=len(item.tokens)),
                route=decision.route(),
                request_id=request.request_id,
                timing=pb.Timing(ttft_ms=((first or now) - started) * 1e3, total_ms=(now - started) * 1e3),
            )

    async def _replay(
        self, answer: pb.GenerateResponse, decision: Decision, request: pb.GenerateRequest, started: float
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        if answer.text:
            chunk = pb.GenerateStreamResponse(text=answer.text)
            if request.return_logprobs:
                chunk.logprobs.extend(answer.logprobs)
            yield chunk
        self._account(decision, answer.usage.completion_tokens, "OK")
        yield pb.GenerateStreamResponse(
            finish_reason=answer.finish_reason,
            usage=answer.usage,
            route=decision.route(),
            model=answer.model,
            request_id=request.request_id,
            timing=pb.Timing(
                queue_ms=answer.timing.queue_ms,
                ttft_ms=answer.timing.ttft_ms,
                total_ms=(time.monotonic() - started) * 1e3,
            ),
        )

    async def _proxy_stream(
        self, tiers: list[Tier], decision: Decision, request: pb.GenerateRequest, deadline: float, started: float
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Stream from the first tier that takes the request; fail over only before the first chunk."""
        reasons: list[str] = []
        for index, tier in enumerate(tiers):
            for backend in await self._candidates(tier):
                call = backend.stub.GenerateStream(request, timeout=self._timeout(deadline))
                backend.in_flight += 1
                sent = False
                try:
                    async for chunk in call:
                        if chunk.HasField("route"):
                            if index > 0:
                                decision.tier, decision.reason, decision.degraded = (
                                    tier,
                                    f"{tiers[0]}-unavailable",
                                    True,
                                )
                            decision.backend = backend.name
                            chunk.route.CopyFrom(decision.route())
                            chunk.request_id = request.request_id
                            chunk.timing.total_ms = (time.monotonic() - started) * 1e3
                            self._account(decision, chunk.usage.completion_tokens, "OK")
                        sent = True
                        yield chunk
                    return
                except grpc.aio.AioRpcError as exc:
                    if sent or exc.code() not in BACKEND_FAILURES:
                        raise RouterError(exc.code(), exc.details() or exc.code().name) from exc
                    backend.mark_down(f"{exc.code().name}: {exc.details()}")
                    reasons.append(f"{backend.name}: {exc.details()}")
                finally:
                    backend.in_flight -= 1
                    call.cancel()
            reasons.append(f"no healthy {tier} backend")
        raise RouterError(grpc.StatusCode.UNAVAILABLE, "no tier can serve: " + "; ".join(reasons))


async def _replay_response(
    response: pb.GenerateResponse, request: pb.GenerateRequest, started: float
) -> AsyncIterator[pb.GenerateStreamResponse]:
    """A stored answer as a stream: its text in one chunk, then the final chunk."""
    if response.text:
        chunk = pb.GenerateStreamResponse(text=response.text)
        if request.return_logprobs:
            chunk.logprobs.extend(response.logprobs)
        yield chunk
    yield pb.GenerateStreamResponse(
        finish_reason=response.finish_reason,
        usage=response.usage,
        route=response.route,
        model=response.model,
        request_id=request.request_id,
        timing=pb.Timing(ttft_ms=(time.monotonic() - started) * 1e3, total_ms=(time.monotonic() - started) * 1e3),
    )


class _Collector:
    """Rebuilds a whole GenerateResponse from a stream so streamed answers can be cached too."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[pb.TokenLogprob] = []
        self.final: pb.GenerateStreamResponse | None = None

    def add(self, chunk: pb.GenerateStreamResponse) -> None:
        self.parts.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        if chunk.HasField("route"):
            self.final = chunk

    def response(self) -> pb.GenerateResponse | None:
        if self.final is None or self.final.finish_reason == pb.FINISH_REASON_CANCELLED:
            return None
        return pb.GenerateResponse(
            text="".join(self.parts),
            finish_reason=self.final.finish_reason,
            usage=self.final.usage,
            logprobs=self.logprobs,
            route=self.final.route,
            timing=self.final.timing,
            model=self.final.model,
        )
