"""Issue 13.2.7: both autoscaling modes give the HPA something to scale on."""

from __future__ import annotations

from typing import Any

from kube_emulator import HPAS, LLMD
from scenario import Cluster, EmulatorCluster, Start, sample


def exported_server_metrics() -> set[str]:
    """Every series a model server exports (what a metrics adapter could serve to the HPA at most)."""
    from stratus_workers.serve.server import ServerMetrics

    names = set()
    for family in ServerMetrics().registry.collect():
        names |= {sample.name for sample in family.samples} | {family.name}
    return names


async def _scaling_active(cluster: Cluster) -> dict[str, Any] | None:
    hpa = await cluster.api.get(HPAS, "smollm2-cloud", cluster.namespace)
    found = [c for c in ((hpa or {}).get("status") or {}).get("conditions") or [] if c["type"] == "ScalingActive"]
    return found[0] if found else None


async def _explain(cluster: Cluster) -> str:
    return f"ScalingActive: {await _scaling_active(cluster)}\n{await cluster.describe('smollm2')}"


async def _autoscaled(start_cluster: Start, autoscaling: dict[str, Any]) -> Cluster:
    cluster = await start_cluster()
    cluster.require("hpa-metrics", "an HPA controller whose metrics the test controls")
    assert isinstance(cluster, EmulatorCluster)
    cluster.emulator.controllers.hpas.custom_metrics = exported_server_metrics()
    manifest = sample()
    manifest["spec"]["cloud"]["autoscaling"] = autoscaling
    await cluster.api.create(LLMD, manifest, cluster.namespace)
    return cluster


async def test_cpu_hpa_has_cpu_requests_to_scale_on(start_cluster: Start) -> None:
    cluster = await _autoscaled(start_cluster, {"minReplicas": 1, "maxReplicas": 3, "metric": "cpu"})
    await cluster.eventually(lambda: _active(cluster), what="the HPA able to compute a replica count",
                             explain=lambda: _explain(cluster))


async def test_queue_depth_hpa_metric_is_one_the_servers_export(start_cluster: Start) -> None:
    cluster = await _autoscaled(start_cluster, {"minReplicas": 1, "maxReplicas": 3, "metric": "queue-depth"})
    await cluster.eventually(lambda: _active(cluster), what="the HPA able to read its Pods metric",
                             explain=lambda: _explain(cluster))


async def _active(cluster: Cluster) -> bool:
    condition = await _scaling_active(cluster)
    return bool(condition and condition["status"] == "True")
