"""Fixtures for the compression tests: small evaluation settings and a spec builder over the tiny model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
