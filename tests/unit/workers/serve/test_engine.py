"""The frontend's engine over its core, in a thread and in a process of its own: batched equals unbatched,
requests join and leave mid-batch, cancellation frees rows, and an engine that dies says so instead of
leaving requests waiting."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import stratus_workers
from stratus_workers.models import load_model
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.channel import Channel
from stratus_workers.serve.core import EngineCore, EngineStats
from stratus_workers.serve.engine import (
    AsyncEngine,
    ProcessTransport,
    ThreadTransport,
    build_engine,
    engine_process_env,
)
from stratus_workers.serve.errors import EngineFailed, EngineOverloaded
from stratus_workers.serve.loop import EngineSettings
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.sampling import eos_ids
from stratus_workers.serve.sessions import SpeculativeSessions
from stratus_workers.serve.surface import EngineInfo, FinishEvent, TokenEvent, collect

pytestmark = pytest.mark.unit

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time in a land far away there lived", "1 2 3 4"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


async def started(loaded: Any, **kwargs: Any) -> AsyncEngine:
    engine = build_engine(loaded.model, loaded.tokenizer, **{"max_len": 256, **kwargs})
    await engine.start()
    return engine


async def in_process(tiny_model_dir: Path, *, max_batch_size: int, **kwargs: Any) -> AsyncEngine:
    """The engine loop in a process of its own, loading the tiny model there."""
    settings = EngineSettings(max_batch_size=max_batch_size, max_tokens=256, threads=1, log_format="text",
                              **kwargs)  # fmt: skip
    load = functools.partial(load_model, str(tiny_model_dir), dtype="float32", device="cpu")
    engine = AsyncEngine(ProcessTransport(settings, load), max_batch_size=max_batch_size)
    await engine.start()
    return engine


def runner_of(engine: AsyncEngine) -> Any:
    assert isinstance(engine.transport, ThreadTransport) and engine.transport.core is not None
    return engine.transport.core.runner


def greedy_reference(loaded: Any, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt) :].tolist()


async def tokens_of(engine: AsyncEngine, prompt: list[int], params: Sampling) -> tuple[list[int], FinishEvent]:
    ids: list[int] = []
    async for event in engine.stream(prompt, params):
        if isinstance(event, TokenEvent):
            ids.extend(event.token_ids)
        else:
            return ids, event
    raise AssertionError("no finish event")


def assert_reference(loaded: Any, prompt: list[int], ids: list[int], finish: FinishEvent, n: int) -> None:
    reference = greedy_reference(loaded, prompt, n)
    if finish.reason == "length":  # the reference cannot stop early on EOS with min_new_tokens
        assert ids == reference
    else:
        assert finish.reason == "stop" and ids == reference[: len(ids)]


async def test_batched_greedy_equals_unbatched_and_reference(loaded: Any) -> None:
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    params = Sampling(max_new_tokens=12)
    single = await started(loaded, max_batch_size=1)
    batched = await started(loaded, max_batch_size=4)
    try:
        alone = [await tokens_of(single, p, params) for p in prompts]
        together = await asyncio.gather(*(tokens_of(batched, p, params) for p in prompts))
    finally:
        await single.stop()
        await batched.stop()
    for prompt, (ids_alone, fin_alone), (ids_together, _) in zip(prompts, alone, together, strict=True):
        assert ids_alone == ids_together
        assert_reference(loaded, prompt, ids_alone, fin_alone, 12)


async def test_the_process_layout_answers_like_the_reference(loaded: Any, tiny_model_dir: Path) -> None:
    """The same traffic through an engine process: tokens, text, log-probabilities and a speculative call."""
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    engine = await in_process(tiny_model_dir, max_batch_size=3)
    thread = await started(loaded, max_batch_size=3)
    try:
        assert engine.mode == "process" and engine.pid > 0 and engine.pid != os.getpid()
        # It runs the frontend's copy of the code: the folder this process imported it from comes first on its path.
        first = process_env(engine.pid)["PYTHONPATH"].split(os.pathsep)[0]
        assert first == str(Path(stratus_workers.__file__).parents[1])
        assert engine.info.vocab_size == loaded.model.config.vocab_size and engine.info.runner == "ModuleRunner"
        together = await asyncio.gather(
            *(tokens_of(engine, p, Sampling(max_new_tokens=n)) for p, n in zip(prompts, (12, 5, 12, 9), strict=True))
        )
        for prompt, (ids, finish), n in zip(prompts, together, (12, 5, 12, 9), strict=True):
            assert_reference(loaded, prompt, ids, finish, n)
        text, logprobs, finish = await collect(engine.stream(prompts[0], Sampling(max_new_tokens=6, logprobs=True)))
        same_text, same_logprobs, _ = await collect(
            thread.stream(prompts[0], Sampling(max_new_tokens=6, logprobs=True))
        )
        assert text == same_text and len(logprobs) == finish.completion_tokens == 6
        assert [lp.token_id for lp in logprobs] == [lp.token_id for lp in same_logprobs]
        assert [lp.logprob for lp in logprobs] == pytest.approx([lp.logprob for lp in same_logprobs], abs=1e-4)
        assert await engine.score(prompts[0], prompts[1]) == pytest.approx(await thread.score(prompts[0], prompts[1]))
        assert engine.steps > 0 and (engine.active, engine.waiting) == (0, 0)
    finally:
        await engine.stop()
        await thread.stop()
    assert engine.transport.check() is None  # a stop is not a death


async def test_requests_join_and_leave_mid_batch(loaded: Any) -> None:
    seen: list[EngineStats] = []  # a joining request's first token comes ahead of its step, without stats of its own
    engine = await started(loaded, max_batch_size=3, on_stats=seen.append)
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    lengths = [3, 20, 7, 15]
    try:
        expected = []
        for p, n in zip(prompts, lengths, strict=True):
            expected.append(await tokens_of(engine, p, Sampling(max_new_tokens=n)))

        async def late(i: int) -> tuple[list[int], FinishEvent]:
            await asyncio.sleep(0.02 * i)  # arrive while others are decoding
            return await tokens_of(engine, prompts[i], Sampling(max_new_tokens=lengths[i]))

        results = await asyncio.gather(*(late(i) for i in range(len(prompts))))
        assert engine.steps > 0
    finally:
        await engine.stop()
    steps = [stats.steps for stats in seen]
    assert steps and min(steps) > 0 and steps == sorted(steps)
    eos = eos_ids(loaded.model, loaded.tokenizer)
    for (ids, fin), (ref_ids, ref_fin) in zip(results, expected, strict=True):
        assert ids == ref_ids
        assert fin.reason == ref_fin.reason
        assert fin.completion_tokens == len([t for t in ids if t not in eos])


async def test_prefix_cache_and_chunked_prefill_give_the_greedy_tokens_of_neither(loaded: Any) -> None:
    """Shared system prompts served from the prefix cache, prefilled 7 tokens a step: the same tokens as
    an engine with no cache and whole prefills, and as Hugging Face's own generate()."""
    system = loaded.tokenizer.encode("You are a careful assistant who answers briefly. " * 6)
    turns = [loaded.tokenizer.encode(f" User question number {i}: what is {i} plus {i}?") for i in range(5)]
    prompts = [system + turn for turn in turns]
    plain = await started(loaded, max_batch_size=2, prefix_cache_tokens=0)
    cached = await started(loaded, max_batch_size=2, prefix_cache_tokens=512, prefill_chunk=7)
    try:
        expected = [await tokens_of(plain, p, Sampling(max_new_tokens=8)) for p in prompts]
        first = await tokens_of(cached, prompts[0], Sampling(max_new_tokens=8))
        rest = await asyncio.gather(*(tokens_of(cached, p, Sampling(max_new_tokens=8)) for p in prompts[1:]))
        again = await tokens_of(cached, prompts[0], Sampling(max_new_tokens=8))  # its own answer is cached too
    finally:
        await plain.stop()
        await cached.stop()
    got = [first, *rest]
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    assert again[0] == expected[0][0]
    for prompt, (ids, finish) in zip(prompts, expected, strict=True):
        assert_reference(loaded, prompt, ids, finish, 8)
    block = 16
    assert first[1].cached_tokens == 0
    assert all(finish.cached_tokens == len(system) // block * block for _, finish in rest)
    assert again[1].cached_tokens == (len(prompts[0]) - 1) // block * block
    stats = cached.stats
    assert stats.prefix_hit_tokens == sum(f.cached_tokens for _, f in [*rest, again])
    assert stats.prefill_tokens == sum(len(p) for p in prompts) + len(prompts[0]) - stats.prefix_hit_tokens


async def test_cancellation_frees_the_row(loaded: Any) -> None:
    engine = await started(loaded, max_batch_size=1)
    prompt = loaded.tokenizer.encode("cancel me")
    try:
        stream = engine.stream(prompt, Sampling(max_new_tokens=200))
        first = await stream.__anext__()
        assert isinstance(first, TokenEvent)
        await stream.aclose()  # the caller went away
        # The single row must come free for the next request.
        text, _, finish = await asyncio.wait_for(collect(engine.stream(prompt, Sampling(max_new_tokens=3))), timeout=30)
        assert finish.reason in ("length", "stop")
        deadline = time.monotonic() + 5
        while engine.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.active == 0 and engine.waiting == 0
    finally:
        await engine.stop()


async def test_deadline_and_overload(loaded: Any) -> None:
    engine = await started(loaded, max_batch_size=1, max_queue=1)
    prompt = loaded.tokenizer.encode("deadline")
    try:
        _, _, finish = await collect(engine.stream(prompt, Sampling(max_new_tokens=200), time.monotonic()))
        assert finish.reason == "deadline"
        long_stream = engine.stream(prompt, Sampling(max_new_tokens=200))
        await long_stream.__anext__()  # occupies the only row
        queued = engine.stream(prompt, Sampling(max_new_tokens=1))
        waiting = asyncio.ensure_future(queued.__anext__())
        while engine.waiting == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloaded, match="already waiting"):
            await engine.stream(prompt, Sampling(max_new_tokens=1)).__anext__()
        # A cancelled request gives its place up at once, not when a row frees (the fuzzer found it held on).
        waiting.cancel()  # the caller of the queued request goes away
        await asyncio.gather(waiting, return_exceptions=True)
        late = engine.stream(prompt, Sampling(max_new_tokens=1), time.monotonic() + 0.05)
        late_first = asyncio.ensure_future(late.__anext__())
        while engine.waiting == 0:
            await asyncio.sleep(0.01)
        assert engine.active == 1 and not late_first.done()  # queued behind the long one
        await asyncio.sleep(0.1)
        # So does a request whose deadline passed while it waited: it ends with its reason.
        last = engine.stream(prompt, Sampling(max_new_tokens=1))
        last_first = asyncio.ensure_future(last.__anext__())
        finished = await asyncio.wait_for(late_first, 5)
        assert isinstance(finished, FinishEvent) and finished.reason == "deadline"
        while engine.waiting == 0:
            await asyncio.sleep(0.01)
        assert engine.waiting == 1
        last_first.cancel()
        await asyncio.gather(last_first, return_exceptions=True)
        await long_stream.aclose()
    finally:
        await engine.stop()


