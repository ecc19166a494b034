"""The verify pipeline (`EngineCore` with `verify_pipeline`): every caller gets exactly the results the core without
it gives, whatever the mix of sessions, drafts, errors, ends and ordinary requests; a group in flight is finished by
the next step, before any call that names its sessions, and at shutdown."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus_workers.models.loader import LoadedModel
from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.core import EngineCore, EngineRequest, verify_pipeline_on
from stratus_workers.serve.loop import EngineSettings, build_core, pipeline_default
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.sessions import PendingVerify, SpeculativeSessions, VerifyResult
from stratus_workers.serve.speculative import SparseDist

pytestmark = pytest.mark.unit

VOCAB = 48
MAX_LEN = 48
BATCH = 2


@pytest.fixture(scope="module")
def model() -> Any:
    # Wide logits (init_std 0.3) over a small vocabulary: choices no rounding flips between passes of other shapes.
    return random_llama(dict(TINY), vocab_size=VOCAB, seed=3, init_std=0.3)


def core_over(
    model: Any, *, pipeline: bool, fast: bool, sessions: int, eos: frozenset[int] = frozenset(), min_group: int = 8
) -> EngineCore:
    runner = build_runner(model, max_rows=BATCH + sessions, max_len=MAX_LEN, fast=fast)
    pool = SpeculativeSessions(runner, eos, first_row=BATCH)
    core = EngineCore(runner, pool, eos, max_batch_size=BATCH, verify_pipeline=pipeline)
    core.min_verify_group = min_group
    return core


@functools.cache
def own_tokens(model: Any, context: tuple[int, ...], n: int) -> tuple[int, ...]:
    """The model's greedy continuation of `context` (a plain forward pass per token)."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(torch.tensor([[*context, *out]], device=model.device)).logits[0, -1].argmax()))
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """One session's calls: `rounds` Verify rounds of `draft` tokens (the model's own, but for the one at
    `departs`), greedy or sampled; how it ends ("open": left open, "verify": end=True on its last Verify call,
    "op": an end call after it); a bad call at round `bad_round` ("token": a token outside the vocabulary,
    "long": a context past the server's); a second Verify call with its first; steps between a reply and its
    next call."""

    seed: int
    rounds: int
    draft: int
    departs: int | None
    sampled: bool
    end: str
    bad: str | None
    bad_round: int
    twice: bool
    delay: int


plans = st.builds(
    Plan,
    seed=st.integers(0, 10**6),
    rounds=st.integers(1, 3),
    draft=st.integers(0, 5),
    departs=st.none() | st.integers(0, 4),
    sampled=st.integers(0, 3).map(lambda x: x == 0),
    end=st.sampled_from(["open", "verify", "op"]),
    bad=st.none() | st.sampled_from(["token", "long"]),
    bad_round=st.integers(0, 2),
    twice=st.integers(0, 4).map(lambda x: x == 0),
    delay=st.integers(0, 2),
)


