"""Issue 13.2.1, 13.2.2, 13.2.9: the model cache, the artifacts claim and a storage change, on ordinary clusters."""

from __future__ import annotations

from typing import Any

from kube_emulator import DEPLOYMENTS, JOBS, LLMD, PODS, PVCS, SECRETS
from scenario import CACHE_DIR, SUMMARY, Cluster, EmulatorCluster, Start, conditions, job_of, pods_of, sample


def _emu(cluster: Cluster) -> EmulatorCluster:
    assert isinstance(cluster, EmulatorCluster)
    return cluster


async def _job_pod_running(cluster: Cluster, job: str) -> bool:
    pods = [p for p in await cluster.api.list(PODS, cluster.namespace)
            if (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == job]
    return any((p.get("status") or {}).get("phase") == "Running" for p in pods)


async def test_compression_job_starts_on_a_node_without_the_cache_dir(start_cluster: Start) -> None:
    cluster = await start_cluster()
    cluster.require("host-dirs", f"nodes without {CACHE_DIR} (kind mounts it on every node)")
    await _emu(cluster).add_kind_nodes(host_dirs=set())
    await _emu(cluster).emulator.controllers.volumes.add_class("nfs", "nfs.csi.k8s.io", default=True)
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    job = await job_of(cluster)
    await cluster.eventually(lambda: _job_pod_running(cluster, job["metadata"]["name"]),
                             what="the compression pod running", explain=lambda: cluster.describe("smollm2"))


async def test_compression_job_is_admitted_in_a_baseline_namespace(start_cluster: Start) -> None:
    cluster = await start_cluster(namespace_labels={"pod-security.kubernetes.io/enforce": "baseline"})
    if isinstance(cluster, EmulatorCluster):
        await cluster.add_kind_nodes(host_dirs={CACHE_DIR})
        await cluster.emulator.controllers.volumes.add_class("nfs", "nfs.csi.k8s.io", default=True)
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    job = await job_of(cluster)
    await cluster.eventually(lambda: _job_pod_running(cluster, job["metadata"]["name"]),
                             what="the compression pod running", explain=lambda: cluster.describe("smollm2"))


async def test_rwx_claim_without_class_reports_pending_condition(start_cluster: Start) -> None:
    cluster = await start_cluster()
    if isinstance(cluster, EmulatorCluster):
        await cluster.add_kind_nodes(host_dirs={CACHE_DIR})
        # The usual default class of a managed cluster: block storage, ReadWriteOnce only.
        await cluster.emulator.controllers.volumes.add_class("gp3", "ebs.csi.aws.com", default=True)
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    await cluster.eventually(lambda: cluster.api.get(PVCS, "smollm2-artifacts", cluster.namespace),
                             what="the artifacts claim")

    async def reported() -> bool:
        found = await conditions(cluster)
        return any("smollm2-artifacts" in c.get("message", "") and c.get("status") == "False"
                   for c in found.values())

    await cluster.eventually(reported, what="a condition saying the artifacts claim is Pending and why",
                             explain=lambda: cluster.describe("smollm2"))


async def test_rwo_claim_is_refused_or_its_pods_share_a_node(start_cluster: Start) -> None:
    cluster = await start_cluster()
    cluster.require("finish-jobs", "a compression Job that finishes with a chosen summary")
    emu = _emu(cluster)
    await emu.add_kind_nodes(host_dirs={CACHE_DIR}, edge_memory="1Gi")  # one 727Mi replica per edge node
    await emu.emulator.controllers.volumes.add_class("gp3", "ebs.csi.aws.com", default=True)
    manifest = sample()
    manifest["spec"]["storage"] = {"pvc": {"accessMode": "ReadWriteOnce", "size": "5Gi"}}
    manifest["spec"]["edge"]["variants"][0]["replicas"] = 2
    try:
        await cluster.api.create(LLMD, manifest, cluster.namespace)
    except Exception as exc:  # refused at admission: what the fix may do
        assert "ReadWriteOnce" in str(exc), exc
        return
    job = await job_of(cluster)
    await cluster.finish_compression(job["metadata"]["name"], SUMMARY)
    await cluster.eventually(lambda: _all_running(cluster, "edge-server"), what="the edge pods running",
                             explain=lambda: cluster.describe("smollm2"))
    nodes = {p["spec"]["nodeName"] for p in await pods_of(cluster, "edge-server")}
    assert len(nodes) == 1, f"the ReadWriteOnce claim is mounted on {sorted(nodes)}"


async def _all_running(cluster: Cluster, component: str) -> bool:
    pods = await pods_of(cluster, component)
    return bool(pods) and all((p.get("status") or {}).get("phase") == "Running" for p in pods)


async def test_storage_change_recompresses(start_cluster: Start) -> None:
    cluster = await start_cluster()
    cluster.require("finish-jobs", "a compression Job that finishes with a chosen summary")
    emu = _emu(cluster)
    await emu.add_kind_nodes(host_dirs={CACHE_DIR})
    await emu.emulator.controllers.volumes.add_class("nfs", "nfs.csi.k8s.io", default=True)
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    job = await job_of(cluster)
    await cluster.finish_compression(job["metadata"]["name"], SUMMARY)
    await cluster.eventually(lambda: cluster.api.get(DEPLOYMENTS, "smollm2-edge-int8", cluster.namespace),
                             what="the edge Deployment")
    await cluster.api.create(SECRETS, {"metadata": {"name": "s3-credentials"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}}, cluster.namespace)
    await cluster.api.patch(LLMD, "smollm2", {"spec": {"storage": {
        "objectStore": {"url": "s3://artifacts/stratus", "secretName": "s3-credentials"}}}}, cluster.namespace)

    async def recompressing() -> Any:
        jobs = await cluster.api.list(JOBS, cluster.namespace, "app.kubernetes.io/instance=smollm2")
        return [j for j in jobs if j["metadata"]["uid"] != job["metadata"]["uid"]
                and "-compress-" in j["metadata"]["name"]]

    await cluster.eventually(recompressing, what="a compression Job that writes the artifact to the object store",
                             explain=lambda: cluster.describe("smollm2"))


async def test_claim_size_class_or_mode_change_is_reported_not_ignored(start_cluster: Start) -> None:
    """Review row 18: a claim's class and access mode never change; the operator says so instead of nothing."""
    cluster = await start_cluster()
    if isinstance(cluster, EmulatorCluster):
        await cluster.add_kind_nodes(host_dirs={CACHE_DIR})
        await cluster.emulator.controllers.volumes.add_class("nfs", "nfs.csi.k8s.io", default=True)
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    await cluster.eventually(lambda: cluster.api.get(PVCS, "smollm2-artifacts", cluster.namespace),
                             what="the artifacts claim")
    await cluster.api.patch(LLMD, "smollm2", {"spec": {"storage": {"pvc": {"size": "50Gi"}}}}, cluster.namespace)

    async def reported() -> bool:
        compressed = (await conditions(cluster)).get("Compressed") or {}
        return compressed.get("reason") == "ArtifactsClaimUnchanged" and "size 50Gi" in compressed.get("message", "")

    await cluster.eventually(reported, what="the Compressed condition saying the claim keeps its size",
                             explain=lambda: cluster.describe("smollm2"))
    claim = await cluster.api.get(PVCS, "smollm2-artifacts", cluster.namespace) or {}
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
