"""The fused path (CUDA's arithmetic: fused weights, bucketed static decode), run eagerly on the CPU."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from stratus_workers.serve import gemv, kernels
from stratus_workers.serve.runner import UnsupportedModelError
from stratus_workers.serve.runner import fused as fused_module
from stratus_workers.serve.runner.fused import SPARE_SLOTS, FusedRunner, fusable

pytestmark = pytest.mark.unit


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def fused(model: torch.nn.Module, max_rows: int, max_len: int) -> FusedRunner:
    return FusedRunner(model, max_rows=max_rows, max_len=max_len, cuda_graphs=False, compile=False)


def test_fused_path_matches_reference(model: torch.nn.Module, reference) -> None:
    runner = fused(model, 4, 64)
    assert runner.capacity == 64 + SPARE_SLOTS  # allocated once, with the spare slots (padding, keys past an end)
    seqs = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102]]
    logits = runner.forward(0, seqs)
    for row, ids in enumerate(seqs):
        close(logits[row], reference(ids)[0])
    for step in range(3):  # a batch of 3 decodes in bucket 4
        new = [[20 + step], [30 + step], [40 + step]]
        logits = runner.forward(0, new)
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
        for row, ids in enumerate(seqs):
            close(logits[row], reference(ids)[0])
    assert runner.cache.lengths_dev is not None
    assert runner.cache.lengths_dev.tolist() == runner.lengths == [10, 5, 6, 0]
    runner.move(2, 0)  # row 0 leaves; the last row takes its place
    runner.truncate(0, 5)  # and drops its last token, as a rejected draft would
    seqs = [seqs[2][:5], seqs[1]]
    assert runner.cache.lengths_dev.tolist() == runner.lengths == [5, 5, 0, 0]
    logits = runner.forward(0, [[7], [8]], all_logits=True)
    for row, ids in enumerate((seqs[0] + [7], seqs[1] + [8])):
        close(logits[row, 0], reference(ids)[0])


def test_padding_never_touches_rows_above_the_batch(model: torch.nn.Module, reference) -> None:
    # Row 3 holds a speculative session; a batch of 3 runs padded to 4 rows and must not disturb it.
    runner = fused(model, 4, 32)
    session = [9, 8, 7, 6]
    runner.forward(3, [session])
    runner.forward(0, [[1, 2, 3], [4], [5, 6]])
    for t in range(4):
        runner.forward(0, [[t], [t + 1], [t + 2]])
    assert runner.lengths[3] == 4
    extended = runner.forward(3, [[5, 4]], all_logits=True)
    close(extended[0], reference([*session, 5, 4], last=2))


def test_modules_it_cannot_fuse_are_refused(model: torch.nn.Module) -> None:
    class Quantized(torch.nn.Linear):
        """Stands in for a quantized layer: a Linear subclass with its own forward."""

    odd = copy.deepcopy(model)
    layer = odd.model.layers[0].mlp
    layer.up_proj = Quantized(layer.up_proj.in_features, layer.up_proj.out_features, bias=False)
    assert fusable(model) and not fusable(odd)
    with pytest.raises(UnsupportedModelError, match="plain Linear"):
        fused(odd, 1, 8)


@pytest.mark.parametrize("attention", ["torch", "triton", "triton, keys split"])
def test_packed_prefill_matches_the_eager_one(
    model: torch.nn.Module, reference, monkeypatch: pytest.MonkeyPatch, attention: str
) -> None:
    # CUDA's prefill is a packed pass (the verification's): rows of any lengths from any positions, no padding,
    # the block attention kernel (here run by Triton's interpreter; its keys split over several programs where a
    # row reads many of them, here past 8) or, without it, torch's attention per token. The decode steps after it
    # run the decode kernel, its keys split too past 8.
    if attention.startswith("triton"):
        pytest.importorskip("triton")
    if attention == "triton, keys split":
        monkeypatch.setattr(fused_module, "SPLIT_KEYS", 8)
        monkeypatch.setattr(kernels, "DECODE_SPLIT_KEYS", 8)
    eager = fused(model, 6, 40)
    monkeypatch.setenv("STRATUS_PACKED_PREFILL", "1")
    packed = fused(model, 6, 40)
    packed.triton_attention = attention.startswith("triton")
    assert not eager.packed_prefill and packed.packed_prefill
    session = [9, 8, 7, 6]
    for runner in (eager, packed):
        runner.forward(5, [session])  # a session row above the prefilling rows must not be touched
        runner.forward(0, [[1, 2, 3, 4]])
        runner.forward(3, [[50] * 30])  # 30 tokens: two blocks of the kernel
    chunks = [[5, 6, 7, 8, 9], [3], [7] * 9]  # row 3's chunk follows its 30 tokens (a cached prefix's shape)
    want = eager.forward(1, chunks)
    got = packed.forward(1, chunks)
    close(got, want)
    assert packed.lengths == eager.lengths == [4, 5, 1, 39, 0, 4]
    close(got[2], reference([50] * 30 + chunks[2])[0])
    for runner in (eager, packed):  # every row's keys are right: the next tokens agree with the reference
        logits = runner.forward(0, [[11], [12], [13], [14]])
        expected = ([1, 2, 3, 4, 11], chunks[0] + [12], chunks[1] + [13], [50] * 30 + chunks[2] + [14])
        for row, ids in enumerate(expected):
            close(logits[row], reference(ids)[0])
        close(runner.forward(5, [[5, 4]], all_logits=True)[0], reference([*session, 5, 4], last=2))
    # A verification of two sessions through the same pass, each scored from its own index on.
    scored = packed.forward_rows([0, 5], [[21, 22, 23], [31, 32]], [1, 0])
    close(scored[:2], reference([1, 2, 3, 4, 11, 21, 22, 23], last=2))
    close(scored[2:], reference([*session, 5, 4, 31, 32], last=2))
    assert packed.passes == eager.passes + 1


def with_biases(model: torch.nn.Module, names: tuple[str, ...], seed: int = 0) -> torch.nn.Module:
    """A copy of `model` whose projections `names` (q_proj, o_proj, up_proj...) have random biases."""
    gen = torch.Generator().manual_seed(seed)
    biased = copy.deepcopy(model)
    for layer in biased.model.layers:
        for name in names:
            proj = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            proj.bias = torch.nn.Parameter(torch.randn(proj.out_features, generator=gen) * 0.1, requires_grad=False)
    return biased


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_small_batch_layer_decodes_as_the_compiled_steps_functions(
    model: torch.nn.Module, qkv_bias: bool
) -> None:
    # CUDA's decode step of up to 8 rows is the fused layer (serve/gemv.py: norm, q|k|v, rotary and the cache write
    # in one kernel; o; norm, gate|up and SiLU in another; down), here run by Triton's interpreter. Its logits are
    # the step with the Triton attention alone (CUDA's other path) and the model's own, at batches 1 to 5 (bucket 8);
    # with q|k|v biases too (Qwen2's).
    pytest.importorskip("triton")
    if qkv_bias:
        model = with_biases(model, ("q_proj", "k_proj", "v_proj"))

    def reference(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0, -1:]

    plain, layer = fused(model, 8, 32), fused(model, 8, 32)
    for runner in (plain, layer):
        runner.triton_attention = True
    assert plain.gemv_refusal() is None and not plain.gemv_layer  # no Triton attention on the CPU unless asked
    assert layer.gemv_max_batch == 1  # one row by default: the only batch measured on a GPU
    layer.gemv_layer, layer.gemv_max_batch = True, gemv.MAX_BATCH
    seqs = [[5, 6, 7], [3, 4], [100, 101, 102, 103], [9], [40, 41]]
    for runner in (plain, layer):
        runner.forward(0, seqs)
    for step, batch in enumerate((5, 3, 1, 2)):
        ids = [(17 * step + row) % 500 for row in range(batch)]
        want, got = plain.decode(ids), layer.decode(ids)
        close(got.logits, want.logits)
        assert got.greedy == want.greedy == want.logits.argmax(-1).tolist()
        seqs[:batch] = [s + [t] for s, t in zip(seqs[:batch], ids, strict=True)]
        for row in range(batch):
            close(got.logits[row], reference(seqs[row])[0])
    assert layer.gemv_batches == {8, 4, 1, 2} and not plain.gemv_batches
    assert layer.lengths == plain.lengths
    # Both caches hold the same keys and values for every live position (the fused layer wrote them in place).
    for k_plain, k_layer in zip(plain.cache.keys, layer.cache.keys, strict=True):
        for row, length in enumerate(plain.lengths):
            close(k_layer[row, :, :length], k_plain[row, :, :length])
    # A pipeline stage runs the layers over a micro-batch of rows further down (rows 2 and 3 here).
    with torch.inference_mode():
        h = layer.embed(torch.tensor([7, 8]))
        close(layer.decode_rows(h, 2, layer.cache.capacity), plain.decode_rows(h, 2, plain.cache.capacity))
    # A failed capture drops the fused layer first, then the Triton attention.
    assert layer.degrade() == "the fused GEMV layer" and not layer.gemv_layer and layer.triton_attention
    assert not layer.gemv_batches
    assert layer.degrade() == "Triton attention"


def test_fused_small_batch_layer_is_refused_with_biases_past_qkv(model: torch.nn.Module) -> None:
    for names in (("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
        runner = fused(with_biases(model, names), 1, 8)
        assert runner.gemv_refusal() == "biases past q|k|v's" and not runner.gemv_layer


@pytest.mark.parametrize("value", ["eight", "0", "9"])
def test_a_bad_row_limit_for_the_fused_layer_is_refused_by_name(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("STRATUS_GEMV_MAX_BATCH", value)
    with pytest.raises(ValueError, match=rf"STRATUS_GEMV_MAX_BATCH must be a whole number from 1 to 8, got '{value}'"):
        fused(model, 2, 16)
    monkeypatch.setenv("STRATUS_GEMV_MAX_BATCH", "4")
    assert fused(model, 2, 16).gemv_max_batch == 4


@pytest.mark.parametrize("new", [9, 17])
def test_packed_verification_with_the_attention_kernel_scores_as_the_model_does(
    model: torch.nn.Module, reference, new: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA's packed pass (Triton's block attention, here its interpreter) over rows of 9 new tokens (an 8-token
    # draft: blocks of 16) and of 17 (a 16-token draft: blocks of 32, so each row's keys are read once), after
    # contexts of different lengths, in rows not side by side, every new token scored.
    pytest.importorskip("triton")
    runner = fused(model, 4, 64)
    runner.triton_attention = True
    blocks: list[int] = []  # the block size each of the pass's attention calls took (its last argument)
    attend = kernels.extend_attention

    def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
        blocks.append(args[-1])
        return attend(*args, **kwargs)

    monkeypatch.setattr(kernels, "extend_attention", recorded)
    rows, contexts = [0, 2, 3], [[5, 6, 7, 8], [3, 4, 9], [100, 101, 102, 103, 104, 105]]
    runner.forward_rows(rows, contexts, [len(c) - 1 for c in contexts])
    tokens = [[(31 * k + i) % 500 for i in range(new)] for k in range(len(rows))]
    blocks.clear()
    logits = runner.forward_rows(rows, tokens, [0] * len(rows))
    assert blocks and set(blocks) == {32 if new > 16 else 16}
    for k, (context, fed) in enumerate(zip(contexts, tokens, strict=True)):
        close(logits[k * new : (k + 1) * new], reference(context + fed, last=new))
    assert runner.lengths == [len(contexts[0]) + new, 0, len(contexts[1]) + new, len(contexts[2]) + new]


@pytest.mark.slow  # inductor compiles the blocks for the CPU (about half a minute here)
def test_compiled_blocks_score_as_the_eager_ones_and_a_third_size_compiles_nothing(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compiled blocks take automatic dynamic shapes: the first size is compiled as it is, the second makes the
    # sizes that changed (the tokens) symbolic, and from then on no size a server meets compiles again (a compile
    # is seconds in a request's path). The model's own sizes stay constants, which is what made the element-wise
    # kernels fast on an H200 (tests/bench/gpu_layer_parts.py); here the logits must match the eager blocks'.
    from torch._dynamo.utils import counters

    monkeypatch.setenv("STRATUS_FAST_PATH", "1")
    torch._dynamo.reset()
    counters.clear()
    eager = FusedRunner(model, max_rows=8, max_len=64, cuda_graphs=False, compile=False)
    compiled = FusedRunner(model, max_rows=8, max_len=64, cuda_graphs=False, compile=True)
    assert compiled.compiled
    graphs_after = []
    with torch.inference_mode():
        for batch in (2, 3, 5, 7):
            rows = list(range(batch))
            drafts = [[1 + r, 2 + r, 3 + r][: r % 3 + 1] for r in rows]
            got = compiled.forward_rows(rows, drafts, [0] * batch)
            close(got, eager.forward_rows(rows, drafts, [0] * batch))
            for runner in (compiled, eager):
                runner.truncate_rows(rows, [0] * batch)
            graphs_after.append(counters["stats"]["unique_graphs"])
    assert graphs_after[1] > graphs_after[0] > 0  # the first size compiled as constants, the second symbolic
    assert graphs_after[2] == graphs_after[3] == graphs_after[1]  # the third and fourth sizes reuse the second's
