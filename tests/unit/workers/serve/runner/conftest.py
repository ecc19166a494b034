"""A tiny random Llama and its plain Hugging Face logits, the yardstick of every runner test."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from stratus_workers.models.tiny import TINY, random_llama

Reference = Callable[..., torch.Tensor]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_llama(dict(TINY), vocab_size=512, init_std=0.2, seed=1)


@pytest.fixture
def reference(model: torch.nn.Module) -> Reference:
    """`reference(ids, last=1)`: the model's own logits for the last `last` tokens of `ids` (one plain forward)."""

    def logits(ids: list[int], last: int = 1) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0, -last:]

    return logits
