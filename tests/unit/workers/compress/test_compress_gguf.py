"""GGUF variants: the Job writes, quantizes, measures and gates them like any other variant."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from stratus_workers.compress.job import BadInput, compress
from stratus_workers.compress.spec import CompressionJobSpec, ExitCode, Quantization
from stratus_workers.compress.to_gguf import GGUFExportError, check_exportable, write_gguf
from stratus_workers.models import load_model
from stratus_workers.models.gguf_artifact import GGUF_FILE, read_gguf
from stratus_workers.runtimes import GGUF_FTYPES, GGUFType

pytestmark = pytest.mark.unit

SpecFactory = Callable[..., CompressionJobSpec]


def test_the_spec_and_the_quantizer_list_the_same_types() -> None:
    assert set(get_args(GGUFType)) == set(GGUF_FTYPES)
    assert Quantization(method="gguf", gguf_type="q4_k_m").gguf_type == "q4_k_m"
    with pytest.raises(ValueError, match="ggufType"):
        Quantization.model_validate({"method": "gguf", "ggufType": "q3_k"})


def test_gguf_variant_is_measured_and_gated_like_the_others(make_spec: SpecFactory, tmp_path: Path) -> None:
    torch_variant = compress(make_spec({"quantization": {"method": "int8-weight"}}), tmp_path / "int8")
    spec = make_spec({"quantization": {"method": "gguf", "ggufType": "q8_0"}}, gate={"maxPerplexityIncrease": 0.05})
    result = compress(spec, tmp_path / "gguf")
    manifest = json.loads((tmp_path / "gguf" / "manifest.json").read_text())
    f = manifest["figures"]
    assert result.exit_code == 0 and manifest["runtime"] == "llamacpp" and manifest["recipe"] == "quantize:gguf-q8_0"
    assert (tmp_path / "gguf" / GGUF_FILE).is_file() and not (tmp_path / "gguf" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".gguf.work/*.gguf"))  # the f32 intermediate is gone
    # The same figures as a torch variant, from the same measurements.
    assert set(f) >= set(torch_variant.manifest["figures"]) - {"quantization"}
    assert f["full_perplexity"] == torch_variant.manifest["figures"]["full_perplexity"]
    assert f["bytes"] == read_gguf(tmp_path / "gguf" / GGUF_FILE)[1]
    # q8_0 of a random model: close to the full model, about a quarter of fp32 (plus f32 norms).
    assert abs(f["perplexity_increase"]) < 0.02 and f["agreement"] > 0.9
    assert 0.25 < f["size_ratio"] < 0.3 and f["quantization"]["tensor_types"]["q8_0"] > 0
    assert f["tokens_per_second"] > 0 and f["full_tokens_per_second"] > 0
    assert "llama_cpp_python" in manifest["versions"]
    # What one token takes in the cache llama.cpp allocates, as the operator sizes the pod's memory by it.
    from stratus_workers.serve.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(load_model(str(tmp_path / "gguf")).model, max_rows=2, max_len=16, threads=1)
    assert f["kv_bytes_per_token"] == result.summary.kv_bytes_per_token == runner.cache_bytes() // runner.kv_cells
    assert f["kv_bytes_per_token"] * 2 == torch_variant.manifest["figures"]["kv_bytes_per_token"]  # torch: fp32
    # A gate it cannot meet rejects it with the reason, as for any variant.
    strict = make_spec({"quantization": {"method": "gguf", "ggufType": "q4_0"}}, gate={"maxSizeRatio": 0.01})
    rejected = compress(strict, tmp_path / "strict")
    assert rejected.exit_code == ExitCode.REJECTED and "exceeds maxSizeRatio" in rejected.summary.reasons[0]


def test_gguf_artifact_serves_the_weights_torch_had(make_spec: SpecFactory, tmp_path: Path, tiny_model_dir) -> None:
    spec = make_spec({"pruning": {"method": "magnitude", "sparsity": 0.5},
                      "quantization": {"method": "gguf", "ggufType": "f32"}})
    compress(spec, tmp_path / "pruned")
    gguf = load_model(str(tmp_path / "pruned"))
    from gguf import GGUFReader

    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(gguf.model.path).tensors}
    # Pruned zeros survive the export (llama.cpp computes them densely).
    assert (tensors["blk.0.ffn_up.weight"] == 0).mean() == pytest.approx(0.5, abs=0.01)
    assert gguf.model.config.num_hidden_layers == 2


def test_export_refuses_what_llamacpp_would_misread(tiny_model_dir: Path, tmp_path: Path) -> None:
    from stratus_workers.compress.quantize import quantize_model

    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    quantized = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    quantize_model(quantized, "int8-weight", 64, 8)
    with pytest.raises(GGUFExportError, match="needs float weights"):
        check_exportable(quantized)
    loaded.model.config.model_type = "qwen2"
    with pytest.raises(GGUFExportError, match="supports model_type llama"):
        write_gguf(loaded.model, loaded.tokenizer, tmp_path / "x.gguf")


def test_export_round_trips_q_and_k_through_llamas_row_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    write_gguf(loaded.model, loaded.tokenizer, tmp_path / "m.gguf")
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "m.gguf").tensors}
    layer = loaded.model.model.layers[0].self_attn
    q = layer.q_proj.weight.detach().numpy()
    heads, dim = loaded.model.config.num_attention_heads, q.shape[0] // loaded.model.config.num_attention_heads
    # llama.cpp's rope pairs neighbours: row 2i of a head is Hugging Face's row i, row 2i+1 its row i + dim/2.
    ours = tensors["blk.0.attn_q.weight"].reshape(heads, dim, -1)
    theirs = q.reshape(heads, dim, -1)
    assert np.array_equal(ours[:, 0::2], theirs[:, : dim // 2]) and np.array_equal(ours[:, 1::2], theirs[:, dim // 2 :])
    assert np.array_equal(tensors["blk.0.attn_v.weight"], layer.v_proj.weight.detach().numpy())
    assert torch.equal(torch.from_numpy(tensors["token_embd.weight"].copy()), loaded.model.model.embed_tokens.weight)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses the embedding


def test_missing_quantizer_is_bad_input_before_any_work(
    make_spec: SpecFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name: str, *args: object, **kwargs: object) -> object:
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(BadInput, match="needs llama-cpp-python"):
        compress(make_spec({"quantization": {"method": "gguf"}}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
