"""Verification groups that fail part way (a roll-back, the pass, its verdicts, a session's end): every call gets its
result or its error, a session its call ends is ended, none stays in flight, every row holds exactly its session's
tokens (and the right ones: the next round is judged as a plain forward pass judges it), and no row is lost.

Faults come from a runner whose chosen call fails (`faulty`): the real runner otherwise, the real sessions."""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from verify_reference import own_tokens, reference

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.core import EngineCore
from stratus_workers.serve.errors import EngineFailed
from stratus_workers.serve.runner import ModelRunner
from stratus_workers.serve.runner.fused import FusedRunner
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.sessions import SpeculativeSessions, VerifyCall, VerifyResult
from stratus_workers.serve.speculative import SparseDist

pytestmark = pytest.mark.unit

VOCAB = 48
MAX_LEN = 48
GREEDY = Sampling()
# What fails: "pass" (forward_rows raises once its pass ran: the rows took its tokens), "unreadable" (forward_rows
# returns logits no value can be read from, as a device that failed during the pass: the fault shows only where the
# verdicts are computed or read back), or the method of that name raises before it changes anything ("forward": a
# call that runs alone, or the module path's pass).
KINDS = ["pass", "unreadable", "truncate_rows", "reset", "forward"]


@pytest.fixture(scope="module")
def model() -> Any:
    return random_llama(dict(TINY), vocab_size=VOCAB, seed=3, init_std=0.3)


R = TypeVar("R", bound=ModelRunner)


