"""The module path's per-row KV cache gives the same logits as a plain Hugging Face forward pass."""

from __future__ import annotations

import pytest
import torch

from stratus_workers.serve.runner import UnsupportedModelError
from stratus_workers.serve.runner.modules import ModuleRunner

pytestmark = pytest.mark.unit


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_batched_prefill_and_decode_match_reference(model: torch.nn.Module, reference) -> None:
    runner = ModuleRunner(model, max_rows=3, max_len=64, initial_len=4)
    a, b, c = [5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102]
    logits = runner.forward(0, [a, b, c])
    for row, ids in enumerate((a, b, c)):
        close(logits[row], reference(ids)[0])
    logits = runner.forward(0, [[12], [13], [14]])
    for row, ids in enumerate((a + [12], b + [13], c + [14])):
        close(logits[row], reference(ids)[0])
    assert runner.lengths == [8, 3, 4]


def test_extend_truncate_and_move(model: torch.nn.Module, reference) -> None:
    runner = ModuleRunner(model, max_rows=2, max_len=64)
    runner.forward(0, [[1, 2, 3], [4, 5]])
    every = runner.forward(1, [[6, 7, 8]], all_logits=True)
    close(every[0], reference([4, 5, 6, 7, 8], last=3))
    runner.truncate(1, 3)  # drop 7, 8 as a rejected draft would be
    close(runner.forward(1, [[9]])[0], reference([4, 5, 6, 9])[0])
    runner.move(1, 0)
    assert runner.lengths == [4, 0]
    close(runner.forward(0, [[10]])[0], reference([4, 5, 6, 9, 10])[0])


def test_rows_move_after_forward_grew_the_cache(model: torch.nn.Module, reference) -> None:
    # Issue 12: the cache grown inside forward (inference mode) was later moved by ordinary code.
    runner = ModuleRunner(model, max_rows=2, max_len=64, initial_len=16)
    assert runner.capacity == 16
    long = list(range(20, 40))
    runner.forward(0, [[1, 2], long])
    assert runner.capacity > 16
    assert not torch.is_inference_mode_enabled()
    runner.move(1, 0)
    runner.truncate(0, 19)
    runner.reset(1)
    close(runner.forward(0, [[10]])[0], reference([*long[:19], 10])[0])


def test_limits_are_enforced(model: torch.nn.Module) -> None:
    runner = ModuleRunner(model, max_rows=1, max_len=8)
    with pytest.raises(ValueError, match="exceeds the cache limit of 8"):
        runner.forward(0, [list(range(9))])
    with pytest.raises(ValueError, match="at least one new token"):
        runner.forward(0, [[]])
    with pytest.raises(ValueError, match="at least one row"):
        runner.forward(0, [])
    with pytest.raises(ValueError, match=r"rows 0\.\.1 are outside this runner's 1"):
        runner.forward(0, [[1], [2]])
    with pytest.raises(ValueError, match="cannot truncate"):
        runner.truncate(0, 5)
    assert runner.lengths == [0]  # nothing refused left a trace


def test_unsupported_architecture_is_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        ModuleRunner(gpt2, max_rows=1, max_len=8)


@pytest.mark.parametrize("fast", [False, True])
def test_a_prefix_from_the_pool_gives_the_logits_of_a_full_prefill(model: torch.nn.Module, reference, fast) -> None:
    from stratus_workers.serve.runner.build import build_runner

    runner = build_runner(model, max_rows=2, max_len=64, pool_tokens=32, fast=fast)
    prompt = [(5 * i + 1) % 512 for i in range(21)]
    runner.forward(0, [prompt[:16]])
    runner.save_prefix(0, [0, 8], [1, 0], 8)
    runner.load_prefix(1, [1, 0], 8)
    close(runner.forward(1, [prompt[16:]])[0], reference(prompt)[0])
    decoded = runner.decode([7, 9], logprobs=True)  # row 0 continues from its own 16 tokens
    close(decoded.logits[1], reference([*prompt, 9])[0])
    assert decoded.greedy == decoded.logits.argmax(dim=-1).tolist()
    assert decoded.greedy_logprobs is not None
    expected = torch.log_softmax(decoded.logits, dim=-1).max(dim=-1).values.tolist()
    assert decoded.greedy_logprobs == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("fast", [False, True])