async def test_stop_sequences_and_sampling_seed(loaded: Any) -> None:
    engine = await started(loaded, max_batch_size=2)
    prompt = loaded.tokenizer.encode("Hello")
    try:
        free_text, _, _ = await collect(engine.stream(prompt, Sampling(max_new_tokens=16)))
        assert len(free_text) >= 3
        stop = free_text[1:3]  # whatever the random model wrote, even whitespace, is a valid stop sequence
        text, _, finish = await collect(engine.stream(prompt, Sampling(max_new_tokens=16, stop=(stop,))))
        assert finish.reason == "stop"
        assert text == free_text[: free_text.find(stop)]
        sampled = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
        first = await tokens_of(engine, prompt, sampled)
        second = await tokens_of(engine, prompt, sampled)
        assert first[0] == second[0]
    finally:
        await engine.stop()


async def test_rows_move_after_the_cache_grew_past_its_first_size(loaded: Any) -> None:
    # Issue 12: a long prompt grows the module path's cache (256 tokens at first) inside the forward
    # pass; a later compaction then moved rows of that cache and killed the engine thread.
    engine = await started(loaded, max_batch_size=4, max_len=512)
    try:
        long_prompt = loaded.tokenizer.encode("word " * 300)
        _, _, first = await asyncio.wait_for(collect(engine.stream(long_prompt, Sampling(max_new_tokens=1))), 30)
        assert first.reason in ("length", "stop") and first.prompt_tokens > 256
        assert runner_of(engine).capacity > 256  # the cache grew
        prompts = [loaded.tokenizer.encode(p) for p in PROMPTS[:3]]
        # Overlapping: the middle one finishes first, so the last row moves into its place.
        params = [Sampling(max_new_tokens=n) for n in (40, 2, 40)]
        together = await asyncio.wait_for(
            asyncio.gather(*(tokens_of(engine, p, sp) for p, sp in zip(prompts, params, strict=True))), 30
        )
        assert [fin.reason for _, fin in together] == ["length"] * 3
        _, _, after = await asyncio.wait_for(collect(engine.stream(prompts[0], Sampling(max_new_tokens=3))), 30)
        assert after.reason == "length" and after.completion_tokens == 3
    finally:
        await engine.stop()