class Driver:
    """Callers of one core: each session sends its next call `delay` steps after its reply, from the context its
    replies built; ordinary requests decode meanwhile. Collects every result once (by call), every request's
    tokens."""

    def __init__(self, core: EngineCore, model: Any, plans: list[Plan]) -> None:
        self.core = core
        self.model = model
        self.plans = {f"s{k}": p for k, p in enumerate(plans)}
        self.contexts = {sid: [1 + p.seed % (VOCAB - 1), p.seed % 7, 5] for sid, p in self.plans.items()}
        self.results: dict[tuple[str, int, str], Any] = {}
        self.tokens: dict[int, list[int]] = {}
        self.finished: dict[int, str] = {}
        self.sent: dict[int, tuple[str, int, str, list[int], list[int]]] = {}  # call id -> key, context, draft
        self.due: list[tuple[int, str, int]] = [(0, sid, 0) for sid in self.plans]
        self.ids = iter(range(1, 10**6))
        self.step = 0

    def sampling(self, plan: Plan) -> Sampling:
        return Sampling(temperature=0.9, top_p=0.95, seed=plan.seed) if plan.sampled else Sampling()

    def send(self, sid: str, rnd: int) -> None:
        plan = self.plans[sid]
        if rnd == plan.rounds:  # after the last round: the end call
            call_id = next(self.ids)
            self.sent[call_id] = (sid, rnd, "end", [], [])
            self.core.call(call_id, "end", (sid,))
            return
        context = list(self.contexts[sid])
        if plan.sampled:  # drafts from the seed; each token's distribution holds it and one other
            draft = [(plan.seed + 7 * i + len(context)) % VOCAB for i in range(plan.draft)]
        else:
            draft = list(own_tokens(self.model, tuple(context), plan.draft))
            if plan.departs is not None and plan.departs < len(draft):
                draft[plan.departs] = (draft[plan.departs] + 1 + plan.seed % (VOCAB - 1)) % VOCAB
        bad = plan.bad if rnd == min(plan.bad_round, plan.rounds - 1) else None
        if bad == "token":
            draft.append(VOCAB + 5)
        elif bad == "long":
            context = [1] * MAX_LEN
        dists = [SparseDist((t, (t + 1) % VOCAB), (0.6, 0.4)) for t in draft] if plan.sampled else []
        end = plan.end == "verify" and rnd == plan.rounds - 1
        call_id = next(self.ids)
        self.sent[call_id] = (sid, rnd, "verify", context, draft)
        self.core.call(call_id, "verify", (sid, context, draft, dists, self.sampling(plan), end))
        if plan.twice and rnd == 0:  # the same session again, in the same step: it runs after the first
            call_id = next(self.ids)
            again = [*context, draft[0] if draft else 2]
            self.sent[call_id] = (sid, rnd, "again", again, [])
            self.core.call(call_id, "verify", (sid, again, [], [], self.sampling(plan), False))

    def run(self, requests: list[int]) -> None:
        for seq_id, n in enumerate(requests):
            self.core.add(EngineRequest(seq_id, [3 + seq_id, 9, 4], Sampling(max_new_tokens=n)))
        while self.due or self.sent or self.core.busy:
            assert self.step < 500, "the callers never got their replies"
            for item in [d for d in self.due if d[0] <= self.step]:
                self.due.remove(item)
                self.send(item[1], item[2])
            self.step += 1
            if not self.core.busy:  # the callers are waiting out their delays
                continue
            out = self.core.step()
            for seq_id, token in zip(out.seq_ids, out.tokens, strict=True):
                self.tokens.setdefault(seq_id, []).append(token)
            self.finished.update((f.seq_id, f.reason) for f in out.finished)
            for call_id, kind, value in out.results:
                sid, rnd, what, context, draft = self.sent.pop(call_id)  # KeyError: a call answered twice
                key = (sid, rnd, what)
                assert key not in self.results
                self.results[key] = (kind, value) if kind else value
                if what != "verify":
                    continue
                plan = self.plans[sid]
                if not kind:
                    self.contexts[sid] = [*context, *draft[: value.accepted], value.next_token]
                    if value.eos or (plan.end == "verify" and rnd == plan.rounds - 1):
                        continue  # the session is over
                if rnd + 1 < plan.rounds or (rnd + 1 == plan.rounds and plan.end == "op"):
                    self.due.append((self.step + plan.delay, sid, rnd + 1))
        core = self.core
        assert not core.busy and core.sessions.in_flight == frozenset()
        for session in core.sessions._sessions.values():  # every row holds what its session says it does
            assert core.runner.lengths[session.row] == len(session.tokens)


def assert_same(got: dict[Any, Any], want: dict[Any, Any]) -> None:
    assert got.keys() == want.keys()
    for key, have in got.items():
        expected = want[key]
        if isinstance(expected, VerifyResult):
            assert isinstance(have, VerifyResult), (key, have)
            assert (have.accepted, have.next_token, have.eos) == (expected.accepted, expected.next_token, expected.eos)
            assert have.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
        else:
            assert have == expected, key


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sessions=st.lists(plans, min_size=1, max_size=9),
    requests=st.lists(st.integers(1, 6), max_size=2),
    eos_token=st.none() | st.integers(0, VOCAB - 1),
    fast=st.booleans(),
    min_group=st.integers(1, 3),
)
def test_the_pipeline_gives_every_caller_what_the_core_without_it_gives(
    model: Any, sessions: list[Plan], requests: list[int], eos_token: int | None, fast: bool, min_group: int
) -> None:
    eos = frozenset() if eos_token is None else frozenset({eos_token})
    runs = {}
    for pipeline in (False, True):
        core = core_over(model, pipeline=pipeline, fast=fast, sessions=len(sessions) + 1, eos=eos, min_group=min_group)
        driver = Driver(core, model, sessions)
        driver.run(requests)
        runs[pipeline] = driver
    off, on = runs[False], runs[True]
    assert_same(on.results, off.results)
    assert on.tokens == off.tokens and on.finished == off.finished
    assert len(on.finished) == len(requests)


