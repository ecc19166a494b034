"""PATCH as a real server does it: merge, JSON patch, strategic merge by the kind's merge keys, server-side apply."""

from __future__ import annotations

from typing import Any

import pytest
from harness_objects import deployment
from kube_emulator import DEPLOYMENTS, LLMD, ApiError, Emulator
from kube_emulator.patch import JSON, STRATEGIC
from operator_harness import ROOT

pytestmark = pytest.mark.unit


def _with_fetch(dep: dict[str, Any]) -> dict[str, Any]:
    """The cloud Deployment as an s3:// source renders it: an init container mounting the cache volume."""
    spec = dep["spec"]["template"]["spec"]
    spec["initContainers"] = [{"name": "fetch-model", "image": "aws:1",
                               "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}]
    spec["volumes"] = [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    spec["nodeSelector"] = {"pool": "a100"}
    return dep


def _without_fetch(dep: dict[str, Any]) -> dict[str, Any]:
    dep["spec"]["template"]["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {}}]
    return dep


def _pod(emu: Emulator, name: str = "web") -> dict[str, Any]:
    return (emu.read(DEPLOYMENTS, "default", name) or {})["spec"]["template"]["spec"]  # type: ignore[no-any-return]


async def test_merge_patch_of_the_whole_object_keeps_removed_keys_and_its_result_is_refused(emu: Emulator) -> None:
    """What section 2.3 of the issue describes: the init container outlives its volume, and the API says 422."""
    await emu.create_obj(DEPLOYMENTS, "default", _with_fetch(deployment()))
    with pytest.raises(ApiError) as refused:
        await emu.patch_obj(DEPLOYMENTS, "default", "web", _without_fetch(deployment()))
    assert refused.value.code == 422
    assert 'spec.template.spec.initContainers[0].volumeMounts[0].name: Not found: "cache"' in refused.value.message
    # Nothing was stored.
    assert [v["name"] for v in _pod(emu)["volumes"]] == ["cache", "tmp"]


async def test_merge_patch_null_removes_a_key(emu: Emulator) -> None:
    await emu.create_obj(DEPLOYMENTS, "default", _with_fetch(deployment()))
    await emu.patch_obj(DEPLOYMENTS, "default", "web", {"spec": {"template": {"spec": {"nodeSelector": None}}}})
    assert "nodeSelector" not in _pod(emu)


async def test_json_patch_test_failure_is_422_and_changes_nothing(emu: Emulator) -> None:
    await emu.create_obj(DEPLOYMENTS, "default", deployment())
    with pytest.raises(ApiError) as refused:
        await emu.patch_obj(DEPLOYMENTS, "default", "web", [
            {"op": "test", "path": "/spec/replicas", "value": 3},
            {"op": "replace", "path": "/spec/replicas", "value": 5}], json_patch=True)
    assert refused.value.code == 422
    assert (emu.read(DEPLOYMENTS, "default", "web") or {})["spec"]["replicas"] == 1
    await emu.patch_obj(DEPLOYMENTS, "default", "web", [
        {"op": "test", "path": "/spec/replicas", "value": 1},
        {"op": "replace", "path": "/spec/replicas", "value": 5}], patch_type=JSON)
    assert (emu.read(DEPLOYMENTS, "default", "web") or {})["spec"]["replicas"] == 5


async def test_strategic_merge_merges_containers_env_and_ports_by_their_keys(emu: Emulator) -> None:
    dep = deployment()
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "A", "value": "1"}]
    container["ports"] = [{"name": "grpc", "containerPort": 50051}]
    dep["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "envoy:1"})
    dep["spec"]["template"]["spec"]["tolerations"] = [{"key": "a", "operator": "Exists"}]
    await emu.create_obj(DEPLOYMENTS, "default", dep)
    await emu.patch_obj(DEPLOYMENTS, "default", "web", {"spec": {"template": {"spec": {
        "containers": [{"name": "c", "env": [{"name": "B", "value": "2"}],
                        "ports": [{"name": "http", "containerPort": 8080}]}],
        "tolerations": [{"key": "b", "operator": "Exists"}]}}}}, patch_type=STRATEGIC)
    pod = _pod(emu)
    assert [c["name"] for c in pod["containers"]] == ["c", "sidecar"]  # merged by name, the sidecar kept
    assert [e["name"] for e in pod["containers"][0]["env"]] == ["A", "B"]
    assert [p["containerPort"] for p in pod["containers"][0]["ports"]] == [50051, 8080]
    assert pod["tolerations"] == [{"key": "b", "operator": "Exists"}]  # no merge key: replaced
    await emu.patch_obj(DEPLOYMENTS, "default", "web", {"spec": {"template": {"spec": {
        "containers": [{"name": "sidecar", "$patch": "delete"}]}}}}, patch_type=STRATEGIC)
    assert [c["name"] for c in _pod(emu)["containers"]] == ["c"]


async def test_strategic_merge_is_refused_for_custom_resources(emu: Emulator) -> None:
    import yaml

    await emu.create_obj(LLMD, "default", yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text()))
    with pytest.raises(ApiError) as refused:
        await emu.patch_obj(LLMD, "default", "smollm2", {"spec": {}}, patch_type=STRATEGIC)
    assert refused.value.code == 415


# --- server-side apply ------------------------------------------------------------------------------------------


async def _apply(emu: Emulator, body: dict[str, Any], manager: str = "stratus-operator", force: bool = True,
                 name: str = "web") -> dict[str, Any]:
    with emu.acting_as(manager, force=force):
        return await emu.apply_obj(DEPLOYMENTS, "default", name, body)


async def test_apply_removes_what_the_manager_no_longer_sends(emu: Emulator) -> None:
    await _apply(emu, _with_fetch(deployment()))
    applied = await _apply(emu, _without_fetch(deployment()))
    pod = applied["spec"]["template"]["spec"]
    assert "initContainers" not in pod and "nodeSelector" not in pod
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    managers = {(m["manager"], m["operation"]) for m in applied["metadata"]["managedFields"]}
    assert managers == {("stratus-operator", "Apply")}


async def test_apply_keeps_a_field_another_manager_owns(emu: Emulator) -> None:
    await _apply(emu, deployment())
    with emu.acting_as("kubectl-label"):
        await emu.patch_obj(DEPLOYMENTS, "default", "web", {"metadata": {"labels": {"team": "ml"}}})
    body = deployment()
    del body["metadata"]["labels"]
    applied = await _apply(emu, body)
    assert applied["metadata"]["labels"] == {"team": "ml"}  # the operator's "app" went, kubectl's stayed


async def test_apply_conflicts_without_force_and_takes_the_field_with_force(emu: Emulator) -> None:
    await _apply(emu, deployment())
    with emu.acting_as("kubectl"):  # `kubectl scale --replicas 5`: an Update that takes spec.replicas
        await emu.patch_obj(DEPLOYMENTS, "default", "web", {"spec": {"replicas": 5}})
    with pytest.raises(ApiError) as refused:
        await _apply(emu, deployment(), force=False)
    assert refused.value.code == 409
    assert refused.value.message == ('Apply failed with 1 conflict: conflict with "kubectl" using apps/v1: '
                                     ".spec.replicas")
    applied = await _apply(emu, deployment(), force=True)
    assert applied["spec"]["replicas"] == 1
    owners = {m["manager"]: m["fieldsV1"] for m in applied["metadata"]["managedFields"]}
    assert "f:replicas" in owners["stratus-operator"]["f:spec"]
    assert "kubectl" not in owners  # it owned nothing else


async def test_apply_with_the_same_value_shares_ownership_without_conflict(emu: Emulator) -> None:
    await _apply(emu, deployment(), manager="a")
    applied = await _apply(emu, deployment(), manager="b", force=False)
    assert {m["manager"] for m in applied["metadata"]["managedFields"]} == {"a", "b"}


async def test_apply_creates_and_its_result_is_validated(emu: Emulator) -> None:
    broken = deployment("bad")
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "cache", "mountPath": "/c"}]
    with pytest.raises(ApiError, match='Not found: "cache"'):
        await _apply(emu, broken, name="bad")
    assert emu.read(DEPLOYMENTS, "default", "bad") is None
    created = await _apply(emu, deployment("fresh"), name="fresh")
    assert created["metadata"]["managedFields"][0]["operation"] == "Apply"