class EngineKilled(BaseException):
    """A fault the engine's per-step recovery (which catches Exception) does not handle: it ends the loop."""


class FaultyRunner(ModuleRunner):
    """The real module path, until `armed`: then every forward pass raises EngineKilled."""

    armed = False

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            raise EngineKilled("injected fault")
        return super()._forward(*args, **kwargs)


class BlockingRunner(ModuleRunner):
    """The real module path, until `armed`: then a forward pass waits for `release` (a step that never returns,
    as a kernel or a collective that hangs)."""

    armed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.release.wait(30)
        return super()._forward(*args, **kwargs)


class LostCore(EngineCore):
    """The real core, until `armed`: then it reports no work while requests wait (a scheduler that lost track
    of its queue). Its loop stays alive and idles between steps; nothing is raised and no step hangs."""

    armed = False

    @property
    def busy(self) -> bool:
        return not self.armed and super().busy


async def assert_dead_engine_fails_fast(
    engine: AsyncEngine, prompt: list[int], kill: Any, failures: list[str], fragment: str
) -> None:
    _, _, healthy = await collect(engine.stream(prompt, Sampling(max_new_tokens=2)))
    assert healthy.reason == "length" and engine.failure is None
    running = engine.stream(prompt, Sampling(max_new_tokens=200))
    assert isinstance(await running.__anext__(), TokenEvent)
    waiting = asyncio.ensure_future(collect(engine.stream(prompt, Sampling(max_new_tokens=2))))
    while engine.waiting == 0:  # the only row is taken: the second request queues
        await asyncio.sleep(0.01)
    kill()
    started = time.monotonic()
    events = [event async for event in running]
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.reason == "unavailable"
    assert fragment in finish.error
    _, _, queued = await asyncio.wait_for(waiting, 5)
    assert queued.reason == "unavailable"
    assert time.monotonic() - started < 2
    assert engine.failure is not None and failures == [engine.failure]
    with pytest.raises(EngineFailed, match=fragment):
        await engine.stream(prompt, Sampling(max_new_tokens=1)).__anext__()
    with pytest.raises(EngineFailed, match=fragment):
        await engine.draft("s", prompt, 2, Sampling())


