"""Batched verification against its per-session definition: a plain forward pass of the model and the greedy rule
(`speculative.greedy_verdict`) for each call alone, and `speculative.verify_sampled` for each sampled row alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from verify_reference import own_tokens, reference

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.runner import ModelRunner
from stratus_workers.serve.runner.fused import FusedRunner
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.sessions import SpeculativeSessions, VerifyCall, VerifyResult, _Session
from stratus_workers.serve.speculative import SparseDist, sampling_probs, sampling_probs_rows, verify_sampled

pytestmark = pytest.mark.unit

VOCAB = 48
MAX_LEN = 48
GREEDY = Sampling()


@pytest.fixture(scope="module")
def model() -> Any:
    # Wide logits (init_std 0.3) over a small vocabulary: choices no rounding flips, and end-of-sequence tokens
    # that turn up inside drafts.
    return random_llama(dict(TINY), vocab_size=VOCAB, seed=3, init_std=0.3)


def sessions_over(model: Any, rows: int, eos: frozenset[int], fast: bool) -> SpeculativeSessions:
    runner: ModelRunner
    if fast:  # the fused path: the rows' tokens packed in one pass
        runner = FusedRunner(model, max_rows=1 + rows, max_len=MAX_LEN, cuda_graphs=False, compile=False)
    else:  # the module path: rows padded to the longest
        runner = ModuleRunner(model, max_rows=1 + rows, max_len=MAX_LEN)
    return SpeculativeSessions(runner, eos, first_row=1)


# One call: its context (by seed), its draft length, where its draft first departs from the model's own
# tokens (None: nowhere), whether the departing token is an end of sequence, whether the call ends its session,
# whether it is a bad call (a token outside the vocabulary, in the second round).
calls_st = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.integers(0, 6),
        st.none() | st.integers(0, 5),
        st.booleans(),
        st.booleans(),
        st.integers(0, 9).map(lambda x: x == 0),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=calls_st,
    eos_pick=st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=2),
    eos_drafted=st.none() | st.integers(0, 5),
    fast=st.booleans(),
)
def test_verify_many_is_each_call_judged_alone(
    model: Any, spec: list[Any], eos_pick: list[int], eos_drafted: int | None, fast: bool
) -> None:
    gen = torch.Generator().manual_seed(len(spec))
    contexts: dict[str, list[int]] = {}
    own: dict[str, list[int]] = {}
    for k, (seed, length, *_) in enumerate(spec):
        g = torch.Generator().manual_seed(seed)
        size = int(torch.randint(1, 12, (1,), generator=g))
        contexts[f"s{k}"] = torch.randint(0, VOCAB, (size,), generator=g).tolist()
        own[f"s{k}"] = own_tokens(model, contexts[f"s{k}"], length)
    # Ends of sequence: picked at random, and one of the first call's own tokens (then accepted inside a draft).
    eos = frozenset(eos_pick) | frozenset(own["s0"][eos_drafted : eos_drafted + 1] if eos_drafted is not None else ())
    sessions = sessions_over(model, rows=len(spec) + 1, eos=eos, fast=fast)
    for rnd in range(2):  # a second round continues the sessions the first left open
        calls = []
        for k, (seed, length, departs, to_eos, end, bad) in enumerate(spec):
            sid = f"s{k}"
            if sid not in contexts:  # ended in the first round: a new session of the same name
                contexts[sid] = [seed % VOCAB]
            draft = own.pop(sid, None) or own_tokens(model, contexts[sid], length)
            if departs is not None and departs < length:
                other = [t for t in sorted(eos) if t != draft[departs]] if to_eos else []
                if other:  # a rejected end of sequence: it ends nothing
                    draft[departs] = other[0]
                else:
                    shift = 1 + int(torch.randint(0, VOCAB - 1, (1,), generator=gen))
                    draft[departs] = (draft[departs] + shift) % VOCAB
            if bad and rnd == 1:
                draft = [*draft, VOCAB + 5]
            calls.append(VerifyCall(sid, list(contexts[sid]), draft, (), GREEDY, end))
        got = sessions.verify_many(calls)
        for call, have in zip(calls, got, strict=True):
            if max(call.draft, default=0) >= VOCAB:  # the bad call fails alone
                assert isinstance(have, ValueError) and "vocabulary" in str(have)
                if call.end:  # ended all the same
                    assert call.sid not in sessions._sessions
                    contexts.pop(call.sid)
                continue
            want = reference(model, call, eos)
            assert isinstance(have, VerifyResult), have
            assert (have.accepted, have.next_token, have.eos) == (want.accepted, want.next_token, want.eos)
            assert have.logprobs == pytest.approx(want.logprobs, abs=1e-4)
            if call.end:  # its row is free and empty
                assert call.sid not in sessions._sessions
                contexts.pop(call.sid)
            else:  # the row holds the context and the accepted draft tokens, and so does the session
                session = sessions._sessions[call.sid]
                kept = [*call.context, *call.draft[: have.accepted]]
                assert session.tokens == kept and sessions.runner.lengths[session.row] == len(kept)
                contexts[call.sid] = [*kept, have.next_token]
        held = {s.row for s in sessions._sessions.values()}
        assert all(sessions.runner.lengths[r] == 0 for r in range(1, len(spec) + 2) if r not in held)


def test_a_refused_pass_keeps_every_row(model: Any) -> None:
    """A pass that cannot run fails every call in it and leaves each session as it was."""
    sessions = sessions_over(model, rows=2, eos=frozenset(), fast=True)
    first = sessions.verify_many([VerifyCall(s, [1, 2, 3], [4], (), GREEDY) for s in "ab"])
    assert all(isinstance(r, VerifyResult) for r in first)
    before = {sid: (list(s.tokens), sessions.runner.lengths[s.row]) for sid, s in sessions._sessions.items()}
    sessions.max_len = 10**6  # past the runner's own limit: the pass itself refuses
    long = list(range(MAX_LEN + 2))
    got = sessions.verify_many([VerifyCall(s, [1, 2, 3, 4, 5], [t % VOCAB for t in long], (), GREEDY) for s in "ab"])
    assert all(isinstance(r, ValueError) for r in got)
    for sid, (tokens, _) in before.items():  # each row rolled back to the prefix it shares, no further
        common = 3 + (tokens[3:4] == [4])
        session = sessions._sessions[sid]
        assert (session.tokens, sessions.runner.lengths[session.row]) == (tokens[:common], common)


def test_truncate_rows_refuses_a_length_past_a_rows_end(model: Any) -> None:
    runner = FusedRunner(model, max_rows=3, max_len=MAX_LEN, cuda_graphs=False, compile=False)
    with torch.inference_mode():
        runner.forward(1, [[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="cannot truncate row 2 of length 2 to 3"):
        runner.truncate_rows([1, 2], [1, 3])
    assert runner.lengths == [0, 3, 2]  # no change
    runner.truncate_rows([2, 1], [1, 0])
    assert runner.lengths == [0, 0, 1]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 4),  # draft length
            st.sampled_from([0.5, 1.0, 1.3]),  # temperature
            st.sampled_from([1.0, 0.9, 0.5]),  # top_p
            st.integers(1, 5),  # the draft distribution's size
            st.integers(0, 10**6),  # seed
        ),
        min_size=1,
        max_size=4,
    )
)
def test_batched_sampled_judging_is_each_row_judged_alone(model: Any, rows: list[Any]) -> None:
    """`_judge_sampled` over several rows draws exactly what `verify_sampled` draws for each row alone, from the
    same generator state."""
    sessions = sessions_over(model, rows=1, eos=frozenset({7}), fast=True)
    entries = []
    expected = []
    scores: list[torch.Tensor] = []
    offsets: list[int] = []
    at = 0
    for length, temperature, top_p, size, seed in rows:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(length + 1, VOCAB, generator=g) * 3
        dists = []
        draft = []
        for _ in range(length):
            ids = torch.randperm(VOCAB, generator=g)[:size].tolist()
            probs = torch.rand(size, generator=g) + 0.05
            probs = (probs / probs.sum()).tolist()
            dists.append(SparseDist(tuple(ids), tuple(probs)))
            draft.append(ids[int(torch.randint(0, size, (1,), generator=g))])
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
        alone_gen = torch.Generator().manual_seed(seed + 1)
        verdict = verify_sampled(logits, draft, dists, temperature, top_p, alone_gen)
        chosen = [*draft[: verdict.accepted], verdict.next_token]
        logprobs = torch.log_softmax(logits[: len(chosen)], dim=-1)[torch.arange(len(chosen)), torch.tensor(chosen)]
        expected.append((verdict.accepted, verdict.next_token, logprobs.tolist()))
        session = _Session(row=1, generator=torch.Generator().manual_seed(seed + 1))
        entries.append((VerifyCall("x", [1], draft, dists, sampling), session, [1]))
        scores.append(logits)
        offsets.append(at)
        at += length + 1
    judged = sessions._judge_sampled(entries, offsets, torch.cat(scores))
    for (accepted, token, logprobs), got, (call, _, _) in zip(expected, judged, entries, strict=True):
        assert not isinstance(got, Exception), got
        assert got[:2] == (accepted, token)
        assert got[2] == pytest.approx(logprobs, abs=1e-5)
        assert got[3] == (token == 7 or 7 in call.draft[:accepted])


def test_a_bad_sampled_row_fails_alone_before_any_draw(model: Any) -> None:
    sessions = sessions_over(model, rows=1, eos=frozenset(), fast=True)
    logits = torch.randn(4, VOCAB)
    good = VerifyCall("a", [1], [3], [SparseDist((3, 4), (0.5, 0.5))], Sampling(temperature=1.0))
    bad = VerifyCall("b", [1], [5], [SparseDist((3,), (1.0,))], Sampling(temperature=1.0))  # 5 has probability 0
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    judged = sessions._judge_sampled(
        [(good, _Session(1, generator=torch.Generator().manual_seed(1)), [1]), (bad, _Session(2, generator=gen), [1])],
        [0, 2],
        logits,
    )
    assert not isinstance(judged[0], Exception)
    assert isinstance(judged[1], ValueError) and "probability 0" in str(judged[1])
    assert torch.equal(gen.get_state(), state)  # nothing drawn for the refused row


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
def test_sampling_probs_rows_is_sampling_probs_of_each_row(top_p: float) -> None:
    logits = torch.randn(5, VOCAB) * 2
    temperatures = [0.7, 1.0, 1.5, 0.7, 1.0]
    top_ps = [top_p, 1.0, top_p, 0.0, top_p]
    together = sampling_probs_rows(logits, temperatures, top_ps)
    for i in range(5):
        assert torch.allclose(together[i], sampling_probs(logits[i], temperatures[i], top_ps[i]), atol=1e-6)


def test_verify_owed_counts_each_due_session_once(model: Any) -> None:
    """The count of due sessions whose next call has not come (kept as calls arrive) is the set difference it
    stands for: a session calling twice counts once, one that ends after calling no longer counts."""
    from stratus_workers.serve.core import EngineCore

    runner = ModuleRunner(model, max_rows=5, max_len=MAX_LEN)
    core = EngineCore(
        runner, SpeculativeSessions(runner, frozenset(), first_row=1), frozenset(), max_batch_size=1,
        verify_pipeline=False,  # one Verify step replies to its calls (the pipeline's owed count: test_core_pipeline)
    )
    for k, sid in enumerate("abc"):
        core.call(k, "verify", (sid, [1 + k, 2], [3], (), GREEDY, False))
    core.step()
    due = {"a", "b", "c"}
    script = [("verify", "a"), ("verify", "a"), ("end", "b"), ("verify", "c"), ("end", "c"), ("verify", "x")]
    arrived: set[str] = set()
    for n, (op, sid) in enumerate(script):
        if op == "end":
            core.call(10 + n, "end", (sid,))
            due.discard(sid)
        else:
            core.call(10 + n, "verify", (sid, [7, 8], [9], (), GREEDY, False))
            arrived.add(sid)
        assert core.verify_owed() == len(due - arrived)
    core.step()
    assert core.verify_owed() == 0


# -- launch and finish: a group's pass queued, judged later (the engine's verify pipeline) ----------------------


def own_calls(model: Any, sids: str, context: list[int], n: int = 3, end: bool = False) -> list[VerifyCall]:
    draft = own_tokens(model, context, n)
    return [VerifyCall(sid, context, [*draft[:-1], (draft[-1] + 1) % VOCAB], (), GREEDY, end) for sid in sids]


@pytest.mark.parametrize("fast", [False, True])
def test_two_groups_in_flight_finish_in_either_order_with_their_own_verdicts(model: Any, fast: bool) -> None:
    first = [*own_calls(model, "ab", [1, 2, 3]), *own_calls(model, "c", [7, 7], n=4, end=True)]
    second = [*own_calls(model, "de", [5, 9, 11, 4], n=2), VerifyCall("f", [1], [VOCAB + 1], (), GREEDY)]
    twin = sessions_over(model, rows=6, eos=frozenset(), fast=fast)
    want = twin.verify_many(first), twin.verify_many(second)
    sessions = sessions_over(model, rows=6, eos=frozenset(), fast=fast)
    a = sessions.launch(first)
    b = sessions.launch(second)
    assert sessions.in_flight == {"a", "b", "c", "d", "e"}  # f's call was refused at launch: it holds nothing
    # The later group first: each judges its own pass (that each waits for its own pass only is a GPU matter: on the
    # CPU `launch` computes everything; the gpu-marked test in test_core_pipeline.py runs the CUDA path).
    got_b = sessions.finish(b)
    assert sessions.in_flight == {"a", "b", "c"}
    got_a = sessions.finish(a)
    assert sessions.in_flight == frozenset()
    for have, expected in zip([*got_a, *got_b], [*want[0], *want[1]], strict=True):
        if isinstance(expected, Exception):
            assert type(have) is type(expected) and str(have) == str(expected)
        else:
            assert isinstance(have, VerifyResult)
            assert (have.accepted, have.next_token, have.eos) == (expected.accepted, expected.next_token, expected.eos)
            assert have.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    assert [r.accepted for r in got_a] == [2, 2, 3]  # type: ignore[union-attr]
    assert "c" not in sessions  # its call ended it, at finish
    with pytest.raises(RuntimeError, match="finished already"):
        sessions.finish(a)


def test_a_session_in_flight_is_neither_touched_nor_evicted_nor_expired(model: Any) -> None:
    sessions = sessions_over(model, rows=2, eos=frozenset(), fast=True)
    pending = sessions.launch(own_calls(model, "a", [1, 2, 3]))
    sessions.verify("b", [4, 5], [], (), GREEDY, end=False)
    for session in sessions._sessions.values():  # both idle long enough to give way; a (in flight) is the oldest
        session.last_used -= 10
    with pytest.raises(RuntimeError, match="in flight"):
        sessions.draft("a", [1, 2, 3], 2, GREEDY, 4, end=False)
    with pytest.raises(RuntimeError, match="in flight"):
        sessions.end("a")
    sessions.ttl = 5.0
    sessions.expire()  # b is past its time to live; a is in flight and stays
    assert "a" in sessions and "b" not in sessions
    sessions.verify("b", [4, 5], [], (), GREEDY, end=False)
    sessions._sessions["b"].last_used -= 1
    sessions.verify("c", [6], [], (), GREEDY, end=False)  # no free row: the idlest session not in flight gives way
    assert "a" in sessions and "b" not in sessions and "c" in sessions
    (result,) = sessions.finish(pending)
    assert isinstance(result, VerifyResult) and result.accepted == 2
    session = sessions._sessions["a"]
    assert session.tokens == [1, 2, 3, *own_tokens(model, [1, 2, 3], 2)] and sessions.runner.lengths[session.row] == 5
