"""Issue 13.2.11: cloud pods schedule onto tainted GPU nodes, are not BestEffort, and can pull a private image."""

from __future__ import annotations

from kube_emulator import LLMD, SECRETS
from scenario import CACHE_DIR, Cluster, EmulatorCluster, Start, pods_of, sample


async def _cloud_running(cluster: Cluster) -> bool:
    pods = await pods_of(cluster, "cloud-server")
    return bool(pods) and all((p.get("status") or {}).get("phase") == "Running" for p in pods)


async def test_cloud_pods_tolerate_tainted_gpu_nodes(start_cluster: Start) -> None:
    cluster = await start_cluster(extended_resource_toleration=False)
    cluster.require("admission-plugins", "a cluster without the ExtendedResourceToleration admission plugin")
    assert isinstance(cluster, EmulatorCluster)
    await cluster.add_kind_nodes(host_dirs={CACHE_DIR})
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    await cluster.eventually(lambda: _cloud_running(cluster), what="the cloud pod running on the GPU node",
                             explain=lambda: cluster.describe("smollm2"))


async def test_cloud_pods_are_not_best_effort(start_cluster: Start) -> None:
    cluster = await start_cluster()
    if isinstance(cluster, EmulatorCluster):
        await cluster.add_kind_nodes(host_dirs={CACHE_DIR})
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    pods = await cluster.eventually(lambda: pods_of(cluster, "cloud-server"), what="a cloud pod")
    assert pods[0]["status"]["qosClass"] != "BestEffort", pods[0]["spec"]["containers"][0].get("resources")


async def test_pods_pull_a_private_workers_image(start_cluster: Start) -> None:
    cluster = await start_cluster(env={"STRATUS_IMAGE": "registry.example.com/stratus/workers:0.1.0",
                                       "STRATUS_IMAGE_PULL_SECRETS": "regcred"})
    cluster.require("image-registry", "a registry that refuses pulls without credentials")
    assert isinstance(cluster, EmulatorCluster)
    cluster.emulator.controllers.kubelet.private_registries.add("registry.example.com/")
    await cluster.add_kind_nodes(host_dirs={CACHE_DIR})
    await cluster.api.create(SECRETS, {"metadata": {"name": "regcred"}, "type": "kubernetes.io/dockerconfigjson",
                                       "stringData": {".dockerconfigjson": '{"auths": {}}'}}, cluster.namespace)
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    await cluster.eventually(lambda: _cloud_running(cluster), what="the cloud pod pulling its image",
                             explain=lambda: cluster.describe("smollm2"))
