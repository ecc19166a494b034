"""Fixtures for the serving tests: Triton's kernels ready to run here (the GPU, or the CPU interpreter)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def triton_ready() -> None:
    """Skip without triton; without a GPU, insist that tests/conftest.py turned Triton's interpreter on."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py did not ask for Triton's interpreter"
