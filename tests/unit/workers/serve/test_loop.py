"""The engine loop over a real core (the tiny model) with the verify pipeline on: callers in threads of their own
each get their replies, the loop goes idle when calls stop arriving, and stopping with a group in flight answers
its calls."""

from __future__ import annotations

import itertools
import json
import pickle
import threading
import time
from typing import Any

import pytest
import torch

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.contexts import pack_call
from stratus_workers.serve.core import EngineCore, StepOutput
from stratus_workers.serve.loop import EngineLoop, StepProfile, StepTrace, ThreadInbox
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.sessions import SpeculativeSessions, VerifyResult
from stratus_workers.serve.surface import SparseDist

pytestmark = pytest.mark.unit

VOCAB = 48
MAX_LEN = 64
WAIT = 60.0  # seconds a caller waits for a reply before the test calls it hung (a loaded machine is slow)


@pytest.fixture(scope="module")
def model() -> Any:
    return random_llama(dict(TINY), vocab_size=VOCAB, seed=5, init_std=0.3)


def core_over(model: Any, pipeline: bool, sessions: int) -> EngineCore:
    runner = build_runner(model, max_rows=1 + sessions, max_len=MAX_LEN, fast=True)
    pool = SpeculativeSessions(runner, frozenset(), first_row=1)
    core = EngineCore(runner, pool, frozenset(), max_batch_size=1, verify_pipeline=pipeline)
    core.min_verify_group = 2
    return core


class Running:
    """An `EngineLoop` in a thread, and callers' replies by call id."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.inbox = ThreadInbox()
        self.replies: dict[int, tuple[str, Any]] = {}
        self.stopped: StepOutput | None = None
        self.cond = threading.Condition()
        self.loop = EngineLoop(core, self.emit)
        self.thread = threading.Thread(target=self.loop.run, args=(self.inbox,), daemon=True)
        self.ids = iter(range(1, 10**6))
        self.lock = threading.Lock()

    def emit(self, message: tuple[Any, ...]) -> None:
        out = StepOutput.unpack(message[1])
        with self.cond:
            for call_id, kind, value in out.results:
                assert call_id not in self.replies, f"call {call_id} answered twice"
                self.replies[call_id] = (kind, value)
            if message[0] == "stopped":
                self.stopped = out
            self.cond.notify_all()

    def call(self, op: str, *args: Any) -> tuple[str, Any]:
        with self.lock:
            call_id = next(self.ids)
        self.inbox.put(("call", call_id, op, args))
        with self.cond:
            assert self.cond.wait_for(lambda: call_id in self.replies, WAIT), f"no reply to {op} call {call_id}"
            return self.replies[call_id]

    def send(self, message: tuple[Any, ...]) -> tuple[str, Any]:
        """A message with a call id (`message[1]`) as the frontend's channel delivers it (pickled); its reply."""
        self.inbox.put(pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))
        with self.cond:
            assert self.cond.wait_for(lambda: message[1] in self.replies, WAIT), f"no reply to {message}"
            return self.replies[message[1]]

    def stop(self) -> None:
        self.inbox.put(("stop",))
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


def caller(running: Running, sid: str, rounds: int, out: dict[str, list[Any]]) -> None:
    """A session's rounds: drafts of 3 tokens (its seed's, mostly rejected), each round's context built from the
    replies before it."""
    context = [1 + int(sid[1:]) % (VOCAB - 1), 4, 9]
    got: list[Any] = []
    for rnd in range(rounds):
        draft = [(int(sid[1:]) * 5 + rnd + i) % VOCAB for i in range(3)]
        kind, value = running.call("verify", sid, context, draft, [], Sampling(), False)
        assert kind == "", value
        got.append((value.accepted, value.next_token, value.logprobs))
        context = [*context, *draft[: value.accepted], value.next_token]
    out[sid] = got