def test_two_groups_alternate_and_overlap(model: Any) -> None:
    """16 sessions answering at once: the first step splits them in two groups, and from then on each step
    launches one group's next round before it finishes the other's."""
    plans_ = [Plan(seed=k, rounds=4, draft=4, departs=k % 5, sampled=k % 4 == 0, end="op", bad=None, bad_round=0,
                   twice=False, delay=0) for k in range(16)]  # fmt: skip
    runs = {}
    for pipeline in (False, True):
        core = core_over(model, pipeline=pipeline, fast=True, sessions=17, min_group=4)
        driver = Driver(core, model, plans_)
        driver.run([])
        runs[pipeline] = driver
        if pipeline:
            # 4 rounds of 16 sessions: 2 groups a round, every one after the first two launched with one in flight.
            assert core.verify_groups == 8 and core.verify_overlapped == 6
        else:
            assert core.verify_groups == 4 and core.verify_overlapped == 0
    assert_same(runs[True].results, runs[False].results)
    assert all(isinstance(v, VerifyResult) for k, v in runs[True].results.items() if k[2] == "verify")


def test_uneven_groups_are_evened_out(model: Any) -> None:
    """A few calls in flight and many new ones: the new ones are split so that the sessions replied to in this step
    and the group left in flight are the same size, and stay so."""
    core = core_over(model, pipeline=True, fast=True, sessions=25, min_group=4)
    ids = iter(range(10**6))
    contexts = {f"s{k}": [1 + k, 4, 9] for k in range(24)}
    sent: dict[int, str] = {}

    def send(sids: list[str]) -> None:
        for sid in sids:
            call_id = next(ids)
            sent[call_id] = sid
            core.call(call_id, "verify", (sid, contexts[sid], [], [], Sampling(), False))

    def replied(out: Any) -> list[str]:
        sids = [sent.pop(call_id) for call_id, _, _ in out.results]
        for _, kind, value in out.results:
            assert kind == "", value
        for sid, (_, _, value) in zip(sids, out.results, strict=True):
            contexts[sid] = [*contexts[sid], value.next_token]
        return sids

    send([f"s{k}" for k in range(4)])
    assert replied(core.step()) == []  # 4 calls: one group, in flight
    send([f"s{k}" for k in range(4, 24)])
    back = replied(core.step())  # 20 new against 4 in flight: 8 finished now with the 4, 12 left in flight
    assert len(back) == 12 and core.sessions.in_flight == {f"s{k}" for k in range(12, 24)}
    for _ in range(3):  # from then on 12 and 12 alternate
        send(back)
        back = replied(core.step())
        assert len(back) == 12 and len(core.sessions.in_flight) == 12
    assert len(replied(core.step())) == 12  # nothing new: the group in flight is finished
    assert not sent and not core.busy


def calls_for(model: Any, sids: str, context: list[int]) -> list[tuple[str, list[int], list[int]]]:
    return [(sid, context, list(own_tokens(model, tuple(context), 3))) for sid in sids]


def test_a_group_in_flight_is_finished_by_the_next_step_when_nothing_new_arrives(model: Any) -> None:
    core = core_over(model, pipeline=True, fast=True, sessions=3)
    for k, (sid, context, draft) in enumerate(calls_for(model, "ab", [4, 8, 15])):
        core.call(k, "verify", (sid, context, draft, [], Sampling(), False))
    first = core.step()
    assert first.results == [] and core.busy  # launched, in flight
    assert core.sessions.in_flight == {"a", "b"}
    second = core.step()
    assert sorted(r[0] for r in second.results) == [0, 1]
    assert all(isinstance(r[2], VerifyResult) and r[2].accepted == 3 for r in second.results)
    assert not core.busy and core.sessions.in_flight == frozenset()


