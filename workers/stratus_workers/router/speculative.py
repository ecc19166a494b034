"""Cross-tier speculative decoding: the edge drafts k tokens, the cloud verifies them in one pass.

The router holds the token sequence and drives both servers with Draft and Verify calls on one
session each, so both keep their KV caches between rounds and only new tokens are computed. The
answer is the cloud's own (identical tokens when greedy, the same distribution when sampled); the
edge only decides how many tokens each cloud round trip yields.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.requests import speculative_sampling
from stratus_workers.protocol.text import TextAssembler
from stratus_workers.router.backends import BackendPool, BackendState, TierUnavailable
from stratus_workers.router.config import SpeculativeSettings

log = logging.getLogger(__name__)

# Tokens per Draft call while drafting ahead: small, so that little is drafted after the verdict arrives.
AHEAD_CHUNK = 2


@dataclass
class SpeculativeOutcome:
    """The totals of one speculative answer, for its final chunk and the benchmark."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: pb.FinishReason.ValueType = pb.FINISH_REASON_LENGTH
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    cloud_tokens: int = 0  # positions the cloud computed (draft + its own token, every round)
    edge_lost: str = ""  # why the edge stopped drafting mid-answer, if it did
    edge: str = ""  # the backend that drafted last
    cloud: str = ""  # the backend that verified last
    model: str = ""  # the model of that backend
    ahead_used: int = 0  # draft tokens that were drafted ahead, during the verification before their round


def next_draft_length(current: int, accepted: int, *, minimum: int = 1, maximum: int = 8) -> int:
    """Adapt k to the acceptance seen: one longer after a fully accepted draft, one shorter after a rejection
    (never shorter than what stuck plus one).

    What a verification pass costs the cloud hardly depends on the draft's length (its fixed cost, reading the
    weights, dominates on a CPU core), so a round is worth about as much as the tokens it yields. Falling to
    what stuck plus one after each rejection made many rounds of one or two draft tokens, each costing the
    cloud nearly a whole pass for two or three tokens; stepping down by one keeps the draft long through an
    isolated rejection and still shortens it through a run of them (a rejected token costs the edge a draft
    step and the link a few bytes). The measurements: docs/cooperation.md ("Adaptive k"), and the stored run
    docs/bench-data/coop-q8.json.
    """
    if accepted >= current:
        return min(maximum, current + 1)
    return max(minimum, min(maximum, max(accepted + 1, current - 1)))


def _eos(tokenizer: Any) -> frozenset[int]:
    value = getattr(tokenizer, "eos_token_id", None)
    return frozenset([value]) if isinstance(value, int) else frozenset()


@dataclass
class _Draft:
    """Tokens the edge proposed after some context (with their distributions when sampled)."""

    tokens: list[int] = field(default_factory=list)
    dists: list[pb.SparseDistribution] = field(default_factory=list)
    eos: bool = False  # the edge ended its answer: nothing to draft after these

    def extend(self, reply: pb.DraftResponse) -> None:
        self.tokens.extend(reply.tokens)
        self.dists.extend(reply.distributions)
        self.eos = self.eos or reply.eos

    def after(self, n: int) -> _Draft:
        """What is left once the first `n` tokens are no longer a draft."""
        return _Draft(self.tokens[n:], self.dists[n:], self.eos)