def run_callers(model: Any, pipeline: bool, n: int, rounds: int) -> tuple[dict[str, list[Any]], Running]:
    running = Running(core_over(model, pipeline, sessions=n))
    running.thread.start()
    out: dict[str, list[Any]] = {}
    threads = [threading.Thread(target=caller, args=(running, f"s{k}", rounds, out)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(out) == n, "a caller did not finish"
    return out, running


def test_every_caller_gets_its_replies_and_the_loop_goes_idle(model: Any) -> None:
    got, running = run_callers(model, pipeline=True, n=8, rounds=5)
    try:
        core = running.core
        # Calls stopped arriving: the group last launched was finished, and the loop sleeps (no steps).
        deadline = time.monotonic() + WAIT
        while core.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not core.busy and core.sessions.in_flight == frozenset()
        steps = running.loop.steps
        time.sleep(0.3)
        assert running.loop.steps == steps
        assert core.verify_groups >= 5
    finally:
        running.stop()
    want, other = run_callers(model, pipeline=False, n=8, rounds=5)
    other.stop()
    assert got.keys() == want.keys()
    for sid, rounds in got.items():
        for (accepted, token, logprobs), (w_accepted, w_token, w_logprobs) in zip(rounds, want[sid], strict=True):
            assert (accepted, token) == (w_accepted, w_token)
            assert logprobs == pytest.approx(w_logprobs, abs=1e-5)


def test_stopping_with_a_group_in_flight_answers_its_calls(model: Any) -> None:
    core = core_over(model, pipeline=True, sessions=3)
    running = Running(core)
    steps: list[StepOutput] = []

    def emit(message: tuple[Any, ...]) -> None:
        running.emit(message)
        if message[0] == "step":
            steps.append(StepOutput.unpack(message[1]))
            running.inbox.put(("stop",))  # arrives while the group the step launched is in flight

    running.loop.emit = emit
    for call_id, sid in enumerate("ab"):
        running.inbox.put(("call", call_id, "verify", (sid, [3, 4, 5], [6, 7], [], Sampling(), False)))
    running.loop.run(running.inbox)  # here: it returns once it stopped
    assert len(steps) == 1 and steps[0].results == []  # launched, not finished
    assert running.stopped is not None
    assert sorted(running.replies) == [0, 1]
    assert all(kind == "" and isinstance(value, VerifyResult) for kind, value in running.replies.values())
    assert not core.busy and core.sessions.in_flight == frozenset()


def test_a_delta_without_its_sampling_values_is_answered_with_an_error_and_the_next_delta_stands(model: Any) -> None:
    running = Running(core_over(model, pipeline=False, sessions=2))
    running.thread.start()
    try:
        sampled = Sampling(temperature=1.5, seed=3)
        context = [1, 4, 9, 2]
        draft = [7, 3]
        # The drafter all but ruled its tokens out: the target accepts them (p / q > 1), as it would not the other way.
        dists = [SparseDist((7, 5), (0.001, 0.999)), SparseDist((3, 8), (0.001, 0.999))]
        whole = running.call("verify", "a", context, draft, dists, sampled, False)  # the objects, no channel
        assert whole[0] == "" and whole[1].accepted == 2, whole
        kind, error = running.send(("delta", 1001, "verify", ("b", context, draft, dists, sampled, False), 0))
        assert kind == "error" and "sampling came as Sampling(temperature=1.5" in error
        # The mirror took the context all the same (the frontend's memory moved alike): keeping all of it, with the
        # sampling and the distributions as values, verifies as the whole call did, the sampling's seed included.
        args = pack_call("verify", ("b", [], draft, dists, sampled, False))
        assert running.send(("delta", 1002, "verify", args, len(context))) == whole
        assert running.loop.contexts.last("b") == context
    finally:
        running.stop()


def test_a_profiled_period_reports_how_the_cuda_allocators_counters_moved(
    model: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: torch's CUDA allocator API stands in (the counters grow as a GPU's would); on the CPU the line
    # has no such field.
    profile = tmp_path / "steps.jsonl"
    core = core_over(model, False, 1)
    plain = StepProfile(str(profile), core)
    for i in range(StepProfile.MIN_STEPS):
        plain.step(i * 0.01, i * 0.01 + 0.001, False)
    plain.idle()
    assert "allocator" not in json.loads(profile.read_text().splitlines()[-1])

    counts = {"num_host_alloc": 2, "host_alloc_time.total": 40.0, "num_device_alloc": 7, "num_alloc_retries": 0}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: {k: v for k, v in counts.items() if "host" in k})
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: {k: v for k, v in counts.items() if "host" not in k})
    cuda = StepProfile(str(profile), core)
    for i in range(StepProfile.MIN_STEPS):
        cuda.step(i * 0.01, i * 0.01 + 0.001, False)
    counts.update({"num_host_alloc": 5, "host_alloc_time.total": 160.0, "num_device_alloc": 7, "num_alloc_retries": 1})
    cuda.idle()
    line = json.loads(profile.read_text().splitlines()[-1])
    assert line["allocator"] == {
        "host.num_host_alloc": 3, "host.host_alloc_time.total": 120.0, "device.num_device_alloc": 0,
        "device.num_alloc_retries": 1,
    }  # fmt: skip