def faulty(base: type[R]) -> type[R]:
    class Faulty(base):  # type: ignore[valid-type,misc]
        """The runner, but its `at`-th call (from when armed) of the kind `kind` fails with `error`."""

        kind = ""
        at = 0
        error: type[Exception] = RuntimeError
        calls: collections.Counter[str] = collections.Counter()

        def arm(self, kind: str, at: int, error: type[Exception] = RuntimeError) -> None:
            self.kind, self.at, self.error, self.calls = kind, at, error, collections.Counter()

        def _due(self, method: str, kinds: Sequence[str]) -> bool:
            self.calls[method] += 1
            return self.kind in kinds and self.calls[method] == self.at

        def forward_rows(
            self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int]
        ) -> torch.Tensor:
            logits: torch.Tensor = super().forward_rows(rows, tokens, logits_from)
            if self._due("forward_rows", ["pass", "unreadable"]):
                if self.kind == "pass":
                    raise self.error("the device failed after the pass")
                return torch.empty_like(logits, device="meta")
            return logits

        def forward_rows_greedy(
            self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int], plan: Any
        ) -> tuple[torch.Tensor, int] | None:
            found: tuple[torch.Tensor, int] | None = super().forward_rows_greedy(rows, tokens, logits_from, plan)
            if found is not None and self._due("forward_rows", ["pass", "unreadable"]):  # (counted as forward_rows)
                if self.kind == "pass":
                    raise self.error("the device failed after the pass")
                return torch.empty_like(found[0], device="meta"), found[1]
            return found

        def forward(
            self, first_row: int, tokens: Sequence[Sequence[int]], *, all_logits: bool = False, logits_from: int = 0
        ) -> torch.Tensor:
            if self._due("forward", ["forward"]):
                raise self.error("the device failed at a pass")
            logits: torch.Tensor = super().forward(first_row, tokens, all_logits=all_logits, logits_from=logits_from)
            return logits

        def truncate_rows(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
            if self._due("truncate_rows", ["truncate_rows"]):
                raise self.error("the device failed at a roll-back")
            super().truncate_rows(rows, lengths)

        def reset(self, row: int) -> None:
            if self._due("reset", ["reset"]):
                raise self.error("the device failed at a reset")
            super().reset(row)

    return Faulty


FaultyFused = faulty(FusedRunner)
FaultyModules = faulty(ModuleRunner)


def runner_over(model: Any, rows: int, fast: bool) -> Any:
    if fast:
        return FaultyFused(model, max_rows=rows, max_len=MAX_LEN, cuda_graphs=False, compile=False)
    return FaultyModules(model, max_rows=rows, max_len=MAX_LEN)


def assert_sound(sessions: SpeculativeSessions) -> None:
    """Nothing in flight, every row holds its session's tokens, every row is a session's or free (once)."""
    assert sessions.in_flight == frozenset()
    held = [s.row for s in sessions._sessions.values()]
    for session in sessions._sessions.values():
        assert sessions.runner.lengths[session.row] == len(session.tokens)
    assert sorted(held + sessions._free_rows) == list(range(sessions.first_row, sessions.runner.max_rows))


def sampled(seed: int) -> Sampling:
    return Sampling(temperature=0.9, top_p=0.95, seed=seed)


# One session: its context (by seed), its draft length, whether its faulted call is sampled, ends its session, holds a
# token outside the vocabulary, and is followed by a second call naming the same session (which runs alone).
spec_st = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.integers(0, 4),
        st.integers(0, 3).map(lambda x: x == 0),
        st.booleans(),
        st.integers(0, 6).map(lambda x: x == 0),
        st.integers(0, 4).map(lambda x: x == 0),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=spec_st,
    kind=st.sampled_from(KINDS),
    at=st.integers(1, 3),
    fast=st.booleans(),
    split=st.booleans(),
)
def test_a_group_that_fails_part_way_leaves_every_session_sound(
    model: Any, spec: list[Any], kind: str, at: int, fast: bool, split: bool
) -> None:
    """Round 1 opens the sessions; round 2 (the fault armed) rolls them back to part of their context and verifies
    (in one group, or two launched before either finishes); round 3 (no fault) verifies every session again, and
    is judged as a plain forward pass of its context and draft judges it."""
    runner = runner_over(model, 1 + len(spec) + 1, fast)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=1)
    contexts: dict[str, list[int]] = {}
    for k, (seed, *_) in enumerate(spec):
        g = torch.Generator().manual_seed(seed)
        size = int(torch.randint(2, 10, (1,), generator=g))
        contexts[f"s{k}"] = torch.randint(0, VOCAB, (size,), generator=g).tolist()
    first = sessions.verify_many([VerifyCall(sid, ctx, [(t + 1) % VOCAB for t in ctx[:3]], (), GREEDY)
                                  for sid, ctx in contexts.items()])  # fmt: skip
    assert all(isinstance(r, VerifyResult) for r in first)

    calls: list[VerifyCall] = []
    for k, (seed, length, is_sampled, end, bad, twice) in enumerate(spec):
        sid = f"s{k}"
        context = [*contexts[sid][: 1 + seed % len(contexts[sid])], seed % VOCAB]  # a roll-back, then a new token
        draft = [(seed + 5 * i) % VOCAB for i in range(length)] + ([VOCAB + 3] if bad else [])
        dists = [SparseDist((t, (t + 1) % VOCAB), (0.6, 0.4)) for t in draft] if is_sampled else []
        calls.append(VerifyCall(sid, context, draft, dists, sampled(seed) if is_sampled else GREEDY, end))
        if twice:
            calls.append(VerifyCall(sid, [*context, 1], [], (), GREEDY, False))
    runner.arm(kind, at)
    if split and len(calls) > 1:
        half = len(calls) // 2
        if {c.sid for c in calls[:half]}.isdisjoint(c.sid for c in calls[half:]):
            a, b = sessions.launch(calls[:half]), sessions.launch(calls[half:])
            got = [*sessions.finish(b)]
            got = [*sessions.finish(a), *got]
        else:
            got = sessions.verify_many(calls)
    else:
        got = sessions.verify_many(calls)
    runner.arm("", 0)

    assert len(got) == len(calls)
    ended: set[str] = set()
    for call, have in zip(calls, got, strict=True):
        assert isinstance(have, VerifyResult | Exception)
        assert "produced no" not in str(have)
        if call.end:
            ended.add(call.sid)
        if isinstance(have, VerifyResult) and call.sampling.greedy:
            want = reference(model, call, frozenset())
            assert (have.accepted, have.next_token) == (want.accepted, want.next_token)
    for sid in ended:  # a call that ends its session ends it, whatever else failed (a later call may open it anew)
        later = [c for c in calls[max(i for i, c in enumerate(calls) if c.sid == sid and c.end) + 1 :] if c.sid == sid]
        assert sid not in sessions or later
    assert_sound(sessions)

    # Every row holds the right keys and values: the next round is judged as a plain forward pass judges it.
    third = []
    for k, (seed, *_) in enumerate(spec):
        sid = f"s{k}"
        context = [*contexts[sid], seed % 5]
        third.append(VerifyCall(sid, context, list(own_tokens(model, context, 2)), (), GREEDY))
    for call, have in zip(third, sessions.verify_many(third), strict=True):
        want = reference(model, call, frozenset())
        assert isinstance(have, VerifyResult), have
        assert (have.accepted, have.next_token) == (want.accepted, want.next_token)
        assert have.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert_sound(sessions)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("kind", ["unreadable", "truncate_rows"])