async def test_a_dead_loop_fails_every_request_fast_and_says_why(loaded: Any) -> None:
    runner = FaultyRunner(loaded.model, max_rows=2, max_len=256)
    eos = eos_ids(loaded.model, loaded.tokenizer)
    sessions = SpeculativeSessions(runner, eos, first_row=1)
    core = EngineCore(runner, sessions, eos, max_batch_size=1, verify_pipeline=False)
    info = EngineInfo("tiny", "memory", "float32", "cpu", 0, "", 256, runner.vocab_size)
    failures: list[str] = []
    transport = ThreadTransport(EngineSettings(max_batch_size=1), core=(core, info, loaded.tokenizer))
    engine = AsyncEngine(transport, max_batch_size=1, on_failure=failures.append)
    await engine.start()

    def arm() -> None:
        runner.armed = True

    try:
        await assert_dead_engine_fails_fast(engine, loaded.tokenizer.encode("Hello"), arm, failures,
                                            "EngineKilled: injected fault")  # fmt: skip
    finally:
        await engine.stop()


async def test_a_loop_stuck_inside_a_step_fails_every_request_after_the_step_timeout(loaded: Any) -> None:
    runner = BlockingRunner(loaded.model, max_rows=2, max_len=256)
    eos = eos_ids(loaded.model, loaded.tokenizer)
    sessions = SpeculativeSessions(runner, eos, first_row=1)
    core = EngineCore(runner, sessions, eos, max_batch_size=1, verify_pipeline=False)
    info = EngineInfo("tiny", "memory", "float32", "cpu", 0, "", 256, runner.vocab_size)
    failures: list[str] = []
    transport = ThreadTransport(EngineSettings(max_batch_size=1), core=(core, info, loaded.tokenizer), step_timeout=1.0)
    engine = AsyncEngine(transport, max_batch_size=1, on_failure=failures.append)
    await engine.start()

    def arm() -> None:
        runner.armed = True

    try:
        prompt = loaded.tokenizer.encode("Hello")
        fails = assert_dead_engine_fails_fast(engine, prompt, arm, failures, "inside one step for over 1 s")
        await asyncio.wait_for(fails, 20)
    finally:
        runner.release.set()
        await engine.stop()


