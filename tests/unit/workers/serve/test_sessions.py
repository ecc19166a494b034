"""Speculative sessions: rows kept between calls, rolled back to the shared prefix, lent least recently used first."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from stratus_workers.models import load_model
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.core import EngineCore, EngineRequest
from stratus_workers.serve.engine import build_engine
from stratus_workers.serve.errors import EngineOverloaded
from stratus_workers.serve.runner import ModelRunner
from stratus_workers.serve.runner.fused import FusedRunner
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.sampling import eos_ids
from stratus_workers.serve.sessions import SpeculativeSessions, VerifyCall
from stratus_workers.serve.speculative import SparseDist
from stratus_workers.serve.surface import collect

pytestmark = pytest.mark.unit

GREEDY = Sampling()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def sessions_over(loaded: Any, rows: int, ttl: float = 60.0, fast: bool = False) -> SpeculativeSessions:
    runner: ModelRunner
    if fast:  # the fused path: its verification packs the rows' tokens (no padding, no rows in between)
        runner = FusedRunner(loaded.model, max_rows=1 + rows, max_len=64, cuda_graphs=False, compile=False)
    else:
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


@pytest.mark.parametrize("fast", [False, True])
def test_a_sampled_draft_that_its_distributions_cannot_give_fails_whole_and_loses_nothing(
    loaded: Any, fast: bool
) -> None:
    """A draft token with probability 0 under its own distribution, after tokens the rule would have judged
    first, fails the call before any draw: the session keeps its tokens, its row and its random state."""
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=7)
    context = [11, 12, 13]
    drafted = sessions_over(loaded, rows=1).draft("d", context, 3, sampling, top_k=8, end=True)
    sessions = sessions_over(loaded, rows=2, fast=fast)
    for sid in ("a", "twin"):
        sessions.verify(sid, context, [], (), sampling, end=False)
    held = (sessions.runner.lengths[sessions._sessions["a"].row], list(sessions._sessions["a"].tokens))
    bad_dists = [*drafted.distributions[:2], SparseDist((drafted.tokens[2] + 1,), (1.0,))]
    with pytest.raises(ValueError, match=f"draft token {drafted.tokens[2]} at position 2 has probability 0"):
        sessions.verify("a", [*context, 40], drafted.tokens, bad_dists, sampling, end=False)
    assert (sessions.runner.lengths[sessions._sessions["a"].row], sessions._sessions["a"].tokens) == held
    states = [sessions._sessions[sid].generator.get_state() for sid in ("a", "twin")]  # type: ignore[union-attr]
    assert torch.equal(*states)
    # Its next call draws what a session that never saw the refused one draws.
    got = {
        sid: sessions.verify(sid, context, drafted.tokens, drafted.distributions, sampling, end=False)
        for sid in ("a", "twin")
    }
    assert got["a"] == got["twin"]


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


# -- verification batched: every Verify call of a step in one forward pass ------------------------------


def _wrong(draft: tuple[int, ...] | list[int], at: int, vocab: int) -> list[int]:
    out = list(draft)
    if at < len(out):
        out[at] = (out[at] + 1) % vocab
    return out


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("sampled", [False, True])
def test_verify_many_gives_what_verify_gives_one_call_at_a_time(loaded: Any, sampled: bool, fast: bool) -> None:
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=7) if sampled else GREEDY
    vocab = loaded.model.config.vocab_size
    drafter = sessions_over(loaded, rows=1)
    contexts = {sid: [3 + i, 17, 29 + i, 41] for i, sid in enumerate("abcde")}
    drafts = {sid: drafter.draft("d", ctx, 5, sampling, top_k=8, end=True) for sid, ctx in contexts.items()}

    def setup() -> SpeculativeSessions:
        # Sessions a..e hold rows 1..5; c is ended (its row is free) and d sits idle between the callers.
        sessions = sessions_over(loaded, rows=6, fast=fast)
        for sid in "abcde":
            sessions.verify(sid, contexts[sid][:2], [], (), sampling, end=False)
        sessions.end("c")
        return sessions

    calls = [
        VerifyCall("a", contexts["a"], drafts["a"].tokens, drafts["a"].distributions, sampling),
        VerifyCall("b", contexts["b"], _wrong(drafts["b"].tokens, 2, vocab), drafts["b"].distributions, sampling),
        VerifyCall("e", contexts["e"], drafts["e"].tokens[:1], drafts["e"].distributions[:1], sampling, end=True),
        VerifyCall("f", contexts["c"], drafts["c"].tokens, drafts["c"].distributions, sampling),  # a new session
        VerifyCall("a", [*contexts["a"], 1], [2], (), GREEDY),  # the same session again: after the first
        VerifyCall("b", contexts["b"], [10**7], (), sampling),  # refused, the others unharmed
    ]
    one_by_one = setup()
    expected: list[Any] = []
    for call in calls:
        try:
            expected.append(one_by_one.verify(call.sid, call.context, call.draft, call.dists, call.sampling, call.end))
        except ValueError as exc:
            expected.append(exc)
    together = setup()
    idle_row = together._sessions["d"].row
    idle_length = together.runner.lengths[idle_row]
    passes = together.runner.passes
    got = together.verify_many(calls)
    # a, b, e and f share one pass; the second call of a runs after it, alone.
    assert together.runner.passes - passes == 2
    for want, have in zip(expected, got, strict=True):
        if isinstance(want, Exception):
            assert isinstance(have, ValueError) and str(have) == str(want)
        else:
            assert isinstance(have, type(want))
            assert (have.accepted, have.next_token, have.eos) == (want.accepted, want.next_token, want.eos)
            assert have.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert got[0].accepted == len(drafts["a"].tokens) or sampled  # type: ignore[union-attr]
    # The rows between the callers are as they were; every session holds what its calls left.
    assert together.runner.lengths[idle_row] == idle_length

    # (which row a new session gets may differ: e ends only after the shared pass, so f takes c's old row)
    def held(sessions: SpeculativeSessions) -> dict[str, tuple[int, list[int]]]:
        return {sid: (sessions.runner.lengths[s.row], s.tokens) for sid, s in sessions._sessions.items()}

    assert held(together) == held(one_by_one)
    assert "e" not in together._sessions  # end=True freed its row
    after = together.verify("d", contexts["d"], drafts["d"].tokens, drafts["d"].distributions, GREEDY, end=False)
    fresh = sessions_over(loaded, rows=1).verify("x", contexts["d"], drafts["d"].tokens, (), GREEDY, end=False)
    assert (after.accepted, after.next_token) == (fresh.accepted, fresh.next_token)


def test_a_core_step_verifies_every_session_in_one_pass(loaded: Any) -> None:
    """Verify calls queued for one step share its forward pass; each result is the one-call-at-a-time one."""
    eos = eos_ids(loaded.model, loaded.tokenizer)
    vocab = loaded.model.config.vocab_size
    n = 4
    drafter = sessions_over(loaded, rows=1)
    contexts = [[7 + i, 19, 23 + i] for i in range(n)]
    drafts = [
        _wrong(drafter.draft("d", c, 4, GREEDY, top_k=8, end=True).tokens, i % 3, vocab) for i, c in enumerate(contexts)
    ]
    alone = sessions_over(loaded, rows=n)
    expected = [
        alone.verify(f"s{i}", c, d, (), GREEDY, end=False)
        for i, (c, d) in enumerate(zip(contexts, drafts, strict=True))
    ]
    runner = ModuleRunner(loaded.model, max_rows=1 + n, max_len=64)
    # Unpipelined (each step's Verify calls answered in that step; test_core_pipeline.py has the pipeline's).
    core = EngineCore(
        runner, SpeculativeSessions(runner, eos, first_row=1), eos, max_batch_size=1, verify_pipeline=False
    )
    for i, (c, d) in enumerate(zip(contexts, drafts, strict=True)):
        core.call(100 + i, "verify", (f"s{i}", c, d, (), GREEDY, False))
    passes = runner.passes
    out = core.step()
    assert runner.passes - passes == 1
    assert out.stats is not None and out.stats.forward_passes == runner.passes
    got = {call_id: result for call_id, error, result in out.results if not error}
    for i, want in enumerate(expected):
        have = got[100 + i]
        assert (have.accepted, have.next_token) == (want.accepted, want.next_token)
        assert have.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    # One pass per call, when asked (benchmarks compare the two).
    for i, (c, d) in enumerate(zip(contexts, drafts, strict=True)):
        core.call(200 + i, "verify_alone", (f"s{i}", c, d, (), GREEDY, False))
    passes = runner.passes
    out = core.step()
    assert runner.passes - passes == n and not any(error for _, error, _ in out.results)


async def test_concurrent_sessions_get_the_cloud_only_answer(loaded: Any) -> None:
    """Sessions verifying at once on one engine (batched as they arrive) give cloud-only's tokens."""
    n, new = 5, 16
    engine = build_engine(loaded.model, loaded.tokenizer, max_batch_size=n, max_len=128, max_sessions=n)
    await engine.start()
    vocab = loaded.model.config.vocab_size
    prompts = [loaded.tokenizer.encode(f"prompt number {i}: the") for i in range(n)]
    try:
        references = []
        for prompt in prompts:
            tokens: list[int] = []
            async for event in engine.stream(prompt, Sampling(max_new_tokens=new)):
                tokens.extend(getattr(event, "token_ids", ()))
            references.append(tokens)

        async def session(i: int) -> list[int]:
            out: list[int] = []
            ref = references[i]
            while len(out) < len(ref):
                draft = _wrong(ref[len(out) : len(out) + 4][: len(ref) - len(out) - 1], len(out) % 3, vocab)
                verdict = await engine.verify(f"s{i}", prompts[i] + out, draft, (), GREEDY)
                out += [*draft[: verdict.accepted], verdict.next_token]
            return out

        passes = engine.stats.forward_passes
        outs = await asyncio.gather(*(session(i) for i in range(n)))
        assert [o[: len(r)] for o, r in zip(outs, references, strict=True)] == references
        assert engine.stats.forward_passes > passes
    finally:
        await engine.stop()


