"""The local executor's binding of a plan: manifests it refuses, where models lie, cached compression verdicts."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from samples import SMOLLM2, accepted, sample

from stratus_operator.local import LocalRunError, LocalRunner, load_manifest
from stratus_operator.placement import ClusterView
from stratus_operator.planner import Artifact, Source, plan, plan_jobs
from stratus_workers.compress.spec import CompressionSummary

pytestmark = pytest.mark.unit


def test_manifests_it_refuses_are_named(tmp_path: Path) -> None:
    with pytest.raises(LocalRunError, match="no such file"):
        load_manifest(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [")
    with pytest.raises(LocalRunError, match="not valid YAML"):
        load_manifest(bad)
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump_all([sample(), sample()]))
    with pytest.raises(LocalRunError, match="exactly one LLMDeployment; found 2"):
        load_manifest(two)
    wrong = sample()
    wrong["spec"]["cloud"]["replicas"] = -1
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(yaml.safe_dump(wrong))
    with pytest.raises(LocalRunError, match=r"spec\.cloud\.replicas: Input should be greater than or equal to 0"):
        load_manifest(invalid)


def test_model_references_bind_to_the_work_dir(tmp_path: Path) -> None:
    runner = LocalRunner(load_manifest(SMOLLM2), work_dir=tmp_path)
    p = plan(runner.deployment, ClusterView.local(), {"int8": accepted()})
    assert p.cloud is not None and runner.model_path(p.cloud.model) == "bundled://smollm2-135m-instruct"
    edge = p.edge[0]
    assert isinstance(edge.model, Artifact)
    assert runner.model_path(edge.model) == str(tmp_path / "artifacts" / f"int8-{edge.model.spec_hash}")
    assert runner.model_path(Source("/models/x")) == "/models/x"


def test_a_recorded_verdict_is_reused_without_running_the_job(tmp_path: Path) -> None:
    out = io.StringIO()
    runner = LocalRunner(load_manifest(SMOLLM2), work_dir=tmp_path, out=out, python="/nonexistent/python")
    job = plan_jobs(runner.deployment)[0]
    artifact = runner.artifact_dir(Artifact(job.variant, job.spec_hash))
    artifact.parent.mkdir(parents=True)
    rejected = CompressionSummary(name="int8", status="rejected", reasons=["perplexity +9% > +5%"],
                                  size_bytes=5 * 2**20)
    (artifact.parent / f"{artifact.name}.summary.json").write_text(rejected.to_json())
    results = runner.compress()  # a job run would fail: there is no such python
    assert results["int8"].status == "rejected" and results["int8"].spec_hash == job.spec_hash
    assert runner.outcomes[0].cached
    assert out.getvalue() == "compress  int8       rejected (cached): 5 MiB, perplexity +9% > +5%\n"


def test_one_run_per_work_dir(tmp_path: Path) -> None:
    deployment = load_manifest(SMOLLM2)
    first, second = LocalRunner(deployment, work_dir=tmp_path), LocalRunner(deployment, work_dir=tmp_path)
    elsewhere = LocalRunner(deployment, work_dir=tmp_path / "other")
    first.claim()
    try:
        with pytest.raises(LocalRunError, match=r"already running from .*\(pid \d+, started .*--work-dir"):
            second.claim()
        elsewhere.claim()  # its own state: no conflict
        elsewhere.release()
    finally:
        first.release()
    second.claim()  # free again once the first run let go
    second.release()
