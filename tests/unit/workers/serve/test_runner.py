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


# -- the fast path (fused weights, static decode step): CUDA's code, run eagerly on the CPU ------------


def test_fast_path_matches_reference(model: torch.nn.Module) -> None:
    runner = ModelRunner(model, max_rows=4, max_len=64, fast=True, cuda_graphs=False, compile=False)
    assert runner.fast and runner.capacity == 65  # allocated once, with the spare padding slot
    seqs = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102]]
    logits = runner.forward(0, seqs)
    for row, ids in enumerate(seqs):
        torch.testing.assert_close(logits[row], reference(model, ids)[0], atol=1e-4, rtol=1e-4)
    for step in range(3):  # a batch of 3 decodes in bucket 4
        new = [[20 + step], [30 + step], [40 + step]]
        logits = runner.forward(0, new)
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(logits[row], reference(model, ids)[0], atol=1e-4, rtol=1e-4)
    assert runner._len_dev.tolist() == runner.lengths == [10, 5, 6, 0]
    runner.move(2, 0)  # row 0 leaves; the last row takes its place
    runner.truncate(0, 5)  # and drops its last token, as a rejected draft would
    seqs = [seqs[2][:5], seqs[1]]
    assert runner._len_dev.tolist() == runner.lengths == [5, 5, 0, 0]
    logits = runner.forward(0, [[7], [8]], all_logits=True)
    for row, ids in enumerate((seqs[0] + [7], seqs[1] + [8])):
        torch.testing.assert_close(logits[row, 0], reference(model, ids)[0], atol=1e-4, rtol=1e-4)


def test_fast_path_padding_never_touches_rows_above_the_batch(model: torch.nn.Module) -> None:
    # Row 3 holds a speculative session; a batch of 3 runs padded to 4 rows and must not disturb it.
    runner = ModelRunner(model, max_rows=4, max_len=32, fast=True, cuda_graphs=False, compile=False)
    session = [9, 8, 7, 6]
    runner.forward(3, [session])
    runner.forward(0, [[1, 2, 3], [4], [5, 6]])
    for t in range(4):
        runner.forward(0, [[t], [t + 1], [t + 2]])
    assert runner.lengths[3] == 4
    extended = runner.forward(3, [[5, 4]], all_logits=True)
    torch.testing.assert_close(extended[0], reference(model, [*session, 5, 4], last=2), atol=1e-4, rtol=1e-4)


def test_fast_path_rejects_modules_it_cannot_fuse(model: torch.nn.Module) -> None:
    class Quantized(torch.nn.Linear):
        """Stands in for a quantized layer: a Linear subclass with its own forward."""

    import copy

    odd = copy.deepcopy(model)
    layer = odd.model.layers[0].mlp
    layer.up_proj = Quantized(layer.up_proj.in_features, layer.up_proj.out_features, bias=False)
    assert not ModelRunner(odd, max_rows=1, max_len=8).fast
    with pytest.raises(UnsupportedModelError, match="plain Linear"):
        ModelRunner(odd, max_rows=1, max_len=8, fast=True)


def test_decoding_one_step_ahead_matches_reference(model: torch.nn.Module) -> None:
    # On CUDA the runner starts step t+1 on step t's argmax before the caller has sampled; the
    # guess must be used only when the caller really sends those tokens to the same rows.
    runner = ModelRunner(model, max_rows=4, max_len=64, fast=True, cuda_graphs=False, compile=False)
    runner.speculate = True
    seqs = [[5, 6, 7], [3, 4], [100, 101, 102, 103]]
    logits = runner.forward(0, seqs)
    for step in range(8):
        greedy = logits.argmax(dim=-1).tolist()
        # Greedy steps use the guess; step 3 sends other tokens; step 5 changes the rows first.
        new = [[(t + 1) % 512] for t in greedy] if step == 3 else [[t] for t in greedy]
        if step == 5:
            runner.move(2, 1)
            runner.reset(2)
            seqs = [seqs[0], seqs[2]]
            new = new[::2]
        logits = runner.forward(0, new)
        if step == 3:
            assert runner._spec_pause  # a wrong guess pauses guessing (sampling requests)...
            runner._spec_pause = 0  # ...here resumed at once, so that step 5 meets a guess
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(logits[row], reference(model, ids)[0], atol=1e-4, rtol=1e-4)
    assert runner.speculation_hits == 4  # steps 1, 2, 6 and 7
    assert runner._len_dev.tolist()[:2] == runner.lengths[:2] == [len(s) for s in seqs]


def test_rows_move_after_forward_grew_the_cache(model: torch.nn.Module) -> None:
    # Issue 12: the cache grown inside forward (inference mode) was later moved by ordinary code.
    runner = ModelRunner(model, max_rows=2, max_len=64, initial_len=16)
    assert runner.capacity == 16
    long = list(range(20, 40))
    runner.forward(0, [[1, 2], long])
    assert runner.capacity > 16
    runner.move(1, 0)
    runner.truncate(0, 19)
    runner.reset(1)
    torch.testing.assert_close(
        runner.forward(0, [[10]])[0], reference(model, [*long[:19], 10])[0], atol=1e-4, rtol=1e-4
    )
