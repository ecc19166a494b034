"""What of a child's change matters to its owner: readiness, a Job's end, a termination message."""

from __future__ import annotations

import pytest

from stratus_operator.handlers.handle_event_child import signature

pytestmark = pytest.mark.unit


def test_a_deployment_reports_once_it_has_replicas() -> None:
    assert signature("Deployment", {"status": {}}) is None
    body = {"metadata": {"generation": 2}, "status": {"observedGeneration": 2, "replicas": 2, "readyReplicas": 1}}
    assert signature("Deployment", body) == (1, 2, 2)


def test_a_job_reports_when_it_ends() -> None:
    assert signature("Job", {"status": {"active": 1}}) is None
    assert signature("Job", {"status": {"succeeded": 1}}) == (True, False, "Complete")
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}
    assert signature("Job", failed) == (False, True, "DeadlineExceeded")


def test_a_pod_reports_its_termination_message() -> None:
    assert signature("Pod", {"status": {}}) is None
    terminated = {"containerStatuses": [{"name": "compress", "state": {"terminated": {"message": "{}"}}}]}
    assert signature("Pod", {"status": terminated}) == ("{}",)
    assert signature("Service", {}) is None
