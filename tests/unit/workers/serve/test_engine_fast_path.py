"""The engine over the runner's CUDA path (fused weights, bucketed static decode), run on the CPU.

test_engine.py covers continuous batching over the module path; here the same traffic goes
through the path the GPU takes (padded batch buckets, device-side row lengths, compaction moves),
and every answer must equal the module path's answer to the same request served alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from stratus_workers.models import load_model
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.engine import AsyncEngine, build_engine
from stratus_workers.serve.runner.fused import FusedRunner
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.surface import FinishEvent, TokenEvent

pytestmark = pytest.mark.unit

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time in a land far away there lived", "1 2 3 4", "Why"]
LENGTHS = [3, 20, 7, 15, 11]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


async def run(engine: AsyncEngine, prompt: list[int], n: int, delay: float = 0.0) -> tuple[list[int], str]:
    await asyncio.sleep(delay)
    ids: list[int] = []
    async for event in engine.stream(prompt, Sampling(max_new_tokens=n)):
        if isinstance(event, TokenEvent):
            ids.extend(event.token_ids)
        elif isinstance(event, FinishEvent):
            return ids, event.reason
    raise AssertionError("no finish event")


def runner_of(engine: AsyncEngine) -> Any:
    core = getattr(engine.transport, "core", None)
    assert core is not None, "the engine runs in a thread of this process"
    return core.runner


@pytest.mark.parametrize(("ahead", "prefill"), [("0", "eager"), ("1", "eager"), ("1", "packed")])
async def test_joining_and_leaving_on_the_fast_path(
    loaded: Any, monkeypatch: pytest.MonkeyPatch, ahead: str, prefill: str
) -> None:
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    alone = build_engine(loaded.model, loaded.tokenizer, max_batch_size=1, max_len=128, prefix_cache_tokens=0)
    await alone.start()
    assert isinstance(runner_of(alone), ModuleRunner)
    try:
        expected = [await run(alone, p, n) for p, n in zip(prompts, LENGTHS, strict=True)]
    finally:
        await alone.stop()
    monkeypatch.setenv("STRATUS_FAST_PATH", "1")
    monkeypatch.setenv("STRATUS_DECODE_AHEAD", ahead)  # 1: each step starts on the last one's argmax
    # packed: as verification packs its tokens (CUDA's prefill), here with torch's attention.
    monkeypatch.setenv("STRATUS_PACKED_PREFILL", str(int(prefill == "packed")))
    engine = build_engine(loaded.model, loaded.tokenizer, max_batch_size=3, max_len=128)
    await engine.start()
    runner = runner_of(engine)
    assert isinstance(runner, FusedRunner) and runner.decoder.decode_ahead == (ahead == "1")
    assert runner.packed_prefill == (prefill == "packed")
    try:
        # Five requests over three rows, arriving while others decode: rows fill, drain and refill.
        together = await asyncio.gather(
            *(run(engine, p, n, 0.01 * i) for i, (p, n) in enumerate(zip(prompts, LENGTHS, strict=True)))
        )
        # A cancelled request frees its row for the next one.
        stream = engine.stream(prompts[0], Sampling(max_new_tokens=100))
        await stream.__anext__()
        await stream.aclose()
        after = await asyncio.wait_for(run(engine, prompts[1], LENGTHS[1]), 30)
    finally:
        await engine.stop()
    assert together == expected
    assert after == expected[1]
    if ahead == "1":
        assert runner.decoder.ahead_hits > 0