def test_a_group_whose_verdicts_fail_ends_the_sessions_its_calls_end(model: Any, kind: str, fast: bool) -> None:
    """The verdicts of a pass that ran fail (at launch: greedy verdicts from logits that cannot be read; at finish:
    the roll-back that keeps the accepted tokens): each call gets the error, end=True ends its session now (not at its
    time to live), the others hold what they held."""
    runner = runner_over(model, 4, fast)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=1)
    assert all(isinstance(r, VerifyResult) for r in sessions.verify_many(
        [VerifyCall(s, [1, 2, 3, 4], [5], (), GREEDY) for s in "abc"]
    ))  # fmt: skip
    held = {sid: list(s.tokens) for sid, s in sessions._sessions.items()}
    runner.arm(kind, 1 if kind == "unreadable" else 2)  # (the first roll-back is launch's: the second is finish's)
    context = [1, 2, 3, 9, 7]  # shares 3 tokens with what each session holds: launch rolls the rows back
    draft = [(own_tokens(model, context, 1)[0] + 1) % VOCAB, 9]  # rejected at once: finish rolls them back again
    got = sessions.verify_many([VerifyCall(s, context, draft, (), GREEDY, end=s == "b") for s in "abc"])
    assert all(isinstance(r, RuntimeError) for r in got), got
    if kind == "truncate_rows":
        assert all("the device failed at a roll-back" in str(r) for r in got)
    assert "b" not in sessions and {"a", "c"} <= set(sessions._sessions)
    for sid in "ac":  # the prefix the call shares with what the session held, no more (nothing of it was kept)
        assert sessions._sessions[sid].tokens == held[sid][:3]
    assert_sound(sessions)


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize(
    ("kind", "at"), [("pass", 1), ("truncate_rows", 1), ("truncate_rows", 2), ("reset", 1), ("reset", 2), ("reset", 4)]
)
def test_engine_failed_ends_the_step(model: Any, kind: str, at: int, pipeline: bool) -> None:
    """A runner that cannot compute any more (EngineFailed: a pipeline stage died) fails the step, whichever part of
    a verification group meets it: the engine loop ends (`EngineLoop.run` does not catch it)."""
    runner = runner_over(model, 2 + 3, True)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=2)
    core = EngineCore(runner, sessions, frozenset(), max_batch_size=2, verify_pipeline=pipeline)
    core.min_verify_group = 1
    for call_id, sid in enumerate("ab"):
        core.call(call_id, "verify", (sid, [1, 2, 3], [4], [], GREEDY, False))
    while core.busy:
        core.step()
    runner.arm(kind, at, EngineFailed)
    for call_id, sid in enumerate("abcd", start=10):
        core.call(call_id, "verify", (sid, [1, 2, 5], [4, 6], [], GREEDY, sid == "a"))
    core.call(20, "end", ("b",))
    with pytest.raises(EngineFailed, match="the device failed"):
        for _ in range(4):
            core.step()
    if not pipeline:  # (with it, the group launched behind the one that failed is the dead engine's)
        assert sessions.in_flight == frozenset()


def test_sessions_opened_by_a_launch_are_not_expired_by_its_later_calls(model: Any) -> None:
    """A session idle past its time to live is ended when a new one opens: never one the same launch opened (it is in
    flight from its own call on, so its row is not lent to the next call's session)."""
    sessions = SpeculativeSessions(runner_over(model, 3, True), frozenset(), first_row=1, ttl=0.0)
    calls = [VerifyCall(s, [1, 2, 3], list(own_tokens(model, [1, 2, 3], 2)), (), GREEDY) for s in "ab"]
    got = sessions.verify_many(calls)
    for have in got:
        assert isinstance(have, VerifyResult), have
        assert have.accepted == 2
    assert_sound(sessions)


