"""The reconcile's reading of compression results: from the Jobs, else from status; failed Jobs rerun on a new spec."""

from __future__ import annotations

from typing import Any

import pytest
from samples import deployment

from stratus_operator.handlers.handle_reconcile_llmdeployment import gather_results, invalid_message
from stratus_operator.indexes import ChildInfo, Observed
from stratus_operator.planner import plan_jobs
from stratus_operator.spec import LLMDeployment, LLMDeploymentStatus, VariantStatus
from stratus_workers.compress.spec import CompressionSummary

pytestmark = pytest.mark.unit

SUMMARY = CompressionSummary(name="int8", status="accepted", size_bytes=123, agreement=0.9).to_json()


def dep(generation: int = 4) -> LLMDeployment:
    return deployment(uid="u", namespace="prod", generation=generation)


def job_child(name: str, *, failed: bool = False, generation: int | None = 4) -> ChildInfo:
    condition = {"type": "Failed" if failed else "Complete", "status": "True",
                 "lastTransitionTime": "2020-01-01T00:00:00Z", "reason": "BackoffLimitExceeded" if failed else ""}
    return ChildInfo("batch/v1", "Job", name, "h", job={"spec": {"backoffLimit": 2},
                                                       "status": {"conditions": [condition]},
                                                       "generation": generation})


def observed_message(namespace: str, job: str, message: str) -> Observed:
    return Observed({"stratus_pods": {("job", namespace, job): [message]}})


def previous(state: str, job: str, observed_generation: int = 4, **figures: Any) -> LLMDeploymentStatus:
    return LLMDeploymentStatus(observed_generation=observed_generation, variants=[
        VariantStatus(name="int8", state=state, job=job, **figures)])  # type: ignore[arg-type]


def test_a_finished_job_gives_its_result() -> None:
    d = dep()
    job = plan_jobs(d)[0]
    results, retry = gather_results(d, observed_message("prod", job.name, SUMMARY),
                                    {("Job", job.name): job_child(job.name)}, None)
    assert retry == [] and results["int8"].summary.size_bytes == 123
    assert results["int8"].spec_hash == job.spec_hash


def test_a_job_that_failed_at_an_older_generation_is_run_again() -> None:
    d = dep(generation=5)
    job = plan_jobs(d)[0]
    results, retry = gather_results(d, Observed({}), {("Job", job.name): job_child(job.name, failed=True)}, None)
    assert retry == [job.name] and results == {}
    same = gather_results(dep(generation=4), Observed({}),
                          {("Job", job.name): job_child(job.name, failed=True)}, None)
    assert same[1] == [] and same[0]["int8"].status == "failed"


def test_a_deleted_jobs_result_is_read_back_from_status() -> None:
    d = dep()
    job = plan_jobs(d)[0]
    results, _ = gather_results(d, Observed({}), {}, previous("Accepted", job.name, size_bytes=77, agreement=0.5))
    assert results["int8"].accepted and results["int8"].summary.size_bytes == 77
    assert results["int8"].summary.agreement == 0.5
    # Another recipe's Job in status says nothing about this one.
    assert gather_results(d, Observed({}), {}, previous("Accepted", "smollm2-compress-int8-old"))[0] == {}


def test_a_failure_in_status_is_kept_until_the_spec_changes() -> None:
    d = dep()
    job = plan_jobs(d)[0]
    failed = previous("Failed", job.name, reasons=["DeadlineExceeded: too slow"])
    results, _ = gather_results(d, Observed({}), {}, failed)
    assert results["int8"].failure_reason == "DeadlineExceeded"
    older = previous("Failed", job.name, observed_generation=3, reasons=["DeadlineExceeded: too slow"])
    assert gather_results(d, Observed({}), {}, older)[0] == {}


def test_invalid_message_names_each_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        LLMDeployment.from_body({"metadata": {"name": "m"}, "spec": {"model": {"source": ""},
                                                                      "cloud": {"replicas": -1}}})
    message = invalid_message(info.value)
    assert "model.source: String should have at least 1 character" in message
    assert "cloud.replicas: Input should be greater than or equal to 0" in message
