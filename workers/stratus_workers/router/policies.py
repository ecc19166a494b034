"""The routing policies, each written once as a stream of answer chunks; `Router` stamps and collects them.

A policy picks the tier, asks it through the BackendPool and records what it did in `turn.decision`.
The last chunk it yields is the final one: it carries the finish reason, the usage and a RouteInfo (the
route marks the final chunk), which the Router replaces with the decision's. `Router.stream` passes the
chunks on as they come; `Router.generate` collects them into one GenerateResponse.

Trade-off: for a unary caller (`Turn.streaming` false) a backend is still asked with the unary Generate
RPC, and its answer replayed as one text chunk plus the final chunk. Asking with GenerateStream would cost
a message per decode step instead of one, and would give up failing over when a backend dies mid-answer,
which a unary caller, who has seen nothing yet, can still be spared.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.names import POLICY_TO_PB, TIER_TO_PB, Policy, Tier
from stratus_workers.protocol.requests import generation_sampling, render_prompt
from stratus_workers.router.backends import (
    BACKEND_FAILURES,
    BackendPool,
    BackendState,
    StreamingCall,
    TierUnavailable,
)
from stratus_workers.router.config import RoutingSpec
from stratus_workers.router.policy import CascadeVerdict, EdgeWatch, judge_edge_answer, prompt_fits_edge
from stratus_workers.router.speculative import SpeculativeOutcome, speculate

# The router enforces no length limit of its own; the verifying server's context bounds the answer.
SPECULATIVE_MAX_NEW_TOKENS = 4096
SPECULATIVE_DEFAULT_NEW_TOKENS = 128
OTHER: dict[Tier, Tier] = {"edge": "cloud", "cloud": "edge"}
EDGE_ERROR_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "edge-timeout",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "edge-overloaded",
    grpc.StatusCode.INVALID_ARGUMENT: "edge-rejected",
}


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
    edge_tokens: int = 0  # cascade: tokens the edge gave for this request before it ended or was stopped
    edge_stopped: bool = False  # cascade: the edge was stopped once its answer could only escalate

    def route(self) -> pb.RouteInfo:
        info = pb.RouteInfo(
            tier=TIER_TO_PB[self.tier],
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


@dataclass
class Turn:
    """One request on its way through a policy."""

    request: pb.GenerateRequest
    policy: Policy
    started: float
    deadline: float
    streaming: bool  # whether the caller reads the answer as a stream (see the module's trade-off)
    model: str = ""  # answer only from backends serving this model ("" for any)
    decision: Decision | None = None

    def timeout(self, cap: float | None = None) -> float:
        """Seconds left for the next backend call (at most `cap`)."""
        return time_left(self.deadline, cap)


def time_left(deadline: float, cap: float | None = None) -> float:
    """Seconds left before `deadline` (at most `cap`); DEADLINE_EXCEEDED once none are."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ProtocolError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed at the router")
    return min(remaining, cap) if cap is not None else remaining


def answer_limit(request: pb.GenerateRequest, backend: BackendState) -> int | None:
    """The most tokens `backend` may generate for `request` (None when it has not said its limit)."""
    return request.max_new_tokens or backend.max_new_tokens or None


def replay(answer: pb.GenerateResponse, *, logprobs: bool) -> list[pb.GenerateStreamResponse]:
    """A whole answer as a stream: its echoed prompt and its text (and log-probabilities, if wanted) in one
    chunk, then the final one."""
    chunks = []
    if answer.text or answer.prompt_logprobs or (logprobs and answer.logprobs):
        chunk = pb.GenerateStreamResponse(text=answer.text, prompt_logprobs=answer.prompt_logprobs)
        if logprobs:
            chunk.logprobs.extend(answer.logprobs)
        chunks.append(chunk)
    final = pb.GenerateStreamResponse(
        finish_reason=answer.finish_reason,
        usage=answer.usage,
        model=answer.model,
        request_id=answer.request_id,
        timing=pb.Timing(queue_ms=answer.timing.queue_ms, ttft_ms=answer.timing.ttft_ms),
    )
    final.route.CopyFrom(answer.route)
    final.route.SetInParent()  # present even when empty: the route marks the final chunk
    chunks.append(final)
    return chunks


