"""The artifact format round-trips on its own: quantized and sparse modules saved, found by the loader, loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stratus_workers.models import ModelLoadError, load_model
from stratus_workers.models.artifact import save_artifact
from stratus_workers.models.files import ARTIFACT_FORMAT, MANIFEST_FILE, read_artifact_manifest
from stratus_workers.models.quantized import Int4WeightLinear, Int8WeightLinear, set_module, target_linears
from stratus_workers.models.tiny import bundled_tokenizer, random_llama

pytestmark = pytest.mark.unit


def logits_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("sparse", [False, True])
def test_saved_modules_load_back_as_they_were(tmp_path: Path, sparse: bool) -> None:
    tokenizer = bundled_tokenizer()
    model = random_llama(vocab_size=len(tokenizer), seed=3)
    linears = list(target_linears(model))
    if sparse:  # half of every linear's weights pruned, stored as values plus a bit mask
        with torch.no_grad():
            for _, linear in linears:
                linear.weight[linear.weight.abs() < linear.weight.abs().median()] = 0.0
    else:
        set_module(model, linears[0][0], Int8WeightLinear.from_linear(linears[0][1]))
        set_module(model, linears[1][0], Int4WeightLinear.from_linear(linears[1][1], 32))
    save_artifact(model, tokenizer, tmp_path, sparse=sparse)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": ARTIFACT_FORMAT, "name": "probe", "recipe": "r"}))
    assert read_artifact_manifest(tmp_path) == {"format": ARTIFACT_FORMAT, "name": "probe", "recipe": "r"}
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert (loaded.name, loaded.compression) == ("probe", "r")
    if not sparse:
        assert isinstance(loaded.model.get_submodule(linears[0][0]), Int8WeightLinear)
        assert isinstance(loaded.model.get_submodule(linears[1][0]), Int4WeightLinear)
    ids = [5, 17, 300, 9]
    torch.testing.assert_close(logits_of(loaded.model, ids), logits_of(model, ids), atol=1e-5, rtol=1e-5)


def test_manifests_that_are_not_ours(tmp_path: Path) -> None:
    assert read_artifact_manifest(tmp_path) is None  # a plain model directory
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "someone-else/v3"}))
    assert read_artifact_manifest(tmp_path) is None
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"not valid JSON.*rerun compression"):
        read_artifact_manifest(tmp_path)
