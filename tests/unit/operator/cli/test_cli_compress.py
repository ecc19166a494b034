"""`stratus compress -f MANIFEST --variant NAME --out DIR` builds the variant's Job spec and runs the worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import yaml

from stratus_operator.cli import main
from stratus_operator.cli.compress import job_spec_document
from stratus_workers.compress.job import BadInput, parse_spec
from stratus_workers.compress.spec import CompressionRecipe, QualityGate, Quantization

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).resolve().parents[4] / "deploy" / "samples"


@pytest.mark.parametrize("sample", ["smollm2.yaml", "smollm2-compression.yaml", "smollm2-compression-gpu.yaml"])
def test_every_sample_variant_is_a_valid_job_spec(sample: str) -> None:
    manifest = yaml.safe_load((SAMPLES / sample).read_text())
    for variant in manifest["spec"]["edge"]["variants"]:
        spec = parse_spec(job_spec_document(manifest, variant["name"]))
        assert spec.model_source == manifest["spec"]["model"]["source"]


def test_compression_sample_exercises_every_method() -> None:
    manifest = yaml.safe_load((SAMPLES / "smollm2-compression.yaml").read_text())
    variants = manifest["spec"]["edge"]["variants"]
    specs = [parse_spec(job_spec_document(manifest, v["name"])).compression for v in variants]
    every_method = set(get_args(Quantization.model_fields["method"].annotation))
    assert {s.quantization.method for s in specs if s.quantization} == every_method
    assert {(s.pruning.method, s.pruning.pattern) for s in specs if s.pruning} >= {
        ("magnitude", "unstructured"), ("wanda", "unstructured"), ("wanda", "2:4")}
    assert any(s.distillation for s in specs)


def test_gpu_sample_holds_the_recipes_the_gpu_bench_ran() -> None:
    """docs/benchmarks.md's GPU rows and the gates they passed are for exactly the sample's recipes."""
    manifest = yaml.safe_load((SAMPLES / "smollm2-compression-gpu.yaml").read_text())
    results = SAMPLES.parents[1] / "tests" / "bench" / "results" / "compress-gpu"
    ran: dict[str, dict[str, object]] = {}
    # The main run, then later runs (`--as-sampled`), which replace its rows of the same variant.
    for path in [results / "gpu-compress.json", *sorted(results.glob("gpu-compress-*.json"))]:
        ran.update({row["name"]: row for row in json.loads(path.read_text())["rows"]})
    assert set(ran) == {v["name"] for v in manifest["spec"]["edge"]["variants"]}
    for name, row in ran.items():
        spec = parse_spec(job_spec_document(manifest, name))
        # The stored recipe read by today's model: a field added since the run (ggufType) takes its default.
        ran_recipe = CompressionRecipe.model_validate(row["compression"])
        assert ran_recipe == spec.compression, name
        assert QualityGate.model_validate(row["gate"]) == spec.gate, name


def test_unknown_variant_is_named() -> None:
    manifest = yaml.safe_load((SAMPLES / "smollm2.yaml").read_text())
    with pytest.raises(BadInput, match=r"--variant: no edge variant named 'nope'; spec\.edge\.variants has int8"):
        job_spec_document(manifest, "nope")


def test_cli_compresses_a_variant(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = {
        "apiVersion": "stratus.dev/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "tiny"},
        "spec": {"model": {"source": str(tiny_model_dir)}, "edge": {"variants": [{
            "name": "int4", "compression": {"quantization": {"method": "int4-weight", "groupSize": 32}},
            "evaluation": {"perplexitySamples": 2, "sequenceLength": 32, "speedTokens": 4, "agreementPrompts": 2,
                           "agreementTokens": 4},
            "gate": {"maxSizeRatio": 0.5},
        }]}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "int4"
    assert main(["compress", "-f", str(path), "--variant", "int4", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "accepted" and summary["recipe"] == "quantize:int4-weight"
    assert (out / "manifest.json").is_file()
    assert main(["compress", "-f", str(path), "--variant", "int8", "--out", str(out)]) == 2
