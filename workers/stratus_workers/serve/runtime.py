"""Picks the runner that computes a loaded model's forward passes: torch's, or llama.cpp's for a GGUF artifact."""

from __future__ import annotations

from typing import Any

from stratus_workers.runtimes import RUNTIME_LLAMACPP, RUNTIME_TORCH


def runtime_of(model: Any) -> str:
    """`llamacpp` for a GGUF artifact (models.gguf_artifact.GGUFModel), `torch` for a torch module."""
    return str(getattr(model, "runtime", RUNTIME_TORCH))


def runner_for(model: Any, *, max_rows: int, max_len: int, threads: int = 0) -> Any:
    """A runner over `model` with `max_rows` cache rows of up to `max_len` tokens.

    Both runners answer the same calls (forward, reset, truncate, move, lengths, warmup), so the
    engine and the compression Job's measurements drive either. llama_cpp is imported only here,
    only for a GGUF model. `threads` is llama.cpp's thread count (0: its default here); the torch
    runner uses torch's intra-op threads, which the process sets.
    """
    if runtime_of(model) == RUNTIME_LLAMACPP:
        from stratus_workers.serve.llamacpp import LlamaCppRunner

        return LlamaCppRunner(model, max_rows=max_rows, max_len=max_len, threads=threads)
    from stratus_workers.serve.runner import ModelRunner

    return ModelRunner(model, max_rows=max_rows, max_len=max_len)
