"""The int8 weight-only variant of the bundled SmolLM2-135M-Instruct: small, close to the full model, servable."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratus_workers.compress.job import compress, parse_spec
from stratus_workers.compress.spec import ExitCode
from stratus_workers.models.loader import load_model

pytestmark = pytest.mark.slow


def test_int8_weight_on_the_bundled_model(tmp_path: Path) -> None:
    spec = parse_spec({
        "name": "int8", "modelSource": "bundled://smollm2-135m-instruct",
        "compression": {"quantization": {"method": "int8-weight"}},
        "evaluation": {"perplexitySamples": 8, "sequenceLength": 256, "speedTokens": 16, "agreementPrompts": 4,
                       "agreementTokens": 16},
        "gate": {"maxPerplexityIncrease": 0.02, "maxSizeRatio": 0.27},
    })
    out = tmp_path / "int8"
    result = compress(spec, out)
    assert result.exit_code == ExitCode.OK, result.summary.reasons
    figures = result.manifest["figures"]
    assert figures["size_ratio"] < 0.27
    assert 1.0 < figures["full_perplexity"] < 100.0  # a real model on real English text
    assert figures["agreement"] > 0.8
    loaded = load_model(str(out), dtype="float32", device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    answer = loaded.tokenizer.decode(loaded.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer
