"""Continuous batching: batched equals unbatched, requests join and leave mid-batch, cancellation frees rows,
and a loop that dies says so instead of leaving requests waiting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from stratus_workers.models import load_model
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.engine import Engine, FinishEvent, TokenEvent, build_engine, collect
from stratus_workers.serve.errors import EngineFailed, EngineOverloaded
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.sessions import SpeculativeSessions

pytestmark = pytest.mark.unit

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time in a land far away there lived", "1 2 3 4"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def make_engine(loaded: Any, **kwargs: Any) -> Engine:
    engine = build_engine(loaded.model, loaded.tokenizer, **{"max_len": 256, **kwargs})
    engine.start()
    return engine


def greedy_reference(loaded: Any, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt) :].tolist()


async def tokens_of(engine: Engine, prompt: list[int], params: Sampling) -> tuple[list[int], FinishEvent]:
    ids: list[int] = []
    async for event in engine.stream(prompt, params):
        if isinstance(event, TokenEvent):
            ids.extend(event.token_ids)
        else:
            return ids, event
    raise AssertionError("no finish event")


async def test_batched_greedy_equals_unbatched_and_reference(loaded: Any) -> None:
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    params = Sampling(max_new_tokens=12)
    single = make_engine(loaded, max_batch_size=1)
    batched = make_engine(loaded, max_batch_size=4)
    try:
        alone = [await tokens_of(single, p, params) for p in prompts]
        together = await asyncio.gather(*(tokens_of(batched, p, params) for p in prompts))
    finally:
        single.shutdown()
        batched.shutdown()
    for prompt, (ids_alone, fin_alone), (ids_together, _) in zip(prompts, alone, together, strict=True):
        assert ids_alone == ids_together
        if fin_alone.reason == "length":  # the reference cannot stop early on EOS with min_new_tokens
            assert ids_alone == greedy_reference(loaded, prompt, 12)


async def test_requests_join_and_leave_mid_batch(loaded: Any) -> None:
    engine = make_engine(loaded, max_batch_size=3)
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
        engine.shutdown()
    for (ids, fin), (ref_ids, ref_fin) in zip(results, expected, strict=True):
        assert ids == ref_ids
        assert fin.reason == ref_fin.reason
        assert fin.completion_tokens == len([t for t in ids if t not in engine._eos])


async def test_cancellation_frees_the_row(loaded: Any) -> None:
    engine = make_engine(loaded, max_batch_size=1)
    prompt = loaded.tokenizer.encode("cancel me")
    try:
        stream = engine.stream(prompt, Sampling(max_new_tokens=200))
        first = await stream.__anext__()
        assert isinstance(first, TokenEvent)
        await stream.aclose()  # the caller went away
        # The single row must come free for the next request.
        text, _, finish = await asyncio.wait_for(
            collect(engine.stream(prompt, Sampling(max_new_tokens=3))), timeout=30
        )
        assert finish.reason in ("length", "stop")
        deadline = time.monotonic() + 5
        while engine.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.active == 0 and engine.waiting == 0
    finally:
        engine.shutdown()


async def test_deadline_and_overload(loaded: Any) -> None:
    engine = make_engine(loaded, max_batch_size=1, max_queue=1)
    prompt = loaded.tokenizer.encode("deadline")
    try:
        _, _, finish = await collect(engine.stream(prompt, Sampling(max_new_tokens=200), time.monotonic()))
        assert finish.reason == "deadline"
        long_stream = engine.stream(prompt, Sampling(max_new_tokens=200))
        await long_stream.__anext__()  # occupies the only row
        queued = engine.submit(prompt, Sampling(max_new_tokens=1), lambda e: None)
        with pytest.raises(EngineOverloaded, match="already waiting"):
            engine.submit(prompt, Sampling(max_new_tokens=1), lambda e: None)
        # A cancelled request gives its place up at once, not when a row frees (the fuzzer found it held on).
        queued()
        late: list[object] = []
        engine.submit(prompt, Sampling(max_new_tokens=1), late.append, deadline=time.monotonic() + 0.05)
        assert engine.active == 1 and engine.waiting == 1 and not late  # queued behind the long one
        await asyncio.sleep(0.1)
        # So does a request whose deadline passed while it waited: it ends with its reason.
        last = engine.submit(prompt, Sampling(max_new_tokens=1), lambda e: None)
        assert [getattr(e, "reason", None) for e in late] == ["deadline"] and engine.waiting == 1
        last()
        await long_stream.aclose()
    finally:
        engine.shutdown()


async def test_stop_sequences_and_sampling_seed(loaded: Any) -> None:
    engine = make_engine(loaded, max_batch_size=2)
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
        engine.shutdown()


async def test_rows_move_after_the_cache_grew_past_its_first_size(loaded: Any) -> None:
    # Issue 12: a long prompt grows the module path's cache (256 tokens at first) inside the forward
    # pass; a later compaction then moved rows of that cache and killed the engine thread.
    engine = make_engine(loaded, max_batch_size=4, max_len=512)
    try:
        long_prompt = loaded.tokenizer.encode("word " * 300)
        _, _, first = await asyncio.wait_for(collect(engine.stream(long_prompt, Sampling(max_new_tokens=1))), 30)
        assert first.reason in ("length", "stop") and first.prompt_tokens > 256
        assert engine.runner.capacity > 256  # the cache grew
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
        engine.shutdown()


class EngineKilled(BaseException):
    """A fault the engine's per-step recovery (which catches Exception) does not handle: it ends the loop."""


class FaultyRunner(ModuleRunner):
    """The real module path, until `armed`: then every forward pass raises EngineKilled."""

    armed = False

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            raise EngineKilled("injected fault")
        return super()._forward(*args, **kwargs)


async def test_a_dead_loop_fails_every_request_fast_and_says_why(loaded: Any) -> None:
    runner = FaultyRunner(loaded.model, max_rows=2, max_len=256)
    failures: list[str] = []
    engine = Engine(
        runner,
        loaded.tokenizer,
        SpeculativeSessions(runner, loaded.tokenizer, first_row=1),
        max_batch_size=1,
        on_failure=failures.append,
    )
    engine.start()
    prompt = loaded.tokenizer.encode("Hello")
    try:
        _, _, healthy = await collect(engine.stream(prompt, Sampling(max_new_tokens=2)))
        assert healthy.reason == "length" and engine.failure is None
        running = engine.stream(prompt, Sampling(max_new_tokens=200))
        assert isinstance(await running.__anext__(), TokenEvent)
        waiting = asyncio.ensure_future(collect(engine.stream(prompt, Sampling(max_new_tokens=2))))
        while engine.waiting == 0:  # the only row is taken: the second request queues
            await asyncio.sleep(0.01)
        runner.armed = True
        started = time.monotonic()
        events = [event async for event in running]
        finish = events[-1]
        assert isinstance(finish, FinishEvent) and finish.reason == "unavailable"
        assert "EngineKilled: injected fault" in finish.error
        _, _, queued = await asyncio.wait_for(waiting, 5)
        assert queued.reason == "unavailable"
        assert time.monotonic() - started < 5
        assert engine.failure is not None and failures == [engine.failure]
        assert (engine.active, engine.waiting) == (0, 0)
        with pytest.raises(EngineFailed, match="injected fault"):
            engine.submit(prompt, Sampling(max_new_tokens=1), lambda event: None)
        with pytest.raises(EngineFailed, match="injected fault"):
            await engine.draft("s", prompt, 2, Sampling())
    finally:
        engine.shutdown()
