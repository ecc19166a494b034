"""apply_children's calls as the API server sees them: applies, create-only kinds, fields an older operator set."""

from __future__ import annotations

from typing import Any

import pytest
from api_recorder import Recorder, api_server

from stratus_operator.apply import AppliedState, adopt_legacy_fields, apply_children, live_fingerprint
from stratus_operator.indexes import ChildInfo
from stratus_operator.kube import FIELD_MANAGER, Kube

pytestmark = pytest.mark.unit

__all__ = ["api_server"]  # the fixture, imported for pytest

CLOUD: dict[str, Any] = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "m-cloud", "namespace": "ns", "annotations": {"stratus.dev/spec-hash": "h1"}},
    "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "server"}]}}},
}
JOB: dict[str, Any] = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "m-compress-int8-abc",
                                                                             "namespace": "ns"}, "spec": {}}


def legacy(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` as an older operator left it: created by POST, merge-patched, an init container since dropped."""
    fields = {"f:spec": {"f:template": {"f:spec": {"f:initContainers": {}, "f:containers": {}}}}}
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": "41", "managedFields": [
        {"manager": FIELD_MANAGER, "operation": "Update", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
         "fieldsV1": fields},
        {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
         "fieldsV1": {"f:status": {}}},
    ]}}


def test_adopting_legacy_fields_moves_them_to_our_apply_entry() -> None:
    ops = adopt_legacy_fields(legacy(CLOUD))
    assert ops is not None
    assert ops[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "41"}
    entries = ops[1]["value"]
    assert [(e["manager"], e["operation"]) for e in entries] == [
        ("kube-controller-manager", "Update"), (FIELD_MANAGER, "Apply")]
    assert "f:initContainers" in entries[1]["fieldsV1"]["f:spec"]["f:template"]["f:spec"]
    # Nothing to adopt once our fields are under Apply.
    assert adopt_legacy_fields({**CLOUD, "metadata": {**CLOUD["metadata"], "managedFields": entries}}) is None
    assert adopt_legacy_fields(CLOUD) is None


async def test_an_upgraded_operator_adopts_then_applies_again(api_server: tuple[Recorder, Kube]) -> None:
    recorder, kube = api_server
    recorder.answers += [(200, legacy(CLOUD)), (200, {}), (200, CLOUD)]
    info = ChildInfo("apps/v1", "Deployment", "m-cloud", "h0", live="old")
    state: AppliedState = {}
    applied = await apply_children(kube, "ns", [CLOUD], {("Deployment", "m-cloud"): info}, state=state)
    assert applied.patched == ["Deployment/m-cloud"]
    calls = [(r["method"], r["content_type"]) for r in recorder.requests]
    assert calls == [("PATCH", "application/apply-patch+yaml"), ("PATCH", "application/json-patch+json"),
                     ("PATCH", "application/apply-patch+yaml")]
    assert state[("Deployment", "m-cloud")][:2] == ("h1", live_fingerprint(CLOUD))


async def test_jobs_are_created_never_applied_and_an_unchanged_child_costs_nothing(
        api_server: tuple[Recorder, Kube]) -> None:
    recorder, kube = api_server
    children = {("Job", JOB["metadata"]["name"]): ChildInfo("batch/v1", "Job", JOB["metadata"]["name"], ""),
                ("Deployment", "m-cloud"): ChildInfo("apps/v1", "Deployment", "m-cloud", "h1",
                                                     live=live_fingerprint(CLOUD))}
    state: AppliedState = {("Deployment", "m-cloud"): ("h1", live_fingerprint(CLOUD), 0.0)}
    assert not await apply_children(kube, "ns", [JOB, CLOUD], children, state=state)
    assert recorder.requests == []  # a Job's spec is immutable: an existing one is left alone
    await apply_children(kube, "ns", [{**JOB, "metadata": {**JOB["metadata"], "name": "m-compress-int8-def"}}],
                         children, state=state)
    assert [(r["method"], r["path"].rsplit("/", 1)[-1]) for r in recorder.requests[:1]] == [("POST", "jobs")]


async def test_a_child_missing_from_the_index_is_applied_again_unless_just_applied(
        api_server: tuple[Recorder, Kube]) -> None:
    recorder, kube = api_server
    recorder.answers += [(200, CLOUD)]
    # Applied long ago and gone from the index: someone deleted it; the apply creates it again.
    state: AppliedState = {("Deployment", "m-cloud"): ("h1", live_fingerprint(CLOUD), 0.0)}
    assert (await apply_children(kube, "ns", [CLOUD], {}, state=state)).created == ["Deployment/m-cloud"]
    # Applied a moment ago: the watch has not brought it to the index yet; no second call.
    assert not await apply_children(kube, "ns", [CLOUD], {}, state=state)
    assert len(recorder.requests) == 1