@pytest.mark.parametrize("op", ["end", "draft", "verify", "score"])
def test_a_call_after_a_group_in_flight_runs_after_it(model: Any, op: str) -> None:
    """A call that names a session in flight (or any Draft, Score or end call) finishes the group first: it sees
    the session as the group left it."""
    core = core_over(model, pipeline=True, fast=True, sessions=3)
    (sid, context, draft), = calls_for(model, "a", [4, 8, 15])  # fmt: skip
    core.call(1, "verify", (sid, context, draft, [], Sampling(), False))
    assert core.step().results == []
    kept = [*context, *draft]
    args: dict[str, tuple[Any, ...]] = {
        "end": (sid,),
        "draft": (sid, kept, 2, Sampling(), 4, False),
        "verify": (sid, kept, [], [], Sampling(), False),
        "score": ([1, 2], [3]),
    }
    core.call(2, op, args[op])
    out = core.step()
    results = {call_id: (kind, value) for call_id, kind, value in out.results}
    assert results[1][0] == "" and results[1][1].accepted == 3  # the group's result, in this step
    if op == "verify":  # launched after the first was finished: in flight now
        assert 2 not in results
        results.update((call_id, (kind, value)) for call_id, kind, value in core.step().results)
        assert results[2][1].next_token == own_tokens(model, tuple(kept), 1)[0]
    assert results[2][0] == ""
    if op == "end":
        assert "a" not in core.sessions
    elif op != "score":
        assert core.sessions._sessions["a"].tokens[: len(kept)] == kept
    assert not core.busy


def test_shutdown_answers_the_group_in_flight(model: Any) -> None:
    core = core_over(model, pipeline=True, fast=True, sessions=3)
    for k, (sid, context, draft) in enumerate(calls_for(model, "ab", [4, 8, 15])):
        core.call(k, "verify", (sid, context, draft, [], Sampling(), False))
    assert core.step().results == []
    core.call(7, "verify", ("a", [4, 8, 15, 16], [], [], Sampling(), False))  # queued, never launched
    out = core.shutdown()
    results = {call_id: (kind, value) for call_id, kind, value in out.results}
    assert results[7] == ("stopped", "server shutting down")
    assert all(results[k][0] == "" and results[k][1].accepted == 3 for k in (0, 1))
    assert not core.busy and core.sessions.in_flight == frozenset()


