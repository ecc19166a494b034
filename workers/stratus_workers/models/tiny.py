"""Builds tiny random-init Llama models (with the bundled tokenizer) for tests and speed benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stratus_workers.models.loader import bundled_tokenizer as _bundled_tokenizer
from stratus_workers.models.source import BUNDLED_SMOLLM2

# The SmolLM2-135M architecture; speed does not depend on weight values.
SMOLLM2_135M: dict[str, Any] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
# A ~1B-parameter member of the same family (SmolLM2-1.7B is 24 layers of 2048).
SMOLLM2_1B: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=8192,
    rope_theta=130000.0,
    tie_word_embeddings=True,
)
TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def bundled_tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer (read from the GGUF once, then cached)."""
    return _bundled_tokenizer(BUNDLED_SMOLLM2)


def random_llama(
    arch: dict[str, Any] | None = None, *, vocab_size: int = 49152, seed: int = 0, init_std: float = 0.02
) -> Any:
    """A random-init LlamaForCausalLM with the given architecture (TINY by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=init_std,
        **(arch or TINY),
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    return model.eval()


def write_tiny_model(path: Path, *, arch: dict[str, Any] | None = None, seed: int = 0, init_std: float = 0.02) -> Path:
    """Write a tiny random model plus the bundled tokenizer to `path` as a plain HF directory."""
    tokenizer = bundled_tokenizer()
    model = random_llama(arch, vocab_size=len(tokenizer), seed=seed, init_std=init_std)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_loaded(
    arch: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    name: str = "random",
    init_std: float = 0.02,
    tokenizer_dir: str | None = None,
) -> Any:
    """A random-init model with the bundled tokenizer (or the one in `tokenizer_dir`) as a
    models.LoadedModel; picklable as a partial: a benchmark's engine process builds the same weights
    from the same seed."""
    from stratus_workers.models.loader import LoadedModel, resolve_device, resolve_dtype

    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = bundled_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model = random_llama(arch, vocab_size=len(tokenizer), seed=seed, init_std=init_std)
    model.to(device=dev, dtype=torch_dtype).requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source="random-init", dtype=torch_dtype, device=dev)
