"""The llama.cpp runner: torch's logits on the same weights, row edits, batching, and the engine over it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from stratus_workers.models import load_model
from stratus_workers.models.gguf_artifact import GGUFModel
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.engine import AsyncEngine as Engine
from stratus_workers.serve.engine import build_engine
from stratus_workers.serve.llamacpp import LlamaCppRunner
from stratus_workers.serve.runner import ModelRunner
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.surface import TokenEvent

pytestmark = pytest.mark.unit

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time in a land far away there lived", "1 2 3 4"]


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def gguf(tiny_gguf_dir: Path) -> Any:
    return load_model(str(tiny_gguf_dir))


def _ids(loaded: Any, text: str) -> list[int]:
    return list(loaded.tokenizer.encode(text))


def test_loader_hands_a_gguf_artifact_to_llamacpp(gguf: Any, torch_model: Any) -> None:
    assert isinstance(gguf.model, GGUFModel) and gguf.model.file_type == "f32"
    assert str(gguf.device) == "cpu" and gguf.compression == "quantize:gguf-f32"
    # The same weights, the tied embedding once (torch's count adds the rotary frequency buffers).
    assert gguf.parameters == sum(p.numel() for p in torch_model.model.parameters())
    runner = build_runner(gguf.model, max_rows=2, max_len=64, threads=1)
    assert isinstance(runner, LlamaCppRunner) and runner.vocab_size == gguf.model.config.vocab_size
    assert isinstance(build_runner(torch_model.model, max_rows=2, max_len=64), ModelRunner)


def test_logits_match_torch_on_the_same_weights(gguf: Any, torch_model: Any) -> None:
    ours = LlamaCppRunner(gguf.model, max_rows=4, max_len=128, threads=1)
    theirs = ModuleRunner(torch_model.model, max_rows=4, max_len=128)
    prompts = [_ids(gguf, p) for p in PROMPTS]
    # Prefill of four rows of different lengths, every position's logits.
    a = ours.forward(0, prompts, all_logits=True)
    b = theirs.forward(0, prompts, all_logits=True)
    for i, prompt in enumerate(prompts):
        assert torch.allclose(a[i, : len(prompt)], b[i, : len(prompt)], atol=2e-3, rtol=1e-3)
        assert not a[i, len(prompt) :].any()  # padding past a short row
    # Then decode steps on all rows at once, each at its own position.
    last = torch.stack([b[i, len(p) - 1] for i, p in enumerate(prompts)])
    for _ in range(6):
        step = [[int(t)] for t in torch.argmax(last, dim=-1)]
        a, last = ours.forward(0, step), theirs.forward(0, step)
        assert torch.allclose(a, last, atol=2e-3, rtol=1e-3)
    assert ours.lengths[:4] == [len(p) + 6 for p in prompts]


def test_truncate_move_and_reset_edit_one_row(gguf: Any) -> None:
    runner = LlamaCppRunner(gguf.model, max_rows=3, max_len=64, threads=1)
    prompt = _ids(gguf, PROMPTS[2])
    fresh = runner.forward(0, [prompt], all_logits=True)[0]
    # Roll row 0 back and feed the same tail again: the same logits as the first time.
    runner.truncate(0, 4)
    again = runner.forward(0, [prompt[4:]], all_logits=True)[0]
    assert torch.allclose(again, fresh[4:], atol=1e-4)
    # Move row 0 into row 2: row 2 continues where row 0 was, and row 0 is empty.
    after = runner.forward(0, [[7]])
    runner.truncate(0, len(prompt))
    runner.move(0, 2)
    assert (runner.lengths[0], runner.lengths[2]) == (0, len(prompt))
    assert torch.allclose(runner.forward(2, [[7]]), after, atol=1e-4)
    runner.reset(2)
    assert runner.lengths[2] == 0
    assert torch.allclose(runner.forward(2, [prompt], all_logits=True)[0], fresh, atol=1e-4)
    # The compute counters the server exports: five forward passes so far, over these positions.
    assert runner.passes == 5
    assert runner.positions == len(prompt) + (len(prompt) - 4) + 1 + 1 + len(prompt)


def test_long_prefill_runs_in_chunks(gguf: Any) -> None:
    small = LlamaCppRunner(gguf.model, max_rows=2, max_len=256, threads=1, batch_tokens=16)
    large = LlamaCppRunner(gguf.model, max_rows=2, max_len=256, threads=1)
    prompts = [_ids(gguf, "word " * 30), _ids(gguf, PROMPTS[0])]
    assert torch.allclose(small.forward(0, prompts), large.forward(0, prompts), atol=1e-4)
    assert torch.allclose(
        small.forward(0, prompts, all_logits=True), large.forward(0, prompts, all_logits=True), atol=1e-4
    )


@pytest.mark.parametrize(
    ("first_row", "tokens", "message"),
    [
        (0, [], "at least one row"),
        (0, [[1], []], "at least one new token"),
        (0, [[1], [49152]], "token ids must be within"),
        (0, [[-1]], "token ids must be within"),
        (1, [[1], [2]], "outside 0..1"),
        (0, [list(range(1, 40))], "exceeds the cache limit of 32"),
    ],
)
def test_bad_calls_are_refused_and_change_nothing(
    gguf: Any, first_row: int, tokens: list[list[int]], message: str
) -> None:
    runner = LlamaCppRunner(gguf.model, max_rows=2, max_len=32, threads=1)
    runner.forward(0, [[5, 6]])
    with pytest.raises(ValueError, match=message):
        runner.forward(first_row, tokens)
    assert runner.lengths == [2, 0]
    with pytest.raises(ValueError, match="cannot truncate"):
        runner.truncate(0, 3)


async def test_engine_batches_greedy_identically_on_llamacpp(gguf: Any) -> None:
    async def engine(batch: int) -> Engine:
        made = build_engine(gguf.model, gguf.tokenizer, max_batch_size=batch, max_len=128, max_sessions=1, threads=1)
        await made.start()
        assert made.info.runner == "LlamaCppRunner" and made.info.prefix_cache_tokens == 0
        return made

    async def tokens(made: Engine, prompt: list[int]) -> list[int]:
        ids: list[int] = []
        async for event in made.stream(prompt, Sampling(max_new_tokens=10)):
            if isinstance(event, TokenEvent):
                ids.extend(event.token_ids)
        return ids

    single, batched = await engine(1), await engine(4)
    try:
        prompts = [_ids(gguf, p) for p in PROMPTS]
        alone = [await tokens(single, p) for p in prompts]
        together = await asyncio.gather(*(tokens(batched, p) for p in prompts))
    finally:
        await single.stop()
        await batched.stop()
    assert alone == list(together) and all(alone)


def test_decode_step_is_a_one_token_forward(gguf: Any) -> None:
    """The engine core's decode call: every row's greedy token and its log-probability from one llama.cpp step."""
    stepped = LlamaCppRunner(gguf.model, max_rows=2, max_len=64, threads=1)
    plain = LlamaCppRunner(gguf.model, max_rows=2, max_len=64, threads=1)
    prompts = [_ids(gguf, PROMPTS[0]), _ids(gguf, PROMPTS[1])]
    stepped.forward(0, prompts)
    plain.forward(0, prompts)
    result = stepped.decode([5, 9], logprobs=True)
    logits = plain.forward(0, [[5], [9]])
    assert torch.allclose(result.logits, logits, atol=1e-5)
    assert result.greedy == logits.argmax(dim=-1).tolist()
    expected = torch.log_softmax(logits, dim=-1).gather(1, logits.argmax(dim=-1)[:, None])[:, 0]
    assert result.greedy_logprobs == pytest.approx(expected.tolist(), abs=1e-5)
    assert stepped.lengths == [len(prompts[0]) + 1, len(prompts[1]) + 1]
    with pytest.raises(ValueError, match="does not fit"):
        stepped.decode([1, 2, 3])


def test_logits_from_scores_only_the_later_new_tokens(gguf: Any) -> None:
    prompts = [_ids(gguf, p) for p in PROMPTS[:2]]
    whole = LlamaCppRunner(gguf.model, max_rows=2, max_len=128, threads=1).forward(0, prompts, all_logits=True)
    skip = min(len(p) for p in prompts) - 1
    scored = LlamaCppRunner(gguf.model, max_rows=2, max_len=128, threads=1).forward(
        0, prompts, all_logits=True, logits_from=skip
    )
    assert scored.shape == (2, whole.shape[1] - skip, whole.shape[2])
    assert torch.allclose(scored, whole[:, skip:], atol=1e-5)
