"""Cross-tier speculative decoding: the edge drafts k tokens, the cloud verifies them in one pass.

The router holds the token sequence and drives both servers with Draft and Verify calls on one
session each, so both keep their KV caches between rounds and only new tokens are computed. The
answer is the cloud's own (identical tokens when greedy, the same distribution when sampled); the
edge only decides how many tokens each cloud round trip yields.
"""

from __future__ import annotations

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


def next_draft_length(current: int, accepted: int, *, minimum: int = 1, maximum: int = 8) -> int:
    """Adapt k to the acceptance seen: grow after a fully accepted draft, else shrink towards what stuck.

    A draft token costs edge time and link bytes; one the cloud rejects buys nothing. Growing by one
    on full acceptance and falling to accepted+1 otherwise tracks the acceptance rate without a model.
    """
    if accepted >= current:
        return min(maximum, current + 1)
    return max(minimum, min(maximum, accepted + 1))


def _eos(tokenizer: Any) -> frozenset[int]:
    value = getattr(tokenizer, "eos_token_id", None)
    return frozenset([value]) if isinstance(value, int) else frozenset()


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
    """
    session = uuid.uuid4().hex
    sampling = speculative_sampling(request)
    eos = _eos(tokenizer)
    outcome = SpeculativeOutcome(prompt_tokens=len(prompt))
    text = TextAssembler(tokenizer, tuple(request.stop))
    k = settings.draft_tokens
    drafting = True
    edge: BackendState | None = None
    cloud: BackendState | None = None
    used: dict[str, BackendState] = {}
    done = False
    try:
        while not done:
            context = prompt + outcome.tokens
            budget = max_new_tokens - len(outcome.tokens)
            draft: list[int] = []
            dists: list[pb.SparseDistribution] = []
            if drafting and budget > 1:
                draft_request = pb.DraftRequest(
                    session_id=session,
                    context=context,
                    max_tokens=min(k, budget - 1),
                    sampling=sampling,
                    top_k=settings.top_k,
                )
                try:
                    reply, edge = await pool.call(
                        "edge", _drafting(draft_request, timeout), prefer=edge, model=model, tokens=k
                    )
                    used[edge.name] = edge
                    outcome.edge = edge.name
                    draft, dists = list(reply.tokens), list(reply.distributions)
                except (TierUnavailable, ProtocolError) as exc:
                    # Verification alone still gives the cloud's exact answer, one token per round.
                    drafting = False
                    outcome.edge_lost = str(exc)
                    log.warning("edge stopped drafting", extra={"error": outcome.edge_lost})
            verify_request = pb.VerifyRequest(
                session_id=session, context=context, draft=draft, distributions=dists, sampling=sampling
            )
            try:
                verdict, cloud = await pool.call(
                    "cloud", _verifying(verify_request, timeout), prefer=cloud, model=model
                )
            except TierUnavailable as exc:
                raise ProtocolError(grpc.StatusCode.UNAVAILABLE, f"the verifying cloud backend failed: {exc}") from exc
            used[cloud.name] = cloud
            outcome.cloud, outcome.model = cloud.name, cloud.model
            outcome.rounds += 1
            outcome.drafted += len(draft)
            outcome.accepted += verdict.accepted
            outcome.cloud_tokens += len(draft) + 1
            new = [*draft[: verdict.accepted], verdict.next_token]
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
            if settings.adaptive and draft:
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
