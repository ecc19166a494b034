"""Reading observed objects: a Job's compression result from its status and termination message, readiness."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from stratus_operator.observe import job_result, ready_replicas, termination_message
from stratus_workers.compress.spec import CompressionSummary

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
SUMMARY = CompressionSummary(name="int8", status="accepted", size_bytes=1000, perplexity_increase=0.01).to_json()
COMPLETE = {"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T11:00:00Z"}
FAILED = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too slow",
          "lastTransitionTime": "2026-01-01T11:59:50Z"}


def job(*conditions: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {"spec": {"backoffLimit": 0}, "status": {"conditions": list(conditions), **status}}


def test_running_job_has_no_result() -> None:
    assert job_result(job(), None, variant="int8", spec_hash="h") is None
    assert job_result(job({"type": "Complete", "status": "False"}), SUMMARY, variant="int8", spec_hash="h") is None


def test_complete_job_with_summary() -> None:
    r = job_result(job(COMPLETE), SUMMARY, variant="int8", spec_hash="h", now=NOW)
    assert r is not None and r.accepted and r.summary.size_bytes == 1000 and r.spec_hash == "h"


def test_missing_message_waits_then_fails() -> None:
    recent = {**COMPLETE, "lastTransitionTime": "2026-01-01T11:59:55Z"}
    assert job_result(job(recent), None, variant="int8", spec_hash="h", now=NOW) is None
    late = job_result(job(COMPLETE), None, variant="int8", spec_hash="h", now=NOW)
    assert late is not None and late.status == "failed" and late.failure_reason == "NoSummary"


def test_complete_job_with_an_unreadable_summary_fails_saying_why() -> None:
    r = job_result(job(COMPLETE), '{"name": "int8"}', variant="int8", spec_hash="h", now=NOW)
    assert r is not None and r.failure_reason == "NoSummary" and "status: Field required" in r.reasons[0]


def test_failed_job_keeps_its_reason_or_is_a_gate_verdict() -> None:
    r = job_result(job(FAILED), "Traceback...\nMemoryError", variant="int8", spec_hash="h", now=NOW)
    assert r is not None and r.status == "failed" and r.failure_reason == "DeadlineExceeded"
    assert "too slow" in r.reasons[0] and "MemoryError" in r.reasons[0]
    rejected = CompressionSummary(name="int8", status="rejected", reasons=["ppl +9%"]).to_json()
    verdict = job_result(job(FAILED), rejected, variant="int8", spec_hash="h", now=NOW)
    assert verdict is not None and verdict.status == "rejected" and verdict.reasons == ("ppl +9%",)
    crashed = CompressionSummary(name="int8", status="failed", reasons=["RuntimeError: boom"]).to_json()
    r2 = job_result(job(failed=1), crashed, variant="int8", spec_hash="h", now=NOW)
    assert r2 is not None and r2.failure_reason == "BackoffLimitExceeded" and "boom" in r2.reasons[0]


def test_termination_message_from_init_or_main_container() -> None:
    terminated = {"name": "compress", "state": {"terminated": {"exitCode": 0, "message": SUMMARY}}}
    assert termination_message({"status": {"containerStatuses": [terminated]}}) == SUMMARY
    assert termination_message({"status": {"initContainerStatuses": [terminated],
                                           "containerStatuses": [{"name": "upload", "state": {}}]}}) == SUMMARY
    assert termination_message({"status": {"containerStatuses": [{"name": "compress", "state": {"running": {}}}]}}) \
        is None


def test_ready_replicas_waits_for_the_controller_to_see_the_spec() -> None:
    assert ready_replicas({"metadata": {"generation": 2}, "status": {"observedGeneration": 1,
                                                                      "readyReplicas": 3}}) == 0
    assert ready_replicas({"metadata": {"generation": 2}, "status": {"observedGeneration": 2,
                                                                      "readyReplicas": 3}}) == 3
    assert ready_replicas({}) == 0


def test_a_stuck_roll_out_is_not_ready_on_its_old_pods() -> None:
    # The surge pod of a new template cannot be scheduled: the old pod serves, the roll-out has not happened.
    stuck = {"metadata": {"generation": 3}, "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 1,
                                                       "readyReplicas": 1, "availableReplicas": 1}}
    assert ready_replicas(stuck) == 0
    done = {"metadata": {"generation": 3}, "status": {"observedGeneration": 3, "replicas": 1, "updatedReplicas": 1,
                                                      "readyReplicas": 1}}
    assert ready_replicas(done) == 1
    # maxUnavailable 1 with three pods: two new and ready, one old ready, one new starting.
    rolling = {"metadata": {"generation": 3}, "status": {"observedGeneration": 3, "replicas": 3,
                                                         "updatedReplicas": 2, "readyReplicas": 3}}
    assert ready_replicas(rolling) == 2
