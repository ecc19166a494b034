"""Shared fixtures: a tiny random model with the bundled tokenizer, built once per session.

torch is imported inside the fixtures, not here: tests that never use a model (most of the operator's)
run without loading it. The worker test folders set torch's threads in their own conftest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# --import-mode=importlib puts no folder on sys.path; helpers shared by several test trees live in tests/support.
sys.path.insert(0, str(Path(__file__).parent / "support"))

# Without a GPU, Triton's interpreter runs serve/kernels.py's kernels on CPU tensors (tests/unit/workers/serve/
# test_kernels.py). Triton reads this when it is first imported, so it is set before anything imports it.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def one_thread() -> None:
    """Two cores are shared by everything a test starts; one intra-op thread avoids oversubscription."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer, as a plain HF model directory."""
    from stratus_workers.models.tiny import write_tiny_model

    one_thread()
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def draft_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights perturbed: a stand-in for a compressed edge variant that mostly agrees."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std() * 0.3)
    path = tmp_path_factory.mktemp("draft-model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def _gguf_artifact(source: Path, out: Path, gguf_type: str) -> Path:
    """A GGUF edge artifact of `source`, made by the real compression Job (small evaluation settings)."""
    from stratus_workers.compress.job import compress, parse_spec

    spec = parse_spec(
        {
            "name": out.name,
            "modelSource": str(source),
            "compression": {"quantization": {"method": "gguf", "ggufType": gguf_type}},
            "evaluation": {
                "perplexitySamples": 2,
                "sequenceLength": 32,
                "speedTokens": 4,
                "agreementPrompts": 2,
                "agreementTokens": 4,
            },
        }
    )
    result = compress(spec, out)
    assert result.manifest["runtime"] == "llamacpp", result.summary
    return out


@pytest.fixture(scope="session")
def tiny_gguf_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a GGUF edge artifact (f32 weights: llama.cpp's logits match torch's closely)."""
    return _gguf_artifact(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-gguf", "f32")


@pytest.fixture(scope="session")
def draft_gguf_dir(draft_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The perturbed draft model as a q8_0 GGUF edge artifact: a llama.cpp edge for the cooperation tests."""
    return _gguf_artifact(draft_model_dir, tmp_path_factory.mktemp("gguf") / "draft-gguf", "q8_0")
