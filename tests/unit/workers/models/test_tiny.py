"""The architectures in models.tiny are the one source of the shapes other tools use: the AOT kernel compile's."""

from __future__ import annotations

from typing import Any

import pytest
import triton_aot  # tests/support, on sys.path from tests/conftest.py
from transformers import LlamaConfig

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("name", "arch"), [("1b", SMOLLM2_1B), ("135m", SMOLLM2_135M)])
def test_the_aot_compile_shapes_are_the_models(name: str, arch: dict[str, Any]) -> None:
    config = LlamaConfig(**arch)  # what random_llama builds that architecture from
    model = (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
             config.head_dim)  # fmt: skip
    assert triton_aot.CONFIGS[name] == model
    assert set(triton_aot.CONFIGS) == {"1b", "135m"}