def test_rows_at_different_lengths_prefill_together_near_the_end_of_the_cache(
    model: torch.nn.Module, reference, fast
) -> None:
    # A long row (a cached prefix) and a fresh one in one forward: padding the long row's 3 tokens to the
    # fresh row's 30 would reach past the cache (found by bench-serve's shared-prefix run on the CPU).
    from stratus_workers.serve.runner.build import build_runner

    runner = build_runner(model, max_rows=2, max_len=48, fast=fast)
    long_prompt = [(7 * i + 2) % 512 for i in range(40)]
    runner.forward(0, [long_prompt])
    fresh = [(3 * i + 1) % 512 for i in range(30)]
    logits = runner.forward(0, [[5, 6, 7], fresh])  # rows 0 and 1: 40 + 3 and 0 + 30
    close(logits[0], reference([*long_prompt, 5, 6, 7])[0])
    close(logits[1], reference(fresh)[0])
    assert runner.lengths == [43, 30]
    close(runner.forward(0, [[8], [9]])[0], reference([*long_prompt, 5, 6, 7, 8])[0])


@pytest.mark.parametrize("fast", [False, True])
def test_logits_from_scores_only_the_later_new_tokens(model: torch.nn.Module, reference, fast: bool) -> None:
    """A verification's context goes into the cache unscored: the logits left are those of the full pass."""
    from stratus_workers.serve.runner.fused import FusedRunner

    def runner() -> ModuleRunner | FusedRunner:
        if fast:
            return FusedRunner(model, max_rows=2, max_len=64, cuda_graphs=False, compile=False)
        return ModuleRunner(model, max_rows=2, max_len=64)

    rows = [[5, 6, 7, 8, 9, 10], [3, 4, 11]]
    whole = runner().forward(0, rows, all_logits=True)
    part = runner()
    scored = part.forward(0, rows, all_logits=True, logits_from=2)
    assert scored.shape == (2, 4, whole.shape[-1])
    close(scored, whole[:, 2:])
    close(scored[0, -1], reference(rows[0])[0])
    assert part.lengths == [6, 3]  # every token is in the cache, scored or not
    for bad in ({"logits_from": 1}, {"all_logits": True, "logits_from": 6}):
        with pytest.raises(ValueError, match="logits_from"):
            part.forward(0, rows, **bad)
    assert part.lengths == [6, 3]


@pytest.mark.parametrize("fast", [False, True])
def test_forward_rows_scores_the_named_rows_alone(model: torch.nn.Module, reference, fast: bool) -> None:
    """A verification of several sessions: rows apart, at different lengths, each scored from its own index on;
    the row between them is left as it was (the fused path packs the tokens, the module path pads them)."""
    from stratus_workers.serve.runner.fused import FusedRunner

    runner: ModuleRunner | FusedRunner
    if fast:
        runner = FusedRunner(model, max_rows=4, max_len=64, cuda_graphs=False, compile=False)
    else:
        runner = ModuleRunner(model, max_rows=4, max_len=64)
    held = {0: [5, 6, 7], 1: [9, 9, 9, 9, 9], 2: [], 3: [40, 41, 42, 43, 44, 45, 46]}
    for row, ids in held.items():
        if ids:
            runner.forward(row, [ids])
    between = runner.cache.keys[0][1, :, :5].clone()
    new = {0: [8, 10, 11], 2: [20, 21, 22, 23, 24, 25], 3: [47]}
    starts = {0: 2, 2: 3, 3: 0}
    logits = runner.forward_rows([0, 2, 3], [new[r] for r in (0, 2, 3)], [starts[r] for r in (0, 2, 3)])
    assert logits.shape[0] == (3 - 2) + (6 - 3) + (1 - 0)
    at = 0
    for row in (0, 2, 3):
        ids = held[row] + new[row]
        scored = len(new[row]) - starts[row]
        close(logits[at : at + scored], reference(ids, last=scored))
        at += scored
        assert runner.lengths[row] == len(ids)
    assert runner.lengths[1] == 5 and torch.equal(runner.cache.keys[0][1, :, :5], between)
    with pytest.raises(ValueError, match="ascending"):
        runner.forward_rows([3, 0], [[1], [2]], [0, 0])
    assert runner.lengths == [6, 5, 6, 8]
