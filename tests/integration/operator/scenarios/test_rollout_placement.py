"""Issue 13.2.8 and 13.2.10: edge rollouts progress on full nodes, and placement keeps pods where they fit.

Also a finding of the strict emulator that the review missed: pinning edge replicas to two nodes writes both
names into one `matchFields` term, which the API server refuses.
"""

from __future__ import annotations

from typing import Any

from kube_emulator import DEPLOYMENTS, LLMD, PODS
from scenario import CACHE_DIR, SUMMARY, Cluster, EmulatorCluster, Start, holds, job_of, pods_of, sample


async def _ready_edge(start_cluster: Start, *, edge_memory: str, replicas: int = 1) -> EmulatorCluster:
    """The sample compressed and served on the kind topology, edge nodes of `edge_memory` each."""
    cluster = await start_cluster()
    cluster.require("nodes", "edge nodes of a chosen size and a compression Job that finishes on demand")
    assert isinstance(cluster, EmulatorCluster)
    await cluster.add_kind_nodes(host_dirs={CACHE_DIR}, edge_memory=edge_memory)
    await cluster.emulator.controllers.volumes.add_class("nfs", "nfs.csi.k8s.io", default=True)
    manifest = sample()
    manifest["spec"]["edge"]["variants"][0]["replicas"] = replicas
    await cluster.api.create(LLMD, manifest, cluster.namespace)
    job = await job_of(cluster)
    await cluster.finish_compression(job["metadata"]["name"], SUMMARY)
    return cluster


async def _edge_running(cluster: Cluster, replicas: int) -> bool:
    pods = await pods_of(cluster, "edge-server")
    return len(pods) == replicas and all((p.get("status") or {}).get("phase") == "Running" for p in pods)


def _pinned(dep: dict[str, Any] | None) -> list[str]:
    affinity = (((dep or {}).get("spec") or {}).get("template", {}).get("spec") or {}).get("affinity") or {}
    terms = affinity.get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {}).get(
        "nodeSelectorTerms") or []
    return sorted(v for t in terms for f in t.get("matchFields") or [] for v in f.get("values") or [])


async def test_edge_rollout_on_full_nodes_progresses(start_cluster: Start) -> None:
    # A 1 Gi edge node holds one 727 Mi replica and no second one.
    cluster = await _ready_edge(start_cluster, edge_memory="1Gi")
    await cluster.eventually(lambda: _edge_running(cluster, 1), what="the edge pod running",
                             explain=lambda: cluster.describe("smollm2"))
    before = {p["metadata"]["name"] for p in await pods_of(cluster, "edge-server")}
    # Any template change rolls the pods: here a serving limit of the edge variant.
    await cluster.api.patch(LLMD, "smollm2", {"spec": {"edge": {"variants": [{
        **(await cluster.api.get(LLMD, "smollm2", cluster.namespace) or {})["spec"]["edge"]["variants"][0],
        "serving": {"maxBatchSize": 2, "maxPromptTokens": 512, "maxNewTokens": 256}}]}}}, cluster.namespace)

    async def rolled() -> bool:
        dep = await cluster.api.get(DEPLOYMENTS, "smollm2-edge-int8", cluster.namespace) or {}
        status = dep.get("status") or {}
        pods = {p["metadata"]["name"] for p in await pods_of(cluster, "edge-server")}
        return dep.get("metadata", {}).get("generation") == status.get("observedGeneration") and \
            status.get("updatedReplicas") == status.get("readyReplicas") == 1 and not pods & before and \
            await _edge_running(cluster, 1)

    await cluster.eventually(rolled, what="the edge rollout to complete", explain=lambda: cluster.describe("smollm2"))


async def test_placement_sticky_when_unrelated_pod_lands(start_cluster: Start) -> None:
    cluster = await _ready_edge(start_cluster, edge_memory="4Gi")
    await cluster.eventually(lambda: _edge_running(cluster, 1), what="the edge pod running",
                             explain=lambda: cluster.describe("smollm2"))
    edge = await cluster.api.get(DEPLOYMENTS, "smollm2-edge-int8", cluster.namespace)
    pinned = _pinned(edge)
    assert len(pinned) == 1
    # Someone else's 2 Gi pod lands beside it: 1.3 Gi stays free, still room for the 727 Mi edge server.
    await cluster.api.create(PODS, {"metadata": {"name": "camera"}, "spec": {
        "nodeName": pinned[0], "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                                               "resources": {"requests": {"memory": "2Gi"}}}]}}, "default")

    async def still_pinned() -> bool:
        return _pinned(await cluster.api.get(DEPLOYMENTS, "smollm2-edge-int8", cluster.namespace)) == pinned

    # The operator resyncs every 2 s: three resyncs at least.
    await holds(cluster, still_pinned, seconds=8, what=f"the edge server pinned to {pinned}",
                explain=lambda: cluster.describe("smollm2"))


async def test_edge_replicas_pinned_to_two_nodes_are_admitted(start_cluster: Start) -> None:
    # Two 1 Gi edge nodes: one 727 Mi replica each.
    cluster = await _ready_edge(start_cluster, edge_memory="1Gi", replicas=2)
    await cluster.eventually(lambda: _edge_running(cluster, 2), what="both edge pods running",
                             explain=lambda: cluster.describe("smollm2"))
