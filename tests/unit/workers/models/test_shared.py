"""Servers in one process share one copy of a model; code that changes a model gets its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratus_workers.models import load_model, load_shared_model
from stratus_workers.models.loader import clear_shared_models

pytestmark = pytest.mark.unit


def test_shared_models_are_loaded_once(tiny_model_dir: Path) -> None:
    clear_shared_models()
    try:
        first = load_shared_model(str(tiny_model_dir), dtype="float32", device="cpu")
        second = load_shared_model(str(tiny_model_dir), dtype="float32", device="cpu", name="other")
        assert second.model is first.model and second.tokenizer is first.tokenizer
        assert second.name == "other" and first.name != "other"
        assert load_shared_model(str(tiny_model_dir), dtype="bfloat16", device="cpu").model is not first.model
        assert load_model(str(tiny_model_dir), dtype="float32", device="cpu").model is not first.model
    finally:
        clear_shared_models()