async def test_a_live_loop_that_stops_stepping_with_work_queued_fails_every_request(loaded: Any) -> None:
    """Alive, not inside a step, not raising: only the step outputs that stop coming show it (issue 12)."""
    runner = ModuleRunner(loaded.model, max_rows=2, max_len=256)
    eos = eos_ids(loaded.model, loaded.tokenizer)
    core = LostCore(runner, SpeculativeSessions(runner, eos, first_row=1), eos, max_batch_size=1)
    info = EngineInfo("tiny", "memory", "float32", "cpu", 0, "", 256, runner.vocab_size)
    failures: list[str] = []
    transport = ThreadTransport(EngineSettings(max_batch_size=1), core=(core, info, loaded.tokenizer), step_timeout=1.0)
    engine = AsyncEngine(transport, max_batch_size=1, on_failure=failures.append, stall_timeout=1.0)
    await engine.start()
    idle = time.monotonic()
    await asyncio.sleep(1.5)  # nothing owed: an idle engine that takes no steps is healthy
    assert engine.failure is None and time.monotonic() - idle > 1.0

    def arm() -> None:
        core.armed = True

    try:
        prompt = loaded.tokenizer.encode("Hello")
        fails = assert_dead_engine_fails_fast(engine, prompt, arm, failures, "not advancing: no step in")
        await asyncio.wait_for(fails, 20)
        assert transport.check() is None  # the thread is alive and not inside a step: only progress says
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("sig", "fragment"), [(signal.SIGKILL, "killed by SIGKILL"), (signal.SIGSTOP, "stopped responding")]
)
async def test_a_killed_or_frozen_engine_process_fails_every_request_fast(
    loaded: Any, tiny_model_dir: Path, sig: signal.Signals, fragment: str
) -> None:
    """SIGKILL: the process is gone. SIGSTOP: it is there but its loop no longer advances (a hang)."""
    engine = await in_process(tiny_model_dir, max_batch_size=1)
    failures: list[str] = []
    engine.on_failure = failures.append
    pid = engine.pid
    assert isinstance(engine.transport, ProcessTransport) and engine.transport.proc is not None
    try:
        await assert_dead_engine_fails_fast(engine, loaded.tokenizer.encode("Hello"), lambda: os.kill(pid, sig),
                                            failures, fragment)  # fmt: skip
        # A frozen engine is killed too, so that it holds no device when the pod restarts.
        assert engine.transport.proc.wait(5) == -signal.SIGKILL
    finally:
        await engine.stop()


