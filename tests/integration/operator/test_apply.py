"""apply_children against the API emulator: apply what is missing or drifted, nothing else; prune, keep, races."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
import yaml
from kube_emulator import CONFIGMAPS, DEPLOYMENTS, JOBS, PVCS, SERVICES, Emulator
from operator_harness import ROOT

from stratus_operator.apply import AppliedState, apply_children
from stratus_operator.handlers.handle_index_children import index_child
from stratus_operator.indexes import ChildInfo
from stratus_operator.kube import CHILDREN, Kube
from stratus_operator.placement import ClusterView
from stratus_operator.planner import plan
from stratus_operator.render import RenderOptions, render_plan
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.integration

NS = "default"
KEYS = {"Job": JOBS, "Deployment": DEPLOYMENTS, "Service": SERVICES, "ConfigMap": CONFIGMAPS,
        "PersistentVolumeClaim": PVCS, "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
        "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets")}


@pytest.fixture()
async def kube(emulator: Emulator) -> AsyncIterator[Kube]:
    server = str(emulator.url).rstrip("/")
    client = Kube(lambda: kopf.ConnectionInfo(server=server, token="emulator-token"))
    try:
        yield client
    finally:
        await client.close()


def desired(max_batch_size: int = 16) -> list[dict[str, Any]]:
    m = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"].update(uid="u-1", namespace=NS)
    m["spec"]["cloud"]["serving"]["maxBatchSize"] = max_batch_size
    d = LLMDeployment.from_manifest(m)
    return render_plan(plan(d, ClusterView.local(), {}), d, RenderOptions())


def indexed(emu: Emulator) -> dict[tuple[str, str], ChildInfo]:
    """The children as the operator's indexes would hold them, from what the API server has."""
    out: dict[tuple[str, str], ChildInfo] = {}
    for resource in CHILDREN:
        key = KEYS.get(resource.kind)
        for obj in emu.read_all(key, NS) if key else []:
            for info in index_child(obj, NS, resource).values():
                out[(info.kind, info.name)] = info
    return out


def names(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)


async def test_create_then_nothing_then_only_the_change(emulator: Emulator, kube: Kube) -> None:
    first = desired()
    state: AppliedState = {}
    applied = await apply_children(kube, NS, first, {}, state=state)
    assert sorted(applied.created) == names(first) and not applied.patched and not applied.deleted
    assert len(emulator.read_all(DEPLOYMENTS, NS)) == 2  # cloud and router

    again = await apply_children(kube, NS, desired(), indexed(emulator), state=state)
    assert not again, str(again)  # same spec hashes, live objects as the applies left them: no call at all

    changed = await apply_children(kube, NS, desired(max_batch_size=64), indexed(emulator), state=state)
    assert changed.patched == ["Deployment/smollm2-cloud"] and not changed.created and not changed.deleted
    cloud = emulator.read(DEPLOYMENTS, NS, "smollm2-cloud")
    assert cloud is not None and "64" in cloud["spec"]["template"]["spec"]["containers"][0]["command"]


async def test_drift_of_a_child_is_put_back(emulator: Emulator, kube: Kube) -> None:
    state: AppliedState = {}
    await apply_children(kube, NS, desired(), {}, state=state)
    # `kubectl scale deployment smollm2-cloud --replicas 3`: the spec hash annotation is untouched.
    await emulator.patch_obj(DEPLOYMENTS, NS, "smollm2-cloud", {"spec": {"replicas": 3}})
    drift = await apply_children(kube, NS, desired(), indexed(emulator), state=state)
    assert drift.patched == ["Deployment/smollm2-cloud"], str(drift)
    cloud = emulator.read(DEPLOYMENTS, NS, "smollm2-cloud")
    assert cloud is not None and cloud["spec"]["replicas"] == 1
    # Status written by a controller is not drift.
    await emulator.patch_status(DEPLOYMENTS, NS, "smollm2-cloud", {"replicas": 1, "readyReplicas": 1})
    assert not await apply_children(kube, NS, desired(), indexed(emulator), state=state)


async def test_without_memory_every_child_is_applied_once(emulator: Emulator, kube: Kube) -> None:
    await apply_children(kube, NS, desired(), {}, state={})
    # A restarted operator remembers nothing: it applies every child once (idempotent), then nothing.
    state: AppliedState = {}
    restarted = await apply_children(kube, NS, desired(), indexed(emulator), state=state)
    assert sorted(restarted.patched) == sorted(n for n in names(desired()) if not n.startswith(("Job/", "Persis")))
    assert not restarted.created
    assert not await apply_children(kube, NS, desired(), indexed(emulator), state=state)


async def test_prune_and_keep(emulator: Emulator, kube: Kube) -> None:
    objects = desired()
    state: AppliedState = {}
    await apply_children(kube, NS, objects, {}, state=state)
    job = next(o for o in objects if o["kind"] == "Job")["metadata"]["name"]
    router = [o for o in objects if o["metadata"]["name"] == "smollm2-router"]
    rest = [o for o in objects if o not in router]
    # The router left the desired set; the finished Job is kept though absent from it.
    kept = {("Job", job), ("ConfigMap", job)}
    pruned = await apply_children(kube, NS, [o for o in rest if o["metadata"]["name"] != job], indexed(emulator),
                                  keep=kept, state=state)
    assert sorted(pruned.deleted) == names(router) and not pruned.created
    assert emulator.read(DEPLOYMENTS, NS, "smollm2-router") is None
    assert emulator.read(JOBS, NS, job) is not None
    # A kept Job that is gone is not created again.
    await emulator.delete_obj(JOBS, NS, job)
    assert not await apply_children(kube, NS, rest, indexed(emulator), keep=kept, state=state)
    assert emulator.read(JOBS, NS, job) is None


async def test_an_index_behind_our_own_creates_costs_no_duplicate_and_no_error(emulator: Emulator,
                                                                             kube: Kube) -> None:
    state: AppliedState = {}
    await apply_children(kube, NS, desired(), {}, state=state)
    # The index has not seen the creates yet: the Job and the claim are not created twice (409 is fine),
    # the rest is applied again, which changes nothing.
    before = {(o["kind"], o["metadata"]["name"]): o["metadata"]["resourceVersion"]
              for key in KEYS.values() for o in emulator.read_all(key, NS)}
    behind = await apply_children(kube, NS, desired(), {}, state=state)
    assert not behind.deleted and not any(n.startswith(("Job/", "PersistentVolumeClaim/")) for n in behind.created)
    after = {(o["kind"], o["metadata"]["name"]): o["metadata"]["resourceVersion"]
             for key in KEYS.values() for o in emulator.read_all(key, NS)}
    assert after == before
    changed = await apply_children(kube, NS, desired(max_batch_size=32), {}, state=state)
    cloud = emulator.read(DEPLOYMENTS, NS, "smollm2-cloud")
    assert "Deployment/smollm2-cloud" in changed.created and cloud is not None
    assert "32" in cloud["spec"]["template"]["spec"]["containers"][0]["command"]
