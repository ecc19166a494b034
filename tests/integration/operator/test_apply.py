"""apply_children against the API emulator: create what is missing, patch only drift, prune, keep, race the index."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
import yaml
from kube_emulator import CONFIGMAPS, DEPLOYMENTS, JOBS, PVCS, SERVICES, Emulator
from operator_harness import ROOT

from stratus_operator.apply import apply_children
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
        "PersistentVolumeClaim": PVCS}


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


async def test_create_then_nothing_then_only_the_drift(emulator: Emulator, kube: Kube) -> None:
    first = desired()
    applied = await apply_children(kube, NS, first, {})
    assert sorted(applied.created) == names(first) and not applied.patched and not applied.deleted
    assert len(emulator.read_all(DEPLOYMENTS, NS)) == 2  # cloud and router

    again = await apply_children(kube, NS, desired(), indexed(emulator))
    assert not again, str(again)  # same spec hashes: no call at all

    changed = await apply_children(kube, NS, desired(max_batch_size=64), indexed(emulator))
    assert changed.patched == ["Deployment/smollm2-cloud"] and not changed.created and not changed.deleted
    cloud = emulator.read(DEPLOYMENTS, NS, "smollm2-cloud")
    assert cloud is not None and "64" in cloud["spec"]["template"]["spec"]["containers"][0]["command"]


async def test_prune_and_keep(emulator: Emulator, kube: Kube) -> None:
    objects = desired()
    await apply_children(kube, NS, objects, {})
    job = next(o for o in objects if o["kind"] == "Job")["metadata"]["name"]
    router = [o for o in objects if o["metadata"]["name"] == "smollm2-router"]
    rest = [o for o in objects if o not in router]
    # The router left the desired set; the finished Job is kept though absent from it.
    kept = {("Job", job), ("ConfigMap", job)}
    pruned = await apply_children(kube, NS, [o for o in rest if o["metadata"]["name"] != job], indexed(emulator),
                                  keep=kept)
    assert sorted(pruned.deleted) == names(router) and not pruned.created
    assert emulator.read(DEPLOYMENTS, NS, "smollm2-router") is None
    assert emulator.read(JOBS, NS, job) is not None
    # A kept Job that is gone is not created again.
    await emulator.delete_obj(JOBS, NS, job)
    assert not await apply_children(kube, NS, rest, indexed(emulator), keep=kept)
    assert emulator.read(JOBS, NS, job) is None


async def test_an_index_behind_our_own_creates_compares_with_the_live_object(emulator: Emulator, kube: Kube) -> None:
    await apply_children(kube, NS, desired(), {})
    # The index has not seen the creates yet: every create conflicts; the live hashes match, so no patch.
    assert not await apply_children(kube, NS, desired(), {})
    behind = await apply_children(kube, NS, desired(max_batch_size=32), {})
    assert behind.patched == ["Deployment/smollm2-cloud"]