async def test_an_engine_process_whose_frontend_goes_away_stops_without_an_error(tiny_model_dir: Path) -> None:
    # A frontend that exits without sending stop (killed, or a benchmark's process ending first) leaves the engine
    # nobody to answer: its loop stops as on a stop, and the process exits with status 0, not as a dead loop's 1.
    engine = await in_process(tiny_model_dir, max_batch_size=1)
    assert isinstance(engine.transport, ProcessTransport) and engine.transport.proc is not None
    assert engine.transport.channel is not None
    proc = engine.transport.proc
    try:
        engine.transport.channel.sock.shutdown(socket.SHUT_RDWR)  # the frontend's end goes away, no stop sent
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30) == 0
    finally:
        await engine.stop()


async def test_streams_are_paced_to_the_frontends_message_rate(loaded: Any) -> None:
    # Many streams at a step a millisecond would be more messages than one process can send: each stream's
    # events are spaced by (streams / message_rate), carrying every token since the last; the first token and
    # the end still go out at once, and the tokens are those of an unpaced engine.
    prompts = [loaded.tokenizer.encode(p) for p in ("The quick brown fox", "Hello", "Once upon a time", "1 2 3 4")]
    params = Sampling(max_new_tokens=24)
    free = await started(loaded, max_batch_size=4)
    free.message_rate = 0.0
    try:
        unpaced = await asyncio.gather(*(tokens_of(free, p, params) for p in prompts))
    finally:
        await free.stop()
    paced = await started(loaded, max_batch_size=4)
    paced.message_rate = 50.0  # 4 streams: an event per stream every 80 ms at most

    async def events_of(prompt: list[int]) -> tuple[list[int], list[float], FinishEvent]:
        ids: list[int] = []
        times: list[float] = []
        async for event in paced.stream(prompt, params):
            if isinstance(event, TokenEvent):
                ids.extend(event.token_ids)
                times.append(time.monotonic())
            else:
                return ids, times, event
        raise AssertionError("no finish event")

    try:
        results = await asyncio.gather(*(events_of(p) for p in prompts))
    finally:
        await paced.stop()
    for (ids, times, finish), (expected, _) in zip(results, unpaced, strict=True):
        assert ids == expected and finish.reason == "length"
        assert len(times) < len(ids)  # several tokens an event
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= 0.08 * 0.9 for gap in gaps[:-1])  # the pace holds (the end flushes what is left at once)


async def test_what_one_turn_of_the_event_loop_sends_reaches_the_engine_in_one_read() -> None:
    """Corked sends: a step's replies wake every session in one turn, and their next calls must reach the engine
    together (one read there), not one wake-up each; order kept, and nothing lost once the turn ends."""
    ours, theirs = socket.socketpair()
    transport = ProcessTransport(EngineSettings(max_batch_size=1), functools.partial(int))
    transport.channel, transport._loop = Channel(ours), asyncio.get_running_loop()
    engine_end = Channel(theirs)
    try:
        for i in range(64):
            transport.send(("call", i, "verify", ([1] * 600, [2] * 8)))
        assert engine_end.receive() == []  # nothing written while the turn is still queueing
        await asyncio.sleep(0)
        got = engine_end.receive()
        assert [m[1] for m in got] == list(range(64))
        transport.send(("abort", 7))
        await asyncio.sleep(0)
        assert engine_end.receive() == [("abort", 7)]
    finally:
        transport.channel.close()
        engine_end.close()


def process_env(pid: int) -> dict[str, str]:
    """A process's environment as Linux shows it."""
    items = Path(f"/proc/{pid}/environ").read_text().split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def test_the_engine_process_finds_the_frontends_copy_of_the_code_first(monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(Path(stratus_workers.__file__).parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/elsewhere/a", root, "/elsewhere/b"]))
    assert engine_process_env()["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere/a", "/elsewhere/b"]
    monkeypatch.delenv("PYTHONPATH")
    env = engine_process_env()
    assert env["PYTHONPATH"] == root and env["PATH"] == os.environ["PATH"]  # the rest as it is
