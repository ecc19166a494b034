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
from stratus_workers.router.backends import BACKEND_FAILURES, BackendState
from stratus_workers.router.config import SpeculativeSettings
from stratus_workers.serve.speculative import next_draft_length
from stratus_workers.serve.text import TextAssembler

log = logging.getLogger(__name__)


@dataclass
class SpeculativeOutcome:
    """The totals of one speculative answer, for its final chunk and the benchmark."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: int = pb.FINISH_REASON_LENGTH
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    cloud_tokens: int = 0  # positions the cloud computed (draft + its own token, every round)
    edge_lost: str = ""  # why the edge stopped drafting mid-answer, if it did


class CloudLost(Exception):
    """The verifying cloud backend failed mid-answer."""


async def speculate(
    *,
    prompt: list[int],
    request: pb.GenerateRequest,
    max_new_tokens: int,
    tokenizer: Any,
    eos: frozenset[int],
    edge: BackendState | None,
    cloud: BackendState,
    settings: SpeculativeSettings,
    timeout: Callable[[], float],
    link: Callable[[], Awaitable[None]],
) -> AsyncIterator[str | SpeculativeOutcome]:
    """Yield text deltas as rounds are verified, then the outcome."""
    session = uuid.uuid4().hex
    sampling = pb.SpeculativeSampling(temperature=request.temperature, top_p=request.top_p)
    if request.HasField("seed"):
        sampling.seed = request.seed
    outcome = SpeculativeOutcome(prompt_tokens=len(prompt))
    text = TextAssembler(tokenizer, tuple(request.stop))
    k = settings.draft_tokens
    done = False
    try:
        while not done:
            context = prompt + outcome.tokens
            budget = max_new_tokens - len(outcome.tokens)
            draft: list[int] = []
            dists: list[pb.SparseDistribution] = []
            if edge is not None and budget > 1:
                try:
                    reply = await edge.stub.Draft(
                        pb.DraftRequest(
                            session_id=session,
                            context=context,
                            max_tokens=min(k, budget - 1),
                            sampling=sampling,
                            top_k=settings.top_k,
                        ),
                        timeout=timeout(),
                    )
                    draft, dists = list(reply.tokens), list(reply.distributions)
                except grpc.aio.AioRpcError as exc:
                    # Verification alone still gives the cloud's exact answer, one token per round.
                    if exc.code() in BACKEND_FAILURES:
                        edge.mark_down(f"{exc.code().name}: {exc.details()}")
                    outcome.edge_lost = f"{exc.code().name}: {exc.details()}"
                    log.warning("edge stopped drafting", extra={"backend": edge.name, "error": outcome.edge_lost})
                    edge = None
            await link()
            try:
                verdict = await cloud.stub.Verify(
                    pb.VerifyRequest(
                        session_id=session, context=context, draft=draft, distributions=dists, sampling=sampling
                    ),
                    timeout=timeout(),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in BACKEND_FAILURES:
                    cloud.mark_down(f"{exc.code().name}: {exc.details()}")
                raise CloudLost(f"{exc.code().name}: {exc.details()}") from exc
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
        await _end_sessions(session, [b for b in (edge, cloud) if b is not None])


async def _end_sessions(session: str, backends: list[BackendState]) -> None:
    # Free the cache rows now rather than waiting for the servers' idle timeout.
    for backend in backends:
        try:
            if backend.tier == "edge":
                await backend.stub.Draft(pb.DraftRequest(session_id=session, end_session=True), timeout=2.0)
            else:
                await backend.stub.Verify(pb.VerifyRequest(session_id=session, end_session=True), timeout=2.0)
        except grpc.aio.AioRpcError:
            pass  # an idle session expires on its own