@pytest.mark.parametrize("form", ["events.txt", "trace.json"])
def test_a_traced_range_of_steps_writes_the_loops_phases(
    model: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """STRATUS_STEP_TRACE over steps 2..5 of Verify rounds with the pipeline on: every step's phases, the verify
    groups' launches and replies and the packed passes inside them, as host times in order (the events form; no
    device here) or as torch.profiler's Chrome trace; the trace ends at the range's last step, and the loop runs on."""
    path = tmp_path / form
    monkeypatch.setenv("STRATUS_STEP_TRACE", str(path))
    monkeypatch.setenv("STRATUS_STEP_TRACE_STEPS", "2,4")
    got, running = run_callers(model, pipeline=True, n=4, rounds=6)
    running.stop()
    assert all(len(rounds) == 6 for rounds in got.values())
    data = json.loads(path.read_text())
    if form == "trace.json":
        names = [e["name"] for e in data["traceEvents"] if e.get("cat") == "user_annotation"]
        assert names.count("step") == 4 and "launch" in names and "pass" in names
        return
    phases = data["phases"]
    assert [p[0] for p in phases].count("step") == 4
    assert {"take", "gather", "emit", "launch", "reply", "open", "pass", "verdicts"} <= {p[0] for p in phases}
    for name, start, end, device_start, device_end in phases:
        assert 0 <= start <= end and device_start is None and device_end is None, name
    steps = [p for p in phases if p[0] == "step"]
    assert all(a[2] <= b[1] for a, b in itertools.pairwise(steps))  # one after the other
    for name, start, end, _, _ in phases:  # launches, replies and passes happen inside steps
        if name in ("launch", "reply", "pass", "open", "verdicts"):
            assert any(s[1] <= start and end <= s[2] for s in steps), name


def test_a_trace_started_once_is_not_restarted_by_an_idle_loop_at_its_first_step(tmp_path: Any) -> None:
    # An idle loop looks at its inbox again and again at the same step: the trace keeps what it recorded so far.
    path = tmp_path / "events.txt"
    trace = StepTrace(str(path), "3,2")
    mark = trace.marker()
    trace.before(2)
    with mark("take"):
        pass
    trace.before(3)
    with mark("take"):
        pass
    base = trace.base
    trace.before(3)
    with mark("step"):
        pass
    assert trace.base is base
    trace.after(3)
    assert not path.exists()
    trace.after(4)
    assert [p[0] for p in json.loads(path.read_text())["phases"]] == ["take", "step"]


def test_a_trace_started_by_a_file_covers_the_steps_after_it_appears(tmp_path: Any) -> None:
    # STRATUS_STEP_TRACE_STEPS=@PATH,COUNT: nothing is traced until PATH exists; then COUNT steps from the next.
    path, trigger = tmp_path / "events.txt", tmp_path / "go"
    trace = StepTrace(str(path), f"@{trigger},2")
    mark = trace.marker()
    for step in range(5):
        if step == 3:
            trigger.touch()
        trace.before(step)
        with mark("step"):
            pass
        trace.after(step)
        assert path.exists() == (step == 4)
    assert len(json.loads(path.read_text())["phases"]) == 2
    trace.before(5)  # written once: the file still there starts nothing again
    with mark("step"):
        pass
    assert trace.phases == []


@pytest.mark.parametrize("send_first", [True, False])
def test_a_joining_requests_first_token_goes_out_ahead_of_its_step(
    model: Any, monkeypatch: pytest.MonkeyPatch, send_first: bool
) -> None:
    # A request that arrives while another decodes: the loop sends its first token as a "part" of the step that
    # chose it, before that step's message (which carries the decoding row's token and not the first one again);
    # STRATUS_SEND_FIRST=0 sends everything with the step. The tokens are the same either way.
    monkeypatch.setenv("STRATUS_SEND_FIRST", "1" if send_first else "0")
    runner = build_runner(model, max_rows=3, max_len=MAX_LEN)
    core = EngineCore(runner, SpeculativeSessions(runner, frozenset(), first_row=2), frozenset(), max_batch_size=2)
    inbox = ThreadInbox()
    sent: list[tuple[str, StepOutput]] = []
    ended: set[int] = set()

    def emit(message: tuple[Any, ...]) -> None:
        out = StepOutput.unpack(message[1])
        sent.append((message[0], out))
        ended.update(f.seq_id for f in out.finished)
        if message[0] == "step" and len(sent) == 2:  # the first request decodes: the second arrives
            inbox.put(("add", 2, [9, 8, 7, 6], Sampling(max_new_tokens=6), None))
        if ended == {1, 2}:
            inbox.put(("stop",))

    loop = EngineLoop(core, emit)
    inbox.put(("add", 1, [3, 4, 5], Sampling(max_new_tokens=12), None))
    loop.run(inbox)
    tokens: dict[int, list[int]] = {}
    for _, out in sent:
        for seq_id, token in zip(out.seq_ids, out.tokens, strict=True):
            tokens.setdefault(seq_id, []).append(token)
    assert len(tokens[1]) == 12 and len(tokens[2]) == 6
    with torch.inference_mode():
        for seq_id, prompt in ((1, [3, 4, 5]), (2, [9, 8, 7, 6])):
            n = len(tokens[seq_id])
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert tokens[seq_id] == expected[0, len(prompt) :].tolist()
    parts = [n for n, (kind, _) in enumerate(sent) if kind == "part"]
    if not send_first:
        assert parts == []
        return
    assert len(parts) == 1
    n = parts[0]
    part, step = sent[n][1], sent[n + 1]
    assert part.seq_ids == [2] and step[0] == "step" and step[1].step == part.step and step[1].seq_ids == [1]
