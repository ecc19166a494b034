"""Issue 13.2.3: children follow the desired state exactly, removed keys included, and drift is put back."""

from __future__ import annotations

from typing import Any

import pytest
from kube_emulator import DEPLOYMENTS, LLMD
from scenario import Cluster, Start, sample

BUNDLED = "bundled://smollm2-135m-instruct"


async def _generation_written(cluster: Cluster, generation: int) -> bool:
    llmd = await cluster.api.get(LLMD, "smollm2", cluster.namespace) or {}
    return (llmd.get("status") or {}).get("observedGeneration") == generation


def _pod(dep: dict[str, Any] | None) -> dict[str, Any]:
    return ((dep or {}).get("spec") or {}).get("template", {}).get("spec") or {}


@pytest.mark.parametrize(("source", "target"), [
    ("s3://models/smollm2", BUNDLED),
    ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", BUNDLED),
    ("s3://models/smollm2", "pvc://models/smollm2"),
], ids=["s3-to-bundled", "hf-to-bundled", "s3-to-pvc"])
async def test_source_switch_from_s3_to_bundled_leaves_no_stale_init_container_and_writes_status(
        start_cluster: Start, source: str, target: str) -> None:
    cluster = await start_cluster()
    api, ns = cluster.api, cluster.namespace
    await api.create(LLMD, sample(model={"source": source}), ns)
    cloud = await cluster.eventually(lambda: api.get(DEPLOYMENTS, "smollm2-cloud", ns), what="the cloud Deployment")
    assert [c["name"] for c in _pod(cloud).get("initContainers") or []] == ["fetch-model"]
    await cluster.eventually(lambda: _generation_written(cluster, 1), what="status of generation 1")

    await api.patch(LLMD, "smollm2", {"spec": {"model": {"source": target}}}, ns)

    async def switched() -> bool:
        cloud = await api.get(DEPLOYMENTS, "smollm2-cloud", ns)
        router = await api.get(DEPLOYMENTS, "smollm2-router", ns)
        stale = [c["name"] for d in (cloud, router) for c in _pod(d).get("initContainers") or []]
        return not stale and await _generation_written(cluster, 2)

    await cluster.eventually(switched, what="children without the fetch init containers and status of generation 2",
                             explain=lambda: cluster.describe("smollm2"))


async def test_removed_node_selector_is_removed_from_the_child(start_cluster: Start) -> None:
    cluster = await start_cluster()
    api, ns = cluster.api, cluster.namespace
    manifest = sample()
    manifest["spec"]["cloud"]["nodeSelector"] = {"pool": "a100"}
    await api.create(LLMD, manifest, ns)
    await cluster.eventually(lambda: api.get(DEPLOYMENTS, "smollm2-cloud", ns), what="the cloud Deployment")
    await api.patch(LLMD, "smollm2", {"spec": {"cloud": {"nodeSelector": None}}}, ns)

    async def gone() -> bool:
        return "nodeSelector" not in _pod(await api.get(DEPLOYMENTS, "smollm2-cloud", ns)) and \
            await _generation_written(cluster, 2)

    await cluster.eventually(gone, what="the cloud pods without the nodeSelector",
                             explain=lambda: cluster.describe("smollm2"))


async def test_kubectl_scale_of_child_is_reverted(start_cluster: Start) -> None:
    cluster = await start_cluster()
    api, ns = cluster.api, cluster.namespace
    await api.create(LLMD, sample(), ns)
    cloud = await cluster.eventually(lambda: api.get(DEPLOYMENTS, "smollm2-cloud", ns), what="the cloud Deployment")
    assert cloud["spec"]["replicas"] == 1
    # What `kubectl scale deployment smollm2-cloud --replicas 3` sends.
    await api.patch(DEPLOYMENTS, "smollm2-cloud", {"spec": {"replicas": 3}}, ns, subresource="scale",
                    params={"fieldManager": "kubectl"})
    assert (await api.get(DEPLOYMENTS, "smollm2-cloud", ns) or {})["spec"]["replicas"] == 3

    async def reverted() -> bool:
        return (await api.get(DEPLOYMENTS, "smollm2-cloud", ns) or {})["spec"]["replicas"] == 1

    # The operator resyncs every 2 s here: a few resyncs are enough to notice.
    await cluster.eventually(reverted, what="the operator to put replicas back to 1", timeout=12,
                             explain=lambda: cluster.describe("smollm2"))
