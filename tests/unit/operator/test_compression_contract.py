"""The compression Job's contract, both sides: the real worker's termination message read by the operator, and
its exit codes as the Job's podFailurePolicy treats them (verdicts end the Job; crashes are retried)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from samples import deployment

from stratus_operator.names import COMPRESS_CONTAINER
from stratus_operator.observe import job_result
from stratus_operator.placement import ClusterView
from stratus_operator.planner import plan, plan_jobs
from stratus_operator.render import RenderOptions, render_plan
from stratus_workers.compress.__main__ import run
from stratus_workers.compress.spec import VERDICT_EXIT_CODES, CompressionJobSpec, ExitCode

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
TINY_EVALUATION = {"perplexitySamples": 2, "sequenceLength": 32, "speedTokens": 4, "agreementPrompts": 2,
                   "agreementTokens": 4}


def run_job(source: str, tmp_path: Path, gate: dict[str, Any]) -> tuple[ExitCode, str, Path]:
    """The real worker, as the Job's container runs it; returns its exit code and termination message."""
    spec = CompressionJobSpec.model_validate({"name": "int8", "modelSource": source, "gate": gate,
                                              "compression": {"quantization": {"method": "int8-weight"}},
                                              "evaluation": TINY_EVALUATION})
    log = tmp_path / "termination-log"
    out = tmp_path / "artifact"
    code = run(spec, out, termination_log=log)
    return code, log.read_text(), out


def finished(*, failed: bool, reason: str = "") -> dict[str, Any]:
    """A Job as the Job controller leaves it (the shape the operator's index keeps)."""
    condition = {"type": "Failed" if failed else "Complete", "status": "True", "reason": reason,
                 "lastTransitionTime": "2026-01-01T11:00:00Z"}
    return {"spec": {"backoffLimit": 2}, "status": {"conditions": [condition]}}


def fail_job_exit_codes() -> set[int]:
    """The exit codes of the compress container that fail the rendered Job at once."""
    d = deployment(uid="u")
    job = next(o for o in render_plan(plan(d, ClusterView.local(), {}), d, RenderOptions()) if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    assert COMPRESS_CONTAINER in [c["name"] for c in pod["containers"]]
    (rule,) = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert rule["onExitCodes"]["containerName"] == COMPRESS_CONTAINER and rule["onExitCodes"]["operator"] == "In"
    return set(rule["onExitCodes"]["values"])


def test_an_accepted_run_reads_as_an_accepted_result_with_its_figures(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, message, out = run_job(str(tiny_model_dir), tmp_path, {})
    assert code == ExitCode.OK
    assert capsys.readouterr().out.strip().splitlines()[-1] == message  # stdout's last line is the same
    d = deployment(uid="u")
    spec_hash = plan_jobs(d)[0].spec_hash
    result = job_result(finished(failed=False), message, variant="int8", spec_hash=spec_hash, now=NOW)
    assert result is not None and result.accepted and result.spec_hash == spec_hash
    figures = json.loads((out / "manifest.json").read_text())["figures"]
    summary = result.summary
    assert summary.size_bytes == figures["bytes"] > 0
    assert summary.perplexity_increase == pytest.approx(figures["perplexity_increase"], abs=1e-4)
    assert summary.agreement == pytest.approx(figures["agreement"], abs=1e-4)
    assert summary.artifact == str(out) and summary.recipe == "quantize:int8-weight"
    # The operator places the edge server by the size the worker measured.
    p = plan(d, ClusterView.local(), {"int8": result})
    assert p.effective_policy == "cascade" and p.edge[0].placement.placed


def test_a_gate_rejection_is_a_verdict_the_job_does_not_retry(tiny_model_dir: Path, tmp_path: Path) -> None:
    code, message, _ = run_job(str(tiny_model_dir), tmp_path, {"maxSizeRatio": 0.01})
    assert code == ExitCode.REJECTED and code in fail_job_exit_codes()
    result = job_result(finished(failed=True, reason="PodFailurePolicy"), message, variant="int8", spec_hash="h",
                        now=NOW)
    assert result is not None and result.status == "rejected"
    assert "exceeds maxSizeRatio 0.010" in result.reasons[0]


def test_bad_input_is_a_verdict_and_the_job_fails_with_the_workers_reason(tmp_path: Path) -> None:
    code, message, _ = run_job(str(tmp_path / "nowhere"), tmp_path, {})
    assert code == ExitCode.BAD_INPUT and code in fail_job_exit_codes()
    result = job_result(finished(failed=True, reason="PodFailurePolicy"), message, variant="int8", spec_hash="h",
                        now=NOW)
    assert result is not None and result.status == "failed" and result.failure_reason == "PodFailurePolicy"
    assert "modelSource" in result.reasons[0]


def test_only_verdicts_fail_the_job_at_once() -> None:
    assert fail_job_exit_codes() == {int(c) for c in VERDICT_EXIT_CODES} == {ExitCode.BAD_INPUT, ExitCode.REJECTED}
    assert not fail_job_exit_codes() & {ExitCode.OK, ExitCode.FAILED}  # a crash gets the Job's back-off