async def speculate(
    *,
    pool: BackendPool,
    prompt: list[int],
    request: pb.GenerateRequest,
    max_new_tokens: int,
    tokenizer: Any,
    settings: SpeculativeSettings,
    timeout: Callable[[], float],
    model: str = "",
) -> AsyncIterator[str | SpeculativeOutcome]:
    """Yield text deltas as rounds are verified, then the outcome.

    Each round goes through the pool like any other call, preferring the backend of the round before
    (its session holds the sequence so far); a backend that fails is replaced by another of its tier,
    which rebuilds the session from the full context each call carries. When no edge is left the
    cloud verifies empty drafts; when no cloud is left the answer fails (UNAVAILABLE). `model`, when
    given, limits both tiers to backends serving that model.

    Drafting ahead (`settings.draft_ahead`, greedy requests): while the cloud verifies a draft, the edge
    goes on drafting after it, as if all of it will be accepted, a few tokens per call until the verdict
    is in. When the cloud did accept all of it and its own next token is the edge's first token ahead,
    the rest is the next round's draft, already made: edge and cloud then work at the same time instead
    of taking turns. Otherwise it is dropped (at most one call's tokens were drafted after the verdict).
    The drafts are proposals only, so the answer is the cloud's either way. Sampled requests draft in
    turn: how far ahead the edge gets depends on timing, and so would which random draws a seeded
    answer's draft consumes.
    """
    session = uuid.uuid4().hex
    sampling = speculative_sampling(request)
    eos = _eos(tokenizer)
    outcome = SpeculativeOutcome(prompt_tokens=len(prompt))
    text = TextAssembler(tokenizer, tuple(request.stop))
    k = settings.draft_tokens
    ahead_allowed = settings.draft_ahead and request.temperature <= 0.0
    drafting = True
    edge: BackendState | None = None
    cloud: BackendState | None = None
    used: dict[str, BackendState] = {}
    ready = _Draft()  # drafted after the current context (by drafting ahead last round)
    done = False

    async def draft_call(context: list[int], count: int) -> pb.DraftResponse:
        nonlocal edge, drafting
        draft_request = pb.DraftRequest(
            session_id=session, context=context, max_tokens=count, sampling=sampling, top_k=settings.top_k
        )
        reply, edge = await pool.call("edge", _drafting(draft_request, timeout), prefer=edge, model=model, tokens=count)
        used[edge.name] = edge
        outcome.edge = edge.name
        return reply

    def lose_edge(exc: Exception) -> None:
        nonlocal drafting
        # Verification alone still gives the cloud's exact answer, one token per round.
        drafting = False
        outcome.edge_lost = str(exc)
        log.warning("edge stopped drafting", extra={"error": outcome.edge_lost})

    try:
        while not done:
            context = prompt + outcome.tokens
            budget = max_new_tokens - len(outcome.tokens)
            wanted = min(k, budget - 1) if drafting else 0
            draft = _Draft(ready.tokens[:wanted], ready.dists[:wanted], ready.eos and len(ready.tokens) <= wanted)
            if wanted > len(draft.tokens) and not draft.eos:
                try:
                    draft.extend(await draft_call(context + draft.tokens, wanted - len(draft.tokens)))
                except (TierUnavailable, ProtocolError) as exc:
                    lose_edge(exc)
            verify_request = pb.VerifyRequest(
                session_id=session,
                context=context,
                draft=draft.tokens,
                distributions=draft.dists,
                sampling=sampling,
            )
            verifying = asyncio.ensure_future(
                pool.call("cloud", _verifying(verify_request, timeout), prefer=cloud, model=model)
            )
            ahead = _Draft()
            try:
                # The next round's draft needs its own first token (to match the cloud's) and k' more.
                limit = min(next_draft_length(k, len(draft.tokens), maximum=settings.max_draft_tokens) + 1,
                            budget - len(draft.tokens) - 1)  # fmt: skip
                while ahead_allowed and drafting and draft.tokens and not draft.eos and not verifying.done():
                    if ahead.eos or len(ahead.tokens) >= limit:
                        break
                    count = min(AHEAD_CHUNK, limit - len(ahead.tokens))
                    try:
                        reply = await draft_call(context + draft.tokens + ahead.tokens, count)
                    except (TierUnavailable, ProtocolError) as exc:
                        lose_edge(exc)
                        break
                    ahead.extend(reply)
                    if len(reply.tokens) < count:  # the edge's context is full
                        break
                try:
                    verdict, cloud = await verifying
                except TierUnavailable as exc:
                    raise ProtocolError(
                        grpc.StatusCode.UNAVAILABLE, f"the verifying cloud backend failed: {exc}"
                    ) from exc
            finally:
                if not verifying.done():
                    verifying.cancel()
            used[cloud.name] = cloud
            outcome.cloud, outcome.model = cloud.name, cloud.model
            outcome.rounds += 1
            outcome.drafted += len(draft.tokens)
            outcome.accepted += verdict.accepted
            outcome.cloud_tokens += len(draft.tokens) + 1
            full = verdict.accepted == len(draft.tokens)
            ready = ahead.after(1) if full and ahead.tokens and ahead.tokens[0] == verdict.next_token else _Draft()
            outcome.ahead_used += len(ready.tokens)
            new = [*draft.tokens[: verdict.accepted], verdict.next_token]
            for token, logprob in zip(new, verdict.logprobs, strict=False):
                if token in eos:
                    outcome.finish, done = pb.FINISH_REASON_STOP, True
                    break
                outcome.tokens.append(token)
                outcome.logprobs.append(logprob)
                delta = text.add(token)
                if delta:
                    yield delta
                if text.stopped:
                    outcome.finish, done = pb.FINISH_REASON_STOP, True
                    break
                if len(outcome.tokens) >= max_new_tokens:
                    outcome.finish, done = pb.FINISH_REASON_LENGTH, True
                    break
            if settings.adaptive and draft.tokens:
                k = next_draft_length(k, verdict.accepted, maximum=settings.max_draft_tokens)
        rest = text.flush()
        if rest:
            yield rest
        yield outcome
    finally:
        await _end_sessions(session, list(used.values()))


def _drafting(
    request: pb.DraftRequest, timeout: Callable[[], float]
) -> Callable[[BackendState], Awaitable[pb.DraftResponse]]:
    return lambda backend: backend.stub.Draft(request, timeout=timeout())


def _verifying(
    request: pb.VerifyRequest, timeout: Callable[[], float]
) -> Callable[[BackendState], Awaitable[pb.VerifyResponse]]:
    return lambda backend: backend.stub.Verify(request, timeout=timeout())


async def _end_sessions(session: str, backends: list[BackendState]) -> None:
    # Free the cache rows now rather than waiting for the servers' idle timeout. Sent to the very
    # backends that hold them, so not through the pool's failover.
    for backend in backends:
        try:
            if backend.tier == "edge":
                await backend.stub.Draft(pb.DraftRequest(session_id=session, end_session=True), timeout=2.0)
            else:
                await backend.stub.Verify(pb.VerifyRequest(session_id=session, end_session=True), timeout=2.0)
        except grpc.aio.AioRpcError:
            pass  # an idle session expires on its own
