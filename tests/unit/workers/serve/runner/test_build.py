"""build_runner picks the path: the exact module path on the CPU, the fused path on request or when sharded."""

from __future__ import annotations

import copy

import pytest
import torch

from stratus_workers.serve.parallel import ParallelContext
from stratus_workers.serve.runner import UnsupportedModelError
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import FusedRunner
from stratus_workers.serve.runner.modules import ModuleRunner

pytestmark = pytest.mark.unit


def test_the_cpu_keeps_the_module_path_unless_told(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATUS_FAST_PATH", raising=False)
    assert type(build_runner(model, max_rows=2, max_len=16)) is ModuleRunner
    assert type(build_runner(model, max_rows=2, max_len=16, fast=True)) is FusedRunner
    monkeypatch.setenv("STRATUS_FAST_PATH", "1")
    assert type(build_runner(model, max_rows=2, max_len=16)) is FusedRunner
    assert type(build_runner(model, max_rows=2, max_len=16, fast=False)) is ModuleRunner


def test_layers_it_cannot_fuse_take_the_module_path(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    class Quantized(torch.nn.Linear):
        """Stands in for a quantized layer: a Linear subclass with its own forward."""

    odd = copy.deepcopy(model)
    mlp = odd.model.layers[1].mlp
    mlp.down_proj = Quantized(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    monkeypatch.setenv("STRATUS_FAST_PATH", "1")
    assert type(build_runner(odd, max_rows=1, max_len=8)) is ModuleRunner
    with pytest.raises(UnsupportedModelError, match="plain Linear"):
        build_runner(odd, max_rows=1, max_len=8, fast=True)
    # Tensor parallel shards the fused weights: a model without them cannot be split.
    with pytest.raises(UnsupportedModelError, match="tensor parallel needs the fast path"):
        build_runner(odd, max_rows=1, max_len=8, parallel=ParallelContext(rank=1, world_size=2))


def test_unsupported_architecture_is_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        build_runner(gpt2, max_rows=1, max_len=8)
