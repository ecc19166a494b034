"""Picks a model's runner: llama.cpp's for a GGUF artifact, else the fused path (CUDA, tensor parallel) or modules."""

from __future__ import annotations

import os
from typing import Any

from stratus_workers.runtimes import RUNTIME_LLAMACPP, RUNTIME_TORCH
from stratus_workers.serve.parallel import BUILD, ParallelContext
from stratus_workers.serve.runner import ModelRunner, UnsupportedModelError, check_supported, env_flag
from stratus_workers.serve.runner.fused import FusedRunner, fusable
from stratus_workers.serve.runner.modules import ModuleRunner


def build_runner(
    model: Any,
    *,
    max_rows: int,
    max_len: int,
    initial_len: int = 256,
    fast: bool | None = None,
    cuda_graphs: bool | None = None,
    compile: bool | None = None,
    parallel: ParallelContext | None = None,
    pool_tokens: int = 0,
    threads: int = 0,
) -> ModelRunner:
    """A runner of `max_rows` cache rows of up to `max_len` tokens for `model` (and a prefix pool of `pool_tokens`).

    `fast` picks the fused path (True) or the module path (False); by default the fused path runs
    where it pays (CUDA, or sharded over `parallel`) and the CPU keeps Hugging Face's exact
    arithmetic. STRATUS_FAST_PATH=0 or 1 overrides the default (1 runs the CUDA path's arithmetic
    on the CPU, which is how the CPU tests cover it). On rank 0 of a tensor-parallel group the
    other ranks build the same runner (their `follow()` calls this with the same settings).

    A GGUF artifact (models.gguf_artifact.GGUFModel) gets llama.cpp's runner on `threads` threads
    (0: its default); llama_cpp is imported only then. Torch's runners use the process's torch threads.
    """
    if getattr(model, "runtime", RUNTIME_TORCH) == RUNTIME_LLAMACPP:
        if parallel is not None and parallel.sharded:
            raise UnsupportedModelError("a GGUF model runs on llama.cpp on the CPU; it cannot be tensor parallel")
        from stratus_workers.serve.llamacpp import LlamaCppRunner

        return LlamaCppRunner(model, max_rows=max_rows, max_len=max_len, threads=threads)
    check_supported(model)
    sharded = parallel is not None and parallel.sharded
    can_fuse = fusable(model)
    if fast is not None:
        use_fused = fast
        if fast and not can_fuse:
            raise UnsupportedModelError("the fast path needs plain Linear projections and a SiLU MLP")
    elif os.environ.get("STRATUS_FAST_PATH"):
        use_fused = can_fuse and env_flag("STRATUS_FAST_PATH", True)
    else:
        on_cuda = next(model.parameters()).device.type == "cuda"
        use_fused = can_fuse and (on_cuda or sharded)
    if sharded and not use_fused:
        raise UnsupportedModelError("tensor parallel needs the fast path (plain Linear layers)")
    if parallel is not None:
        parallel.lead(
            BUILD, max_rows=max_rows, max_len=max_len, initial_len=initial_len, fast=fast, cuda_graphs=cuda_graphs,
            compile=compile, pool_tokens=pool_tokens,
        )  # fmt: skip
    if use_fused:
        return FusedRunner(
            model, max_rows=max_rows, max_len=max_len, cuda_graphs=cuda_graphs, compile=compile, parallel=parallel,
            pool_tokens=pool_tokens,
        )  # fmt: skip
    return ModuleRunner(
        model, max_rows=max_rows, max_len=max_len, initial_len=initial_len, parallel=parallel, pool_tokens=pool_tokens
    )
