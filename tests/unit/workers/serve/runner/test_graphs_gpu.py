"""The CUDA path (fused weights, CUDA graphs, torch.compile, decode-ahead) gives the logits of a plain forward pass."""

from __future__ import annotations

import pytest
import torch

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.serve import kernels
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import FusedRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_llama(dict(TINY), vocab_size=512, init_std=0.2, seed=1).to("cuda", torch.bfloat16)


FP32 = random_llama(dict(TINY), vocab_size=512, init_std=0.2, seed=1)


def close_to_reference(model: torch.nn.Module, ids: list[int], logits: torch.Tensor) -> None:
    """Within bf16 rounding: no further from float32 than twice Hugging Face's own bf16 forward, plus 1%."""
    with torch.inference_mode():
        exact = FP32.to("cuda")(torch.tensor([ids], device="cuda")).logits[0, -1]
        hf_bf16 = model(torch.tensor([ids], device="cuda")).logits[0, -1]
    assert rel_err(logits, exact) <= 2 * rel_err(hf_bf16, exact) + 1e-2


@pytest.mark.parametrize("compile_step", [False, True])
def test_graph_decode_matches_reference(model: torch.nn.Module, compile_step: bool) -> None:
    runner = build_runner(model, max_rows=6, max_len=128, compile=compile_step)
    assert isinstance(runner, FusedRunner) and runner.cuda_graphs
    seqs = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102]]
    runner.forward(0, seqs)
    for step in range(20):  # crosses no bucket edge; the batch of 3 runs in bucket 4
        new = [[(17 * step + i) % 512] for i in range(3)]
        logits = runner.forward(0, new)
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
    for row, ids in enumerate(seqs):
        close_to_reference(model, ids, logits[row])
    assert runner.cache.lengths_dev is not None
    assert runner.lengths[:3] == [len(s) for s in seqs] and runner.cache.lengths_dev[:3].tolist() == runner.lengths[:3]
    # Rows leave and the batch shrinks: the graph for bucket 2 reads the moved row correctly.
    runner.move(2, 0)
    runner.reset(2)
    seqs = [seqs[2], seqs[1]]
    logits = runner.forward(0, [[1], [2]])
    for row, ids in enumerate(s + [t] for s, t in zip(seqs, (1, 2), strict=True)):
        close_to_reference(model, ids, logits[row])
    assert len(runner.decoder.graphs) >= 2


def test_long_rows_decode_with_their_keys_split(model: torch.nn.Module) -> None:
    # Rows past kernels.DECODE_SPLIT_KEYS run the batch's second graph, whose attention splits each row's keys.
    runner = build_runner(model, max_rows=4, max_len=1200)
    assert isinstance(runner, FusedRunner) and runner.triton_attention and runner.cuda_graphs
    seqs = [[(7 * i) % 500 + 3 for i in range(700)], [11, 12, 13]]
    runner.forward(0, [seqs[0][:600]])
    runner.forward(0, [seqs[0][600:]])
    runner.forward(1, [seqs[1]])
    for step in range(3):
        new = [[(13 * step + i) % 512] for i in range(2)]
        logits = runner.forward(0, new)
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
    for row, ids in enumerate(seqs):
        close_to_reference(model, ids, logits[row])
    batch, kv_len = runner.decoder.buckets(2, 704)
    assert kv_len > kernels.DECODE_SPLIT_KEYS and (batch, kv_len, False) in runner.decoder.graphs.graphs


def test_padded_rows_never_touch_session_rows(model: torch.nn.Module) -> None:
    # Row 3 plays a speculative session above the decode batch; bucket padding must not disturb it.
    runner = build_runner(model, max_rows=4, max_len=64)
    session = [9, 8, 7, 6]
    runner.forward(3, [session])
    runner.forward(0, [[1, 2, 3], [4], [5, 6]])
    for t in range(5):
        runner.forward(0, [[t], [t + 1], [t + 2]])  # runs in bucket 4: row 3 is padding
    assert runner.lengths[3] == 4
    logits = runner.forward(3, [[5]])
    close_to_reference(model, session + [5], logits[0])


def test_greedy_decoding_runs_one_step_ahead(model: torch.nn.Module) -> None:
    runner = build_runner(model, max_rows=4, max_len=64)
    assert isinstance(runner, FusedRunner) and runner.decoder.decode_ahead
    seqs = [[5, 6, 7, 8], [3, 4]]
    logits = runner.forward(0, seqs)
    for _ in range(20):
        new = [[t] for t in logits.argmax(dim=-1).tolist()]
        logits = runner.forward(0, new)
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
    for row, ids in enumerate(seqs):
        close_to_reference(model, ids, logits[row])
    assert runner.decoder.ahead_hits >= 18


def test_packed_verification_graphs_match_the_padded_pass() -> None:
    """Verification packed without padding (the Triton attention reading each query's row), eager and as a
    graph, scores what the padded pass scores; the rows in between keep their keys."""
    fp32 = random_llama(dict(TINY), vocab_size=512, init_std=0.2, seed=1).to("cuda")
    packed = build_runner(fp32, max_rows=6, max_len=128)
    assert isinstance(packed, FusedRunner) and packed.triton_attention and packed.cuda_graphs
    padded = build_runner(fp32, max_rows=6, max_len=128)
    for runner in (packed, padded):
        for row, n in ((2, 5), (3, 9), (4, 3), (5, 40)):
            runner.forward(row, [list(range(20, 20 + n))])
    replays = packed.packed_replays  # the prefills above ran packed too
    for round_ in range(6):  # a first round eagerly (more tokens than a small bucket), then graphs
        rows = [2, 4, 5] if round_ % 2 else [2, 3, 4, 5]
        tokens = [[(7 * round_ + 3 * r + j) % 512 for j in range(1 + (r + round_) % 5)] for r in rows]
        starts = [len(t) - 1 for t in tokens]
        packed_out = packed.forward_rows(rows, tokens, starts)
        padded_out = super(FusedRunner, padded).forward_rows(rows, tokens, starts)
        assert rel_err(packed_out, padded_out) < 1e-4
        assert packed.lengths == padded.lengths
    assert packed.packed_replays > replays  # some rounds ran as graphs
    for row in range(6):
        n = packed.lengths[row]
        assert torch.allclose(packed.cache.all_keys[:, row, :, :n], padded.cache.all_keys[:, row, :, :n], atol=1e-4)
