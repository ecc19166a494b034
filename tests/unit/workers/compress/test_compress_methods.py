"""Each compression method on the tiny random model: sizes shrink, sparsity is reached, artifacts load and generate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from stratus_workers.compress.job import compress, gate_reasons
from stratus_workers.compress.prune import pattern_violations
from stratus_workers.compress.spec import CompressionJobSpec, ExitCode
from stratus_workers.models.artifact import WEIGHTS_FILE
from stratus_workers.models.loader import load_model
from stratus_workers.models.quantized import (
    DynamicInt8Linear,
    Int4Embedding,
    Int4WeightLinear,
    Int8Embedding,
    Int8WeightLinear,
)

pytestmark = pytest.mark.unit

SpecFactory = Callable[..., CompressionJobSpec]


def _generate(out: Path) -> tuple[Any, str]:
    loaded = load_model(str(out), dtype="float32", device="cpu")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    generated = loaded.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                      pad_token_id=loaded.tokenizer.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 6
    return loaded, loaded.tokenizer.decode(generated[0, ids.shape[1]:])


@pytest.mark.parametrize(
    ("method", "group_size", "linear_type", "max_ratio"),
    [("int8-weight", 64, Int8WeightLinear, 0.27), ("int4-weight", 32, Int4WeightLinear, 0.27),
     ("int8-dynamic", 64, DynamicInt8Linear, 0.27)],
)
def test_quantized_artifact_is_smaller_loads_and_generates(
    make_spec: SpecFactory, tmp_path: Path, method: str, group_size: int, linear_type: type, max_ratio: float
) -> None:
    out = tmp_path / "artifact"
    result = compress(make_spec({"quantization": {"method": method, "groupSize": group_size}}), out)
    assert result.exit_code == ExitCode.OK
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "stratus-artifact/v1"
    assert manifest["status"] == "accepted" and manifest["recipe"] == f"quantize:{method}"
    figures = manifest["figures"]
    assert figures["bytes"] == (out / WEIGHTS_FILE).stat().st_size
    # The model server may run as another user: the artifact must be world-readable.
    assert out.stat().st_mode & 0o755 == 0o755 and (out / WEIGHTS_FILE).stat().st_mode & 0o044 == 0o044
    assert figures["size_ratio"] < max_ratio  # the tiny model is almost all (int8) embedding
    loaded, _ = _generate(out)
    layer = loaded.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, linear_type)
    assert isinstance(loaded.model.model.embed_tokens, Int8Embedding)
    assert loaded.compression == f"quantize:{method}"
    # Quantization of a random model barely moves its (near-uniform) predictions.
    assert abs(figures["perplexity_increase"]) < 0.05
    assert figures["agreement"] > 0.5


def test_int4_embedding_is_shared_with_the_head_and_smaller(make_spec: SpecFactory, tmp_path: Path) -> None:
    ratios = {}
    for bits in (8, 4):
        out = tmp_path / f"e{bits}"
        result = compress(make_spec({"quantization": {"method": "int4-weight", "groupSize": 32,
                                                      "embeddingBits": bits}}), out)
        ratios[bits] = result.manifest["figures"]["size_ratio"]
        loaded, _ = _generate(out)
        if bits == 4:
            model = loaded.model
            assert isinstance(model.model.embed_tokens, Int4Embedding)
            assert isinstance(model.lm_head, Int4WeightLinear)
            assert model.lm_head.qweight.data_ptr() == model.model.embed_tokens.qweight.data_ptr()
            ids = torch.tensor([[5, 17, 300]])
            rows = model.model.embed_tokens(ids)[0]
            assert torch.allclose(rows, model.lm_head.dequantized()[ids[0]], atol=1e-6)
    # Tiny model: the embedding is nearly everything, so 4 bits (+ bf16 pairs per 32) is ~0.16 vs ~0.27.
    assert ratios[4] < 0.7 * ratios[8]


def test_int4_linears_take_about_half_the_int8_bytes(make_spec: SpecFactory, tmp_path: Path) -> None:
    sizes = {}
    for method in ("int8-weight", "int4-weight"):
        out = tmp_path / method
        compress(make_spec({"quantization": {"method": method, "groupSize": 32}}), out)
        layout = json.loads((out / "layout.json").read_text())
        assert len([n for n, m in layout["modules"].items() if m["kind"] == method and ".layers." in n]) == 14
        from safetensors.torch import load_file

        tensors = load_file(str(out / WEIGHTS_FILE))
        sizes[method] = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".layers." in k)
    # int4 codes are half of int8's; bf16 scale and zero per group of 32 add a quarter of that half.
    assert sizes["int4-weight"] < 0.7 * sizes["int8-weight"]


@pytest.mark.parametrize(("method", "pattern"), [("magnitude", "unstructured"), ("wanda", "unstructured"),
                                                 ("wanda", "2:4"), ("magnitude", "2:4")])
def test_pruning_reaches_the_sparsity_and_is_stored_sparse(
    make_spec: SpecFactory, tmp_path: Path, method: str, pattern: str
) -> None:
    out = tmp_path / "pruned"
    pruning = {"method": method, "pattern": pattern, "sparsity": 0.5, "calibrationSamples": 4}
    result = compress(make_spec({"pruning": pruning}), out)
    assert result.exit_code == ExitCode.OK
    assert result.summary.sparsity == pytest.approx(0.5, abs=0.005)
    loaded, _ = _generate(out)
    weights = [m.weight for name, m in loaded.model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name]
    assert len(weights) == 14
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.005)  # measured on what the server loads
    if pattern == "2:4":
        for w in weights:
            per_group = (w.reshape(w.shape[0], -1, 4) != 0).sum(dim=-1)
            assert int(per_group.max()) <= 2
    layout = json.loads((out / "layout.json").read_text())
    assert {m["kind"] for m in layout["modules"].values()} == {"sparse"}
    assert result.manifest["figures"]["bytes"] < result.manifest["figures"]["fp32_bytes"]


def test_wanda_keeps_weights_on_high_activation_inputs(make_spec: SpecFactory, tmp_path: Path) -> None:
    """Wanda and magnitude differ: the activation norms change which weights survive."""
    masks = {}
    for method in ("magnitude", "wanda"):
        out = tmp_path / method
        compress(make_spec({"pruning": {"method": method, "sparsity": 0.5, "calibrationSamples": 4}}), out)
        q = load_model(str(out), dtype="float32", device="cpu").model.model.layers[0].mlp.down_proj.weight
        masks[method] = q != 0
    assert (masks["magnitude"] != masks["wanda"]).float().mean() > 0.05


def test_recovery_fine_tune_runs_and_keeps_the_mask(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "recovered"
    pruning = {"method": "wanda", "sparsity": 0.5, "calibrationSamples": 4, "recoverySteps": 3,
               "recoveryBatchSize": 2, "recoverySequenceLength": 32, "recoveryLearningRate": 1e-3}
    result = compress(make_spec({"pruning": pruning}), out)
    figures = result.manifest["figures"]["pruning"]
    assert figures["sparsity"] == pytest.approx(figures["sparsity_after_pruning"])
    assert figures["recovery_first_loss"] != figures["recovery_last_loss"]


def test_two_four_recovery_keeps_the_pattern_in_the_artifact(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "recovered-2-4"
    pruning = {"method": "wanda", "pattern": "2:4", "calibrationSamples": 4, "recoverySteps": 3,
               "recoveryBatchSize": 2, "recoverySequenceLength": 32, "recoveryLearningRate": 1e-2}
    result = compress(make_spec({"pruning": pruning}), out)
    figures = result.manifest["figures"]["pruning"]
    assert figures["recovery_first_loss"] != figures["recovery_last_loss"]  # the kept weights moved
    assert figures["pattern_violations"] == 0 and result.exit_code == ExitCode.OK
    model = load_model(str(out), dtype="float32", device="cpu").model
    assert pattern_violations(model) == 0
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():  # one group of 4 with three nonzeros: the check counts it
        weight[0, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert pattern_violations(model) == 1


def test_a_broken_two_four_pattern_is_a_gate_reason(make_spec: SpecFactory) -> None:
    spec = make_spec({"pruning": {"method": "wanda", "pattern": "2:4", "calibrationSamples": 4}})
    figures = {"perplexity_increase": 0.0, "agreement": 1.0, "size_ratio": 1.0}
    assert gate_reasons(spec, {**figures, "pruning": {"pattern_violations": 0}}) == []
    assert gate_reasons(spec, {**figures, "pruning": {"pattern_violations": 7}}) == [
        "the artifact breaks the 2:4 pattern in 7 groups of 4 weights"]


def test_distilled_student_has_fewer_layers_and_generates(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "student"
    distillation = {"studentLayers": 1, "steps": 3, "batchSize": 2, "sequenceLength": 32, "learningRate": 1e-3}
    result = compress(make_spec({"distillation": distillation}), out)
    assert result.exit_code == ExitCode.OK
    assert result.manifest["figures"]["distillation"]["teacher_layers_kept"] == [1]
    loaded, _ = _generate(out)
    assert loaded.model.config.num_hidden_layers == 1 and len(loaded.model.model.layers) == 1
    assert result.manifest["figures"]["bytes"] < result.manifest["figures"]["fp32_bytes"]
    assert not (tmp_path / ".student.work").exists()  # checkpoints are dropped once the artifact is whole


def test_all_three_methods_compose(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "all"
    recipe = {"distillation": {"studentLayers": 1, "steps": 2, "batchSize": 2, "sequenceLength": 32},
              "pruning": {"method": "magnitude", "pattern": "2:4"},
              "quantization": {"method": "int8-weight"}}
    result = compress(make_spec(recipe), out)
    assert result.summary.recipe == "distill:1L+prune:magnitude-2:4+quantize:int8-weight"
    loaded, _ = _generate(out)
    weight = loaded.model.model.layers[0].mlp.up_proj.qweight
    assert float((weight == 0).float().mean()) >= 0.5  # symmetric int8 keeps pruned zeros exactly zero
