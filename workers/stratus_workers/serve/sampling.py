"""Sampling state shared by the batching loop and the speculative sessions: generators and end-of-sequence ids."""

from __future__ import annotations

import time
from typing import Any

import torch


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (the same seed draws the same tokens), or from the clock."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else time.time_ns() & 0x7FFFFFFF)
    return generator


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends a sequence, from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)
