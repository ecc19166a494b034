"""Bad input fails fast with a message naming the field and leaves nothing behind; the gate rejects with reasons."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from stratus_workers.compress.__main__ import run
from stratus_workers.compress.job import BadInput, compress, parse_spec
from stratus_workers.compress.spec import CompressionJobSpec, ExitCode
from stratus_workers.models import ModelLoadError, load_model

pytestmark = pytest.mark.unit

SpecFactory = Callable[..., CompressionJobSpec]


def _spec_document(source: str, compression: dict[str, object]) -> dict[str, object]:
    return {"name": "bad", "modelSource": source, "compression": compression}


@pytest.mark.parametrize(
    ("compression", "field"),
    [
        ({"quantization": {"method": "int3-weight"}}, "compression.quantization.method"),
        ({"pruning": {"method": "wanda", "sparsity": 1.0}}, "compression.pruning.sparsity"),
        ({"pruning": {"method": "wanda", "sparsity": -0.1}}, "compression.pruning.sparsity"),
        ({"pruning": {"method": "random"}}, "compression.pruning.method"),
        ({"pruning": {"method": "wanda", "pattern": "2:4", "sparsity": 0.7}}, "compression.pruning"),
        ({"quantization": {"method": "int4-weight", "groupSize": 48}}, "compression.quantization.groupSize"),
        ({"distillation": {"studentLayers": 0}}, "compression.distillation.studentLayers"),
        ({"sparsification": {}}, "compression.sparsification"),
        ({"quantization": {"method": "int8-weight", "embeddingBits": 4}}, "compression.quantization"),
    ],
)
def test_spec_errors_name_the_field(tiny_model_dir: Path, compression: dict[str, object], field: str) -> None:
    with pytest.raises(BadInput, match=field.replace(".", r"\.")):
        parse_spec(_spec_document(str(tiny_model_dir), compression))


def _assert_nothing_written(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if not p.name.startswith(".") or ".tmp-" in p.name] == []


@pytest.mark.parametrize(
    ("compression", "message"),
    [
        # The tiny model's hidden size is 64: a group of 128 cannot divide it.
        ({"quantization": {"method": "int4-weight", "groupSize": 128}},
         r"compression\.quantization\.groupSize: 128 does not divide the input dimension 64 of model\.layers\.0"),
        ({"distillation": {"studentLayers": 2}}, r"compression\.distillation\.studentLayers: 2 is not fewer"),
        ({"pruning": {"method": "wanda", "calibrationSamples": 4000}}, r"compression\.pruning\.calibrationSamples"),
    ],
)
def test_model_dependent_errors_fail_before_writing(
    make_spec: SpecFactory, tmp_path: Path, compression: dict[str, object], message: str
) -> None:
    out = tmp_path / "out" / "artifact"
    out.parent.mkdir()
    with pytest.raises(BadInput, match=message):
        compress(make_spec(compression), out)
    assert not out.exists()
    _assert_nothing_written(out.parent)


def test_missing_model_names_model_source(make_spec: SpecFactory, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec = make_spec({"quantization": {"method": "int8-weight"}}, source=str(tmp_path / "nowhere"))
    out = tmp_path / "artifact"
    assert run(spec, out, termination_log=tmp_path / "termination-log") == ExitCode.BAD_INPUT
    captured = capsys.readouterr()
    assert "modelSource:" in captured.err and "does not exist" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "failed" and "modelSource" in summary["reasons"][0]
    assert json.loads((tmp_path / "termination-log").read_text()) == summary
    assert not out.exists()


def test_corrupt_model_names_model_source(make_spec: SpecFactory, tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    with pytest.raises(BadInput, match="modelSource: "):
        compress(make_spec({"quantization": {"method": "int8-weight"}}, source=str(broken)), tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()


def test_corrupt_artifact_is_refused_by_the_loader(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    compress(make_spec({"quantization": {"method": "int8-weight"}}), out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(str(out), dtype="float32", device="cpu")


def test_gate_rejects_with_reasons(make_spec: SpecFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = make_spec({"quantization": {"method": "int8-weight"}}, gate={"maxSizeRatio": 0.01, "minAgreement": 0.0})
    out = tmp_path / "artifact"
    assert run(spec, out) == ExitCode.REJECTED
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "rejected"
    assert len(summary["reasons"]) == 1 and "exceeds maxSizeRatio 0.010" in summary["reasons"][0]
    assert "rejected by the quality gate" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "rejected" and manifest["reasons"] == summary["reasons"]


def test_rerun_replaces_the_previous_artifact_whole(make_spec: SpecFactory, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    compress(make_spec({"quantization": {"method": "int8-weight"}}), out)
    compress(make_spec({"quantization": {"method": "int4-weight", "groupSize": 32}}), out)
    assert json.loads((out / "manifest.json").read_text())["recipe"] == "quantize:int4-weight"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["artifact"]
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
