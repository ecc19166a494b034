"""The fused small-batch decode layer on CUDA: the batch-1 graph runs it, and it decodes as the compiled layers do."""

from __future__ import annotations

import pytest
import torch

from stratus_workers.models.tiny import SMOLLM2_135M, random_llama
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import FusedRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_batch_one_graph_runs_the_fused_layer_and_decodes_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    # SmolLM2-135M's shape (hidden 576, 9 heads over 3 kv heads: masked loads), random weights spread wide enough
    # (init 0.2) that bf16's rounding differences between the two paths cannot swap a clear argmax.
    model = random_llama(dict(SMOLLM2_135M), vocab_size=4096, init_std=0.2, seed=3).to("cuda", torch.bfloat16)
    runners = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("STRATUS_GEMV_LAYER", flag)
        runner = build_runner(model, max_rows=4, max_len=256, compile=False)
        assert isinstance(runner, FusedRunner) and runner.cuda_graphs and runner.triton_attention
        assert runner.gemv_layer == (flag == "1")
        runner.forward(0, [[5, 6, 7, 8, 9, 10, 11]])
        runners[flag] = runner
    on, off = runners["1"], runners["0"]
    token, compared = 11, 0
    for _ in range(24):
        want, got = off.decode([token]), on.decode([token])  # both fed the unfused path's choice
        top2 = want.logits[0].topk(2).values
        rel = float((got.logits.float() - want.logits.float()).norm() / want.logits.float().norm())
        assert rel < 2e-2
        if float(top2[0] - top2[1]) > 0.25:  # a clear choice: the same token
            assert got.greedy == want.greedy
            compared += 1
        token = want.greedy[0]
    assert compared >= 12
    # The batch-1 graph is the fused layer's (captured from it); the unfused runner never ran it.
    assert on.gemv_batches == {1} and (1, on.cache.capacity) in on.decoder.graphs.graphs
    assert not off.gemv_batches and (1, off.cache.capacity) in off.decoder.graphs.graphs