def test_the_loop_waits_for_the_group_it_replied_to_while_the_other_is_in_flight(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify_owed: with a group in flight still computing, the sessions last replied to are owed even before any of
    their calls arrived; the sessions in flight never are. Once the group in flight is computed and nothing is
    queued, nothing is owed: waiting would only delay its reply."""
    core = core_over(model, pipeline=True, fast=True, sessions=5, min_group=2)
    context = [4, 8, 15]
    for k, sid in enumerate("abcd"):
        core.call(k, "verify", (sid, context, [], [], Sampling(), False))
    out = core.step()  # two groups: a, b finished now; c, d in flight
    assert sorted(r[0] for r in out.results) == [0, 1] and core.sessions.in_flight == {"c", "d"}
    # On the CPU `launch` computes everything: the group in flight is done, so the loop would step at once.
    assert core.verify_owed() == 0
    # A device still computing it (on the CPU only a stand-in can say so): a and b are owed.
    monkeypatch.setattr(PendingVerify, "ready", lambda self: False)
    assert core.verify_owed() == 2
    nxt = {r[0]: r[2] for r in out.results}
    core.call(10, "verify", ("a", [*context, nxt[0].next_token], [], [], Sampling(), False))
    assert core.verify_owed() == 1
    core.call(11, "end", ("b",))  # a session that ends owes nothing
    assert core.verify_owed() == 0


def test_new_sessions_wanting_the_rows_in_flight_wait_for_its_group(model: Any) -> None:
    """Every row is held, one by a call that ends its session: a new session's call finishes that group first and
    takes the row it frees (as it would without the pipeline), instead of finding every row in flight."""
    core = core_over(model, pipeline=True, fast=True, sessions=2)
    core.call(1, "verify", ("a", [4, 8, 15], [16], [], Sampling(), True))
    core.call(2, "verify", ("b", [4, 8, 15], [16], [], Sampling(), False))
    assert core.step().results == [] and core.sessions.free_rows == 0
    core.call(3, "verify", ("c", [23, 42], [], [], Sampling(), False))
    out = core.step()
    assert sorted(call_id for call_id, kind, _ in out.results if kind == "") == [1, 2]
    assert core.sessions.in_flight == {"c"}
    (result,) = core.step().results
    assert result[0] == 3 and result[1] == "", result


def pipeline_on_and_off(model: Any, plans_: list[Plan], requests: list[int]) -> EngineCore:
    """Both runs of `plans_` and `requests` (the pipeline off, then on) agree; the pipelined core."""
    runs = {}
    for pipeline in (False, True):
        core = core_over(model, pipeline=pipeline, fast=True, sessions=len(plans_) + 1, min_group=4)
        core.runner.warmup()
        driver = Driver(core, model, plans_)
        with torch.inference_mode():  # as the engine loop runs the core
            driver.run(requests)
        runs[pipeline] = driver
    assert_same(runs[True].results, runs[False].results)
    assert runs[True].tokens == runs[False].tokens and runs[True].finished == runs[False].finished
    return core


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_pipeline_on_the_cuda_path() -> None:
    """On CUDA (graphs, packed verification): `launch` returns before the device is done and `finish` reads the
    verdicts back through pinned memory and an event, while the next group's pass is queued; the results are the
    unpipelined core's."""
    model = random_llama(dict(TINY), vocab_size=VOCAB, seed=3, init_std=0.3).to("cuda", torch.float32)
    plans_ = [
        Plan(seed=k, rounds=4, draft=5, departs=k % 6, sampled=k % 4 == 1, end=("op", "verify", "open")[k % 3],
             bad="token" if k == 5 else None, bad_round=2, twice=k == 7, delay=k % 2)
        for k in range(16)
    ]  # fmt: skip
    core = pipeline_on_and_off(model, plans_, [6, 4])
    assert core.runner.device.type == "cuda" and core.verify_overlapped > 0


def test_the_pipeline_defaults_on_only_in_an_engine_process_of_one_cuda_device(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # There the frontend works in the other process while the device computes (measured faster on an H200); a thread
    # engine shares one interpreter lock (measured slower), the CPU has nothing to overlap, parallel was not measured.
    monkeypatch.delenv("STRATUS_VERIFY_PIPELINE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pipeline_default(True, cuda, False)
    assert not pipeline_default(False, cuda, False)
    assert not pipeline_default(True, cpu, False)
    assert not pipeline_default(True, cuda, True)
    assert not pipeline_default(True, None, False)  # a runner without a torch device (llama.cpp)
    assert verify_pipeline_on(True) and not verify_pipeline_on(False)
    monkeypatch.setenv("STRATUS_VERIFY_PIPELINE", "0")  # the variable wins over the default, either way
    assert not verify_pipeline_on(True)
    monkeypatch.setenv("STRATUS_VERIFY_PIPELINE", "1")
    assert verify_pipeline_on(False)
    # The engine process's own core on this CPU: built as `worker.serve` builds it, the pipeline stays off.
    monkeypatch.delenv("STRATUS_VERIFY_PIPELINE", raising=False)
    loaded = LoadedModel(model=model, tokenizer=None, name="tiny", source="test", dtype=torch.float32, device=cpu)
    core, _ = build_core(loaded, EngineSettings(max_batch_size=BATCH, max_tokens=MAX_LEN), own_process=True)
    assert not core.verify_pipeline


def test_the_pipeline_is_off_unless_asked_for(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Off by default in a core built here (a thread engine's: it measured slower on an H200 at 64 sessions,
    # docs/serving.md); STRATUS_VERIFY_PIPELINE=1 turns it on, and its group size is read (and a bad one refused,
    # naming it) only then.
    def build() -> EngineCore:
        runner = build_runner(model, max_rows=BATCH + 2, max_len=MAX_LEN, fast=False)
        return EngineCore(runner, SpeculativeSessions(runner, frozenset(), first_row=BATCH), frozenset(),
                          max_batch_size=BATCH)  # fmt: skip

    monkeypatch.delenv("STRATUS_VERIFY_PIPELINE", raising=False)
    monkeypatch.setenv("STRATUS_VERIFY_MIN_GROUP", "zero")
    assert not build().verify_pipeline  # and the bad group size of a switch that is off stops nothing
    monkeypatch.setenv("STRATUS_VERIFY_PIPELINE", "1")
    with pytest.raises(ValueError, match="STRATUS_VERIFY_MIN_GROUP"):
        build()
    monkeypatch.setenv("STRATUS_VERIFY_MIN_GROUP", "3")
    core = build()
    assert core.verify_pipeline and core.min_verify_group == 3
