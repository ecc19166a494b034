"""Fixtures for the compression tests: small evaluation settings, a spec builder over the tiny model, tokenizers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from stratus_workers.compress.job import parse_spec
from stratus_workers.compress.spec import CompressionJobSpec

# Enough to exercise every evaluation path in well under a second on the tiny model.
TINY_EVALUATION = {"perplexitySamples": 4, "sequenceLength": 64, "speedTokens": 8, "agreementPrompts": 4,
                   "agreementTokens": 8}

SpecFactory = Callable[..., CompressionJobSpec]


@pytest.fixture
def make_spec(tiny_model_dir: Path) -> SpecFactory:
    def build(compression: dict[str, Any], *, gate: dict[str, Any] | None = None, source: str | None = None,
              name: str = "variant") -> CompressionJobSpec:
        return parse_spec({"name": name, "modelSource": source or str(tiny_model_dir), "compression": compression,
                           "evaluation": TINY_EVALUATION, "gate": gate or {}})

    return build


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir: Path) -> dict[str, Any]:
    """SmolLM2's tokenizer (a chat template, no BOS added to raw text) and the two common kinds it is not."""
    instruct = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = copy.deepcopy(instruct)
    base.chat_template = None  # a base model's: no chat template
    llama = copy.deepcopy(instruct)
    llama.add_bos_token = True  # Llama's, Mistral's, Gemma's: raw text starts with BOS
    assert llama.encode("hi")[0] == llama.bos_token_id != instruct.encode("hi")[0]
    return {"instruct": instruct, "base": base, "llama": llama}
