"""The API client's requests as a server receives them: server-side apply, errors by status, RBAC honesty."""

from __future__ import annotations

import pytest
from api_recorder import Recorder, api_server

from stratus_operator.kube import DEPLOYMENTS, FIELD_MANAGER, LLMDEPLOYMENTS, NODES, PODS, Kube, KubeError, NotFound

pytestmark = pytest.mark.unit

__all__ = ["api_server"]  # the fixture, imported for pytest


async def test_apply_is_a_forced_server_side_apply_by_our_field_manager(api_server: tuple[Recorder, Kube]) -> None:
    recorder, kube = api_server
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "smollm2-cloud", "namespace": "ns"},
            "spec": {"replicas": 1}}
    recorder.answers.append((200, {**body, "metadata": {**body["metadata"], "resourceVersion": "7"}}))
    live = await kube.apply(DEPLOYMENTS, "ns", body)
    assert live["metadata"]["resourceVersion"] == "7"
    (sent,) = recorder.requests
    assert sent["method"] == "PATCH" and sent["path"] == "/apis/apps/v1/namespaces/ns/deployments/smollm2-cloud"
    assert sent["content_type"] == "application/apply-patch+yaml"
    assert sent["query"] == {"fieldManager": FIELD_MANAGER, "force": "true"} and FIELD_MANAGER == "stratus-operator"
    # The whole desired object: what it no longer holds, the API server removes.
    assert sent["body"] == body


async def test_errors_carry_the_status_and_message(api_server: tuple[Recorder, Kube]) -> None:
    recorder, kube = api_server
    recorder.answers.append((404, {"kind": "Status", "reason": "NotFound", "message": "not there"}))
    with pytest.raises(NotFound):
        await kube.get(LLMDEPLOYMENTS, "ns", "x")
    recorder.answers.append((403, {"kind": "Status", "reason": "Forbidden",
                                   "message": "namespace ns is being terminated"}))
    with pytest.raises(KubeError) as caught:
        await kube.apply(DEPLOYMENTS, "ns", {"metadata": {"name": "x"}})
    assert caught.value.status == 403 and "being terminated" in caught.value.message


async def test_calls_outside_the_declared_verbs_are_refused_before_the_wire(api_server: tuple[Recorder, Kube]) -> None:
    recorder, kube = api_server
    with pytest.raises(RuntimeError, match=r"not declared in kube\.RESOURCES"):
        await kube.apply(NODES, None, {"metadata": {"name": "n"}})
    assert recorder.requests == []


def test_a_resources_urls_start_at_its_group_path() -> None:
    """The group version's path (what discovery GETs) is where every URL of its resources starts."""
    assert LLMDEPLOYMENTS.group_path == "/apis/stratus.dev/v1alpha1" and PODS.group_path == "/api/v1"
    for resource in (LLMDEPLOYMENTS, DEPLOYMENTS, PODS, NODES):
        assert resource.url("ns", "x").startswith(resource.group_path + "/")
