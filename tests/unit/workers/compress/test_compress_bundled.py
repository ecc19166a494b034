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


def test_gguf_export_of_the_bundled_model_is_the_bundled_file(tmp_path: Path) -> None:
    """Torch weights -> GGUF puts every tensor back where llama.cpp's own file has it, value for value
    (the bundled "full" model is that file dequantized), and llama.cpp's q4_1 re-quantizes it losslessly."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from stratus_workers.compress.to_gguf import quantize_gguf, write_gguf
    from stratus_workers.models.loader import bundled_gguf

    loaded = load_model("bundled://smollm2-135m-instruct", dtype="float32", device="cpu")
    write_gguf(loaded.model, loaded.tokenizer, tmp_path / "f32.gguf")
    ours = {t.name: t for t in GGUFReader(tmp_path / "f32.gguf").tensors}
    shipped = {t.name: t for t in GGUFReader(bundled_gguf("smollm2-135m-instruct")).tensors}
    assert set(ours) == set(shipped)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.attn_v.weight", "blk.29.ffn_down.weight",
                 "token_embd.weight", "output_norm.weight"):
        expected = dequantize(shipped[name].data, shipped[name].tensor_type).reshape(-1)
        assert np.array_equal(np.asarray(ours[name].data).reshape(-1), expected), name
    quantize_gguf(tmp_path / "f32.gguf", tmp_path / "q4_1.gguf", "q4_1", threads=1)
    again = {t.name: t for t in GGUFReader(tmp_path / "q4_1.gguf").tensors}
    name = "blk.3.ffn_up.weight"
    assert again[name].tensor_type == shipped[name].tensor_type
    assert np.allclose(dequantize(again[name].data, again[name].tensor_type),
                       dequantize(shipped[name].data, shipped[name].tensor_type), atol=1e-3)
