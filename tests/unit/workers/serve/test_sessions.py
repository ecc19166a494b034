"""Speculative sessions: rows kept between calls, rolled back to the shared prefix, lent least recently used first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from stratus_workers.models import load_model
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.core import EngineCore
from stratus_workers.serve.engine import build_engine
from stratus_workers.serve.errors import EngineOverloaded
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.sampling import eos_ids
from stratus_workers.serve.sessions import SpeculativeSessions
from stratus_workers.serve.surface import collect

pytestmark = pytest.mark.unit

GREEDY = Sampling()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def sessions_over(loaded: Any, rows: int, ttl: float = 60.0) -> SpeculativeSessions:
    runner = ModuleRunner(loaded.model, max_rows=1 + rows, max_len=64)
    return SpeculativeSessions(runner, eos_ids(loaded.model, loaded.tokenizer), first_row=1, ttl=ttl)


def test_a_session_keeps_its_prefix_and_computes_only_the_rest(loaded: Any) -> None:
    sessions = sessions_over(loaded, rows=2)
    runner = sessions.runner
    context = [5, 6, 7, 8]
    first = sessions.draft("a", context, 3, GREEDY, top_k=8, end=False)
    row = next(r for r in range(1, 3) if runner.lengths[r])
    assert runner.lengths[row] == len(context) + 2  # the last drafted token is not fed yet
    # The next round shares the context and the first drafted token: the row rolls back only past them.
    again = sessions.draft("a", [*context, first.tokens[0], 99], 1, GREEDY, top_k=8, end=False)
    assert runner.lengths[row] == len(context) + 2
    fresh = sessions_over(loaded, rows=1)
    alone = fresh.draft("b", [*context, first.tokens[0], 99], 1, GREEDY, top_k=8, end=True)
    assert again.tokens == alone.tokens  # the reused prefix gives what a fresh row computes
    assert len(fresh) == 0 and fresh.runner.lengths == [0, 0]  # end=True freed the row


def test_verify_keeps_the_accepted_prefix(loaded: Any) -> None:
    sessions = sessions_over(loaded, rows=1)
    context = [11, 12, 13]
    draft = sessions_over(loaded, rows=1).draft("d", context, 4, GREEDY, top_k=8, end=True).tokens
    verdict = sessions.verify("v", context, draft, (), GREEDY, end=False)
    assert verdict.accepted == len(draft)  # the same model drafts exactly what it would pick
    assert sessions.runner.lengths[1] == len(context) + len(draft)
    wrong = [(draft[0] + 1) % sessions.vocab_size, *draft[1:]]
    verdict = sessions.verify("v", context, wrong, (), GREEDY, end=False)
    assert verdict.accepted == 0 and verdict.next_token == draft[0]
    assert sessions.runner.lengths[1] == len(context)
    assert len(verdict.logprobs) == 1 and verdict.logprobs[0] <= 0


def test_rows_are_lent_least_recently_used_first_and_expire(loaded: Any) -> None:
    sessions = sessions_over(loaded, rows=1, ttl=0.2)
    sessions.draft("a", [1, 2, 3], 1, GREEDY, top_k=8, end=False)
    with pytest.raises(EngineOverloaded, match="all 1 speculative sessions are busy"):
        sessions.draft("b", [1, 2, 3], 1, GREEDY, top_k=8, end=False)
    time.sleep(0.3)
    sessions.expire()
    assert len(sessions) == 0 and sessions.runner.lengths == [0, 0]
    sessions.draft("b", [1, 2, 3], 1, GREEDY, top_k=8, end=False)
    assert len(sessions) == 1


def test_score_matches_a_plain_forward_pass(loaded: Any) -> None:
    sessions = sessions_over(loaded, rows=1)
    prompt, continuation = [3, 4, 5], [6, 7]
    scored = sessions.score(prompt, continuation)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt + continuation])).logits[0]
    expected = torch.log_softmax(logits[2:4], dim=-1)[torch.arange(2), torch.tensor(continuation)]
    assert list(scored) == pytest.approx(expected.tolist(), abs=1e-4)
    assert len(sessions) == 0  # a score borrows a row and gives it back


def test_sessions_must_sit_above_the_decode_rows(loaded: Any) -> None:
    runner = ModuleRunner(loaded.model, max_rows=3, max_len=64)
    eos = eos_ids(loaded.model, loaded.tokenizer)
    with pytest.raises(ValueError, match="rows 2 and up"):
        EngineCore(runner, SpeculativeSessions(runner, eos, first_row=1), eos, max_batch_size=2)


async def test_engine_sessions_reproduce_greedy_generation(tiny_model_dir: Path, draft_model_dir: Path) -> None:
    """Draft on one engine, verify on another, round after round: the tokens are the verifier's own."""
    cloud = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    edge = load_model(str(draft_model_dir), dtype="float32", device="cpu")
    cloud_engine = build_engine(cloud.model, cloud.tokenizer, max_batch_size=1, max_len=256, max_sessions=2)
    edge_engine = build_engine(edge.model, edge.tokenizer, max_batch_size=1, max_len=256, max_sessions=2)
    await cloud_engine.start()
    await edge_engine.start()
    greedy = Sampling()
    try:
        for text in ("The weather today", "Numbers: 1 2 3", "A long time ago"):
            prompt = cloud.tokenizer.encode(text)
            _, _, finish = await collect(cloud_engine.stream(prompt, Sampling(max_new_tokens=24)))
            reference: list[int] = []
            async for event in cloud_engine.stream(prompt, Sampling(max_new_tokens=24)):
                reference.extend(getattr(event, "token_ids", ()))
            out: list[int] = []
            drafted = accepted = 0
            while len(out) < len(reference):
                draft = await edge_engine.draft("s", prompt + out, 4, greedy)
                verdict = await cloud_engine.verify("s", prompt + out, draft.tokens, (), greedy)
                drafted += len(draft.tokens)
                accepted += verdict.accepted
                out += [*draft.tokens[: verdict.accepted], verdict.next_token]
            assert out[: len(reference)] == reference
            assert 0 < accepted <= drafted
            await edge_engine.end_session("s")
            await cloud_engine.end_session("s")
            assert cloud_engine.stats.sessions == edge_engine.stats.sessions == 0
    finally:
        await cloud_engine.stop()
        await edge_engine.stop()


async def test_session_limits(loaded: Any) -> None:
    engine = build_engine(loaded.model, loaded.tokenizer, max_batch_size=1, max_len=64, max_sessions=1)
    await engine.start()
    try:
        await engine.draft("a", [1, 2, 3], 2, Sampling())
        with pytest.raises(EngineOverloaded, match="sessions are busy"):
            await engine.draft("b", [1, 2, 3], 2, Sampling())
        with pytest.raises(ValueError, match="outside this model's vocabulary"):
            await engine.verify("a", [1, 2, 10**7], [], (), Sampling())
        with pytest.raises(ValueError, match="context is empty"):
            await engine.draft("a", [], 2, Sampling())
        with pytest.raises(ValueError, match="exceeds"):
            await engine.verify("a", list(range(70)), [], (), Sampling())
    finally:
        await engine.stop()
