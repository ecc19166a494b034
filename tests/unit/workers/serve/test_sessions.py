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
from stratus_workers.serve.engine import Engine, build_engine, collect
from stratus_workers.serve.errors import EngineOverloaded
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.sessions import SpeculativeSessions, VerifyCall

pytestmark = pytest.mark.unit

GREEDY = Sampling()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def sessions_over(loaded: Any, rows: int, ttl: float = 60.0) -> SpeculativeSessions:
    runner = ModuleRunner(loaded.model, max_rows=1 + rows, max_len=64)
    return SpeculativeSessions(runner, loaded.tokenizer, first_row=1, ttl=ttl)


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
    with pytest.raises(ValueError, match="rows 2 and up"):
        Engine(runner, loaded.tokenizer, SpeculativeSessions(runner, loaded.tokenizer, first_row=1), max_batch_size=2)


async def test_engine_sessions_reproduce_greedy_generation(tiny_model_dir: Path, draft_model_dir: Path) -> None:
    """Draft on one engine, verify on another, round after round: the tokens are the verifier's own."""
    cloud = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    edge = load_model(str(draft_model_dir), dtype="float32", device="cpu")
    cloud_engine = build_engine(cloud.model, cloud.tokenizer, max_batch_size=1, max_len=256, max_sessions=2)
    edge_engine = build_engine(edge.model, edge.tokenizer, max_batch_size=1, max_len=256, max_sessions=2)
    cloud_engine.start()
    edge_engine.start()
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
            assert len(cloud_engine.sessions) == len(edge_engine.sessions) == 0
    finally:
        cloud_engine.shutdown()
        edge_engine.shutdown()


async def test_session_limits(loaded: Any) -> None:
    engine = build_engine(loaded.model, loaded.tokenizer, max_batch_size=1, max_len=64, max_sessions=1)
    engine.start()
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
        engine.shutdown()


# -- verification batched: every Verify call of a step in one forward pass ------------------------------


def _wrong(draft: tuple[int, ...] | list[int], at: int, vocab: int) -> list[int]:
    out = list(draft)
    if at < len(out):
        out[at] = (out[at] + 1) % vocab
    return out


@pytest.mark.parametrize("sampled", [False, True])
def test_verify_many_gives_what_verify_gives_one_call_at_a_time(loaded: Any, sampled: bool) -> None:
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=7) if sampled else GREEDY
    vocab = loaded.model.config.vocab_size
    drafter = sessions_over(loaded, rows=1)
    contexts = {sid: [3 + i, 17, 29 + i, 41] for i, sid in enumerate("abcde")}
    drafts = {sid: drafter.draft("d", ctx, 5, sampling, top_k=8, end=True) for sid, ctx in contexts.items()}

    def setup() -> SpeculativeSessions:
        # Sessions a..e hold rows 1..5; c is ended (its row is free) and d sits idle between the callers.
        sessions = sessions_over(loaded, rows=6)
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
            expected.append(
                one_by_one.verify(call.sid, call.context, call.draft, call.dists, call.sampling, call.end)
            )
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


async def test_concurrent_verification_shares_a_pass_and_keeps_the_cloud_answer(loaded: Any) -> None:
    """Sessions verifying at once on one engine: one pass a round for all of them, the tokens cloud-only's."""
    n, new = 5, 16
    engine = build_engine(loaded.model, loaded.tokenizer, max_batch_size=n, max_len=128, max_sessions=n)
    engine.start()
    vocab = loaded.model.config.vocab_size
    prompts = [loaded.tokenizer.encode(f"prompt number {i}: the") for i in range(n)]
    try:
        references = []
        for events in [engine.stream(p, Sampling(max_new_tokens=new)) for p in prompts]:
            tokens: list[int] = []
            async for event in events:
                tokens.extend(getattr(event, "token_ids", ()))
            references.append(tokens)
        outs: list[list[int]] = [[] for _ in range(n)]
        rounds = batched = 0
        while any(len(o) < len(r) for o, r in zip(outs, references, strict=True)):
            live = [i for i in range(n) if len(outs[i]) < len(references[i])]
            drafts = {}
            for i in live:  # the cloud's own answer, one token in three wrong: partial acceptance
                ref, out = references[i], outs[i]
                draft = ref[len(out) : len(out) + 4][: len(ref) - len(out) - 1]
                drafts[i] = _wrong(draft, (rounds + i) % 3, vocab)
            passes = engine.runner.passes
            # Hold the engine back until every call is queued, so that this round's calls share its step.
            with engine._cond:
                calls = [
                    asyncio.ensure_future(engine.verify(f"s{i}", prompts[i] + outs[i], drafts[i], (), GREEDY))
                    for i in live
                ]
                while len(engine._verifies) < len(live):
                    await asyncio.sleep(0)
            verdicts = await asyncio.gather(*calls)
            batched += engine.runner.passes - passes == 1
            for i, verdict in zip(live, verdicts, strict=True):
                outs[i] += [*drafts[i][: verdict.accepted], verdict.next_token]
            rounds += 1
        assert [o[: len(r)] for o, r in zip(outs, references, strict=True)] == references
        assert batched == rounds  # every round: one forward pass for all its sessions
    finally:
        engine.shutdown()