@pytest.mark.parametrize("error", [RuntimeError, EngineFailed])
def test_a_call_that_runs_alone_fails_alone_or_fails_the_engine(model: Any, error: type[Exception]) -> None:
    """A session named twice in a group: its second call runs alone at `finish`. Its pass failing gives it the error
    (the first call keeps its verdict, the session what the first call kept); EngineFailed is raised."""
    runner = runner_over(model, 3, True)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=1)
    context = [1, 2, 3]
    own = own_tokens(model, context, 3)
    calls = [VerifyCall("a", context, own[:2], (), GREEDY), VerifyCall("a", [*context, *own], [4], (), GREEDY)]
    runner.arm("forward", 1, error)
    if error is EngineFailed:
        with pytest.raises(EngineFailed, match="the device failed at a pass"):
            sessions.verify_many(calls)
        return
    first, second = sessions.verify_many(calls)
    assert isinstance(first, VerifyResult) and first.accepted == 2
    assert isinstance(second, RuntimeError) and "the device failed at a pass" in str(second)
    assert sessions._sessions["a"].tokens == [*context, *own[:2]]
    assert_sound(sessions)


def test_expire_ends_every_idle_session_though_a_reset_fails(model: Any) -> None:
    runner = runner_over(model, 3, True)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=1)
    sessions.verify_many([VerifyCall(s, [1, 2, 3], [4], (), GREEDY) for s in "ab"])
    sessions.ttl = 0.0
    runner.arm("reset", 1)
    sessions.expire()
    assert len(sessions) == 0
    assert_sound(sessions)


@pytest.mark.parametrize("op", ["verify", "draft"])
def test_a_call_that_meets_engine_failed_does_not_touch_the_runner_again(model: Any, op: str) -> None:
    """Review (emu): a Verify call that runs alone, or a Draft call, with `end` whose pass fails with EngineFailed
    still resets its session's row on the way out (their `finally: end`), where `_abandon` promises a group that the
    runner is not touched again (under pipeline parallel that reset is a call to the stage that died)."""
    runner = runner_over(model, 3, True)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=1)
    assert isinstance(sessions.verify_many([VerifyCall("a", [1, 2, 3], [4], (), GREEDY)])[0], VerifyResult)
    runner.arm("forward", 1, EngineFailed)
    with pytest.raises(EngineFailed, match="the device failed at a pass"):
        if op == "verify":
            sessions.verify("a", [1, 2, 3, 5], [6], (), GREEDY, True)
        else:
            sessions.draft("a", [1, 2, 3, 5], 2, GREEDY, 0, True)
    assert runner.calls["reset"] == 0, "the session's row was reset on a runner that raised EngineFailed"


def test_a_draft_call_that_ends_its_session_ends_it_though_refused(model: Any) -> None:
    """Review (emu): Verify with `end` ends its session whatever becomes of the call (`verify`'s docstring); Draft
    with `end` whose context is refused leaves the session open until its time to live."""
    runner = runner_over(model, 3, True)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=1)
    sessions.draft("a", [1, 2, 3], 1, GREEDY, 0, False)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        sessions.draft("a", [1, 2, 3, VOCAB + 3], 1, GREEDY, 0, True)
    assert "a" not in sessions


def test_a_verdict_stands_though_ending_its_session_fails(model: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Review (emu): a group's call with `end` whose verdict was judged keeps it when the session's reset then fails
    (before, the end's error replaced the verdict: the client lost a valid round); the failure is logged and the row
    freed."""
    runner = runner_over(model, 3, True)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=1)
    context = [1, 2, 3]
    own = own_tokens(model, context, 2)
    runner.arm("reset", 2)  # the first reset is the session's row taken when it opens
    with caplog.at_level(logging.WARNING, logger="stratus_workers.serve.sessions"):
        (got,) = sessions.verify_many([VerifyCall("a", context, own, (), GREEDY, True)])
    assert isinstance(got, VerifyResult) and got.accepted == 2, got
    assert "a" not in sessions
    assert "ending speculative session 'a' failed" in caplog.text
    assert_sound(sessions)