class Policies:
    """The four routing policies over one BackendPool; `run` picks the one a Turn names."""

    def __init__(self, pool: BackendPool, routing: RoutingSpec, tokenizer: Any = None) -> None:
        self.pool = pool
        self.routing = routing
        self.tokenizer = tokenizer

    def run(self, turn: Turn) -> AsyncIterator[pb.GenerateStreamResponse]:
        if turn.policy == "cascade":
            return self.cascade(turn)
        if turn.policy == "speculative":
            return self.speculative(turn)
        return self.single_tier(turn, "cloud" if turn.policy == "cloud-only" else "edge")

    # -- building blocks ----------------------------------------------------------------

    def prompt_tokens(self, request: pb.GenerateRequest) -> int | None:
        if self.tokenizer is None:
            return None
        try:
            return len(render_prompt(self.tokenizer, request))
        except ProtocolError:
            return None  # malformed: let the backend say what is wrong

    async def _from_tier(self, turn: Turn, tier: Tier, decision: Decision) -> AsyncIterator[pb.GenerateStreamResponse]:
        """The answer of one tier to the request as it stands; `decision.backend` names who gave it.

        TierUnavailable only before the first chunk, so a caller may still try another tier.
        """
        request = turn.request
        if turn.streaming:

            def generate_stream(backend: BackendState) -> StreamingCall[pb.GenerateStreamResponse]:
                call: StreamingCall[pb.GenerateStreamResponse] = backend.stub.GenerateStream(
                    request, timeout=turn.timeout()
                )
                return call

            async for backend, chunk in self.pool.stream(tier, generate_stream, model=turn.model):
                decision.backend = backend.name
                if chunk.HasField("route"):
                    backend.learn_pace(chunk.usage, chunk.timing)
                yield chunk
            return
        answer, backend = await self.pool.call(
            tier,
            lambda b: b.stub.Generate(request, timeout=turn.timeout()),
            model=turn.model,
            tokens=request.max_new_tokens or None,
        )
        backend.learn_pace(answer.usage, answer.timing)
        decision.backend = backend.name
        for chunk in replay(answer, logprobs=request.return_logprobs):
            yield chunk

    # -- the policies -------------------------------------------------------------------

    async def single_tier(
        self, turn: Turn, tier: Tier, reason: str = "policy"
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """cloud-only and edge-only: the policy's tier answers; when it is down, the other one (degraded)."""
        decision = turn.decision = Decision(turn.policy, tier, reason, degraded=reason != "policy")
        try:
            async for chunk in self._from_tier(turn, tier, decision):
                yield chunk
            return
        except TierUnavailable as exc:
            if not self.routing.allow_fallback:
                raise ProtocolError(grpc.StatusCode.UNAVAILABLE, f"{exc}; fallback is off for this deployment") from exc
            unavailable = exc
        other = OTHER[tier]
        decision.tier, decision.reason, decision.degraded = other, f"{tier}-unavailable", True
        try:
            async for chunk in self._from_tier(turn, other, decision):
                yield chunk
        except TierUnavailable as exc:
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, f"no tier can serve: {unavailable}; {exc}") from exc

    async def _ask_edge(self, turn: Turn) -> tuple[pb.GenerateResponse | None, Decision]:
        """The edge's answer, with log-probabilities, and whether it stands; None when it gave none.

        While a healthy cloud could take over, the edge is stopped as soon as its answer can only
        escalate (policy.EdgeWatch); the answer returned is then the part it gave before it stopped
        (`decision.edge_stopped`).
        """
        settings = self.routing.cascade
        if not prompt_fits_edge(self.prompt_tokens(turn.request), settings):
            return None, Decision("cascade", "cloud", "prompt-too-long")
        edge_request = pb.GenerateRequest()
        edge_request.CopyFrom(turn.request)
        edge_request.return_logprobs = True
        edge_request.policy = pb.ROUTING_POLICY_UNSPECIFIED
        watching = bool(self.pool.candidates("cloud", turn.model))
        try:
            answer, backend, watch = await self._edge_answer(turn, edge_request, watching=watching)
        except TierUnavailable:
            return None, Decision("cascade", "cloud", "edge-unavailable", escalated=True, degraded=True)
        except ProtocolError as exc:
            return None, Decision("cascade", "cloud", EDGE_ERROR_REASONS.get(exc.code, "edge-error"), escalated=True)
        # A stopped answer's verdict is settled; a finished one is judged whole, as it always was.
        verdict = watch.settled or judge_edge_answer([lp.logprob for lp in answer.logprobs], settings)
        tier: Tier = "cloud" if verdict.escalate else "edge"
        decision = Decision("cascade", tier, verdict.reason, backend.name, verdict=verdict, escalated=verdict.escalate)
        decision.edge_tokens = len(answer.logprobs)
        decision.edge_stopped = watch.settled is not None
        return answer, decision

    async def _edge_answer(
        self, turn: Turn, request: pb.GenerateRequest, *, watching: bool
    ) -> tuple[pb.GenerateResponse, BackendState, EdgeWatch]:
        """The edge's answer to `request`, collected from its stream; cut short once `watching` settles it.

        A backend that fails mid-answer is marked down and the answer asked of another, as a unary call
        would be (nothing of it has reached the caller). TierUnavailable when no edge is left.
        """
        settings = self.routing.cascade
        attempts = max(1, len(self.pool.tier("edge")))

        def generate_stream(backend: BackendState) -> StreamingCall[pb.GenerateStreamResponse]:
            call: StreamingCall[pb.GenerateStreamResponse] = backend.stub.GenerateStream(
                request, timeout=turn.timeout(settings.edge_timeout_seconds)
            )
            return call

        while True:
            answer = pb.GenerateResponse()
            watch = EdgeWatch(settings, None)
            current: BackendState | None = None
            parts: list[str] = []
            try:
                async with contextlib.aclosing(self.pool.stream("edge", generate_stream, model=turn.model)) as chunks:
                    async for backend, chunk in chunks:
                        if current is None:
                            current = backend
                            watch.max_tokens = answer_limit(request, backend) if watching else None
                        if chunk.HasField("route"):  # the final chunk
                            backend.learn_pace(chunk.usage, chunk.timing)
                            answer.text = "".join(parts)
                            answer.finish_reason = chunk.finish_reason
                            answer.usage.CopyFrom(chunk.usage)
                            answer.timing.CopyFrom(chunk.timing)
                            answer.route.CopyFrom(chunk.route)
                            answer.model, answer.request_id = chunk.model, chunk.request_id
                            return answer, backend, watch
                        parts.append(chunk.text)
                        answer.logprobs.extend(chunk.logprobs)
                        answer.prompt_logprobs.extend(chunk.prompt_logprobs)
                        if watching and watch.add(lp.logprob for lp in chunk.logprobs):
                            answer.text = "".join(parts)
                            return answer, backend, watch  # leaving the stream cancels the edge's call
            except ProtocolError as exc:
                if current is None or exc.code not in BACKEND_FAILURES:
                    raise
                current.mark_down(f"failed mid-answer: {exc.code.name}: {exc.message}")
                attempts -= 1
                if attempts <= 0:
                    raise TierUnavailable(f"every edge backend failed (last: {current.name}: {exc.message})") from exc
                continue
            raise ProtocolError(grpc.StatusCode.INTERNAL, "the edge's answer ended without its final message")

    async def cascade(self, turn: Turn) -> AsyncIterator[pb.GenerateStreamResponse]:
        """The edge answers first; its answer stands when confident, else the cloud answers (escalated).

        The edge's answer streams to the router, which stops it once it can only escalate. When the cloud
        is down too, a doubtful edge answer beats none (degraded, `cloud-unavailable`); if the edge was
        stopped early, it is asked again for the whole answer.
        """
        edge_answer, decision = await self._ask_edge(turn)
        turn.decision = decision
        with_logprobs = turn.request.return_logprobs
        if edge_answer is not None and decision.tier == "edge":
            for chunk in replay(edge_answer, logprobs=with_logprobs):
                yield chunk
            return
        try:
            async for chunk in self._from_tier(turn, "cloud", decision):
                yield chunk
        except TierUnavailable as exc:
            if edge_answer is None:
                raise ProtocolError(
                    grpc.StatusCode.UNAVAILABLE, f"no tier can serve: {decision.reason}; {exc}"
                ) from exc
            if decision.edge_stopped:
                edge_request = pb.GenerateRequest()
                edge_request.CopyFrom(turn.request)
                edge_request.return_logprobs = True
                edge_request.policy = pb.ROUTING_POLICY_UNSPECIFIED
                try:
                    edge_answer, _, _ = await self._edge_answer(turn, edge_request, watching=False)
                except (TierUnavailable, ProtocolError) as again:
                    raise ProtocolError(
                        grpc.StatusCode.UNAVAILABLE, f"no tier can serve: {exc}; asked again, the edge: {again}"
                    ) from exc
            decision.tier, decision.reason, decision.degraded, decision.escalated = (
                "edge",
                "cloud-unavailable",
                True,
                False,
            )
            for chunk in replay(edge_answer, logprobs=with_logprobs):
                yield chunk

    def _speculative_blocker(self, request: pb.GenerateRequest, model: str) -> str:
        """Why the speculative policy cannot run now ("" when it can)."""
        if self.tokenizer is None:
            return "no-tokenizer"
        if (
            request.presence_penalty
            or request.frequency_penalty
            or request.logit_bias
            or request.top_logprobs
            or request.echo
        ):
            # Draft and Verify carry temperature, top_p and seed only: the cloud answers these alone.
            return "options-not-speculative"
        if not self.pool.candidates("cloud", model):
            return "cloud-unavailable"
        if not self.pool.candidates("edge", model):
            return "edge-unavailable"
        return ""

    async def speculative(self, turn: Turn) -> AsyncIterator[pb.GenerateStreamResponse]:
        """The edge drafts, the cloud verifies: the cloud's own answer in fewer cloud round trips.

        When it cannot run (no tokenizer, no healthy edge or cloud) the cloud answers alone, degraded.
        """
        blocker = self._speculative_blocker(turn.request, turn.model)
        if blocker:
            async for chunk in self.single_tier(turn, "cloud", blocker):
                yield chunk
            return
        request = turn.request
        decision = turn.decision = Decision("speculative", "cloud", "speculative")
        prompt = render_prompt(self.tokenizer, request)
        sampling = generation_sampling(
            request, max_new_tokens=SPECULATIVE_MAX_NEW_TOKENS, default_new_tokens=SPECULATIVE_DEFAULT_NEW_TOKENS
        )
        first = 0.0
        async for item in speculate(
            pool=self.pool,
            prompt=prompt,
            request=request,
            max_new_tokens=sampling.max_new_tokens,
            tokenizer=self.tokenizer,
            settings=self.routing.speculative,
            timeout=turn.timeout,
            model=turn.model,
        ):
            if isinstance(item, str):
                first = first or time.monotonic()
                yield pb.GenerateStreamResponse(text=item)
                continue
            decision.speculative = item
            decision.backend = "+".join(name for name in (item.edge, item.cloud) if name)
            if item.edge_lost:
                decision.reason, decision.degraded = "edge-lost", True
            final = pb.GenerateStreamResponse(
                finish_reason=item.finish,
                usage=pb.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=len(item.tokens)),
                timing=pb.Timing(ttft_ms=((first or time.monotonic()) - turn.started) * 1e3),
                model=item.model,
            )
            if request.return_logprobs:
                final.logprobs.extend(
                    pb.TokenLogprob(token_id=t, token=self.tokenizer.decode([t]), logprob=lp)
                    for t, lp in zip(item.tokens, item.logprobs, strict=False)
                )
            final.route.SetInParent()
            yield final
