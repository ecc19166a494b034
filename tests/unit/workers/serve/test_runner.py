"""The runner's per-row KV cache gives the same logits as a plain Hugging Face forward pass."""

from __future__ import annotations

import pytest
import torch

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.serve.runner import ModelRunner, UnsupportedModelError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_llama(dict(TINY), vocab_size=512, init_std=0.2, seed=1)


def reference(model: torch.nn.Module, ids: list[int], last: int = 1) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -last:]


def test_batched_prefill_and_decode_match_reference(model: torch.nn.Module) -> None:
    runner = ModelRunner(model, max_rows=3, max_len=64, initial_len=4)
    a, b, c = [5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102]
    logits = runner.forward(0, [a, b, c])
    for row, ids in enumerate((a, b, c)):
        torch.testing.assert_close(logits[row], reference(model, ids)[0], atol=1e-4, rtol=1e-4)
    logits = runner.forward(0, [[12], [13], [14]])
    for row, ids in enumerate((a + [12], b + [13], c + [14])):
        torch.testing.assert_close(logits[row], reference(model, ids)[0], atol=1e-4, rtol=1e-4)
    assert runner.lengths == [8, 3, 4]
    assert runner.capacity >= 8  # grew from 4 without losing anything


def test_extend_truncate_and_move(model: torch.nn.Module) -> None:
    runner = ModelRunner(model, max_rows=2, max_len=64)
    runner.forward(0, [[1, 2, 3], [4, 5]])
    every = runner.forward(1, [[6, 7, 8]], all_logits=True)
    torch.testing.assert_close(every[0], reference(model, [4, 5, 6, 7, 8], last=3), atol=1e-4, rtol=1e-4)
    runner.truncate(1, 3)  # drop 7, 8 as a rejected draft would be
    torch.testing.assert_close(runner.forward(1, [[9]])[0], reference(model, [4, 5, 6, 9])[0], atol=1e-4, rtol=1e-4)
    runner.move(1, 0)
    assert runner.lengths == [4, 0]
    torch.testing.assert_close(
        runner.forward(0, [[10]])[0], reference(model, [4, 5, 6, 9, 10])[0], atol=1e-4, rtol=1e-4
    )


def test_limits_are_enforced(model: torch.nn.Module) -> None:
    runner = ModelRunner(model, max_rows=1, max_len=8)
    with pytest.raises(ValueError, match="exceeds the cache limit of 8"):
        runner.forward(0, [list(range(9))])
    with pytest.raises(ValueError, match="at least one new token"):
        runner.forward(0, [[]])
    with pytest.raises(ValueError, match="cannot truncate"):
        runner.truncate(0, 5)


def test_unsupported_architecture_is_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        ModelRunner(gpt2, max_rows=1, max_len=8)