def test_a_verify_step_is_owed_the_sessions_verified_before_it(loaded: Any) -> None:
    """The loop may wait a moment for sessions whose next round is due, so that they share one pass; never
    while anything else is queued, and never for a session that ended."""
    eos = eos_ids(loaded.model, loaded.tokenizer)
    runner = ModuleRunner(loaded.model, max_rows=4, max_len=64)
    # Unpipelined (each step's Verify calls answered in that step; test_core_pipeline.py has the pipeline's).
    core = EngineCore(
        runner, SpeculativeSessions(runner, eos, first_row=1), eos, max_batch_size=1, verify_pipeline=False
    )
    core.call(1, "verify", ("a", [5, 6, 7], [8], (), GREEDY, False))
    core.call(2, "verify", ("b", [9, 10], [11], (), GREEDY, False))
    core.call(3, "verify", ("c", [12, 13], [], (), GREEDY, True))  # ends with this call
    assert core.verify_owed() == 0  # nothing verified before
    out = core.step()
    assert not any(error for _, error, _ in out.results)
    assert core.verify_owed() == 0  # nothing queued
    core.call(4, "verify", ("a", [5, 6, 7, 8, 1], [2], (), GREEDY, False))
    assert core.verify_owed() == 1  # b is due; c ended
    core.call(5, "end", ("b",))  # b ends instead of sending its next round
    assert core.verify_owed() == 0
    core.step()
    core.call(6, "verify", ("b", [9, 10, 11], [3], (), GREEDY, False))  # b again, as a new session
    assert core.verify_owed() == 1  # a was verified in the last step and has not called yet
    core.add(EngineRequest(7, [1, 2, 3], Sampling(max_new_tokens=2)))
    assert core.verify_owed() == 0  # a request waits to be admitted: its step is never held back
