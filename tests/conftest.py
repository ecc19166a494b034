"""Shared fixtures: a tiny random model with the bundled tokenizer, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stratus_workers.models.tiny import write_tiny_model

# Two cores are shared by everything a test starts; one intra-op thread avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer, as a plain HF model directory."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)
