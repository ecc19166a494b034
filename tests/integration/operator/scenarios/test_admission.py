"""Issue 13.2.5 and 13.2.6: what would make invalid children is refused when the LLMDeployment is written."""

from __future__ import annotations

from typing import Any

import pytest
from kube_emulator import DEPLOYMENTS, LLMD
from scenario import CACHE_DIR, SUMMARY, ApiFailure, Cluster, EmulatorCluster, Start, job_of, sample

from stratus_operator.names import MAX_DEPLOYMENT_NAME_LENGTH

LONG_NAME = "smollm2-" + "x" * 61  # 69 characters: a valid object name, an over-long label value
ONE_TOO_LONG = "m" * (MAX_DEPLOYMENT_NAME_LENGTH + 1)  # its edge Service name would pass 63 characters


@pytest.mark.parametrize("name", [LONG_NAME, ONE_TOO_LONG, "smollm2.v2", "135m-smol"],
                         ids=["69-chars", "one-over-the-cap", "dot", "leading-digit"])
async def test_invalid_name_refused_at_admission(start_cluster: Start, name: str) -> None:
    cluster = await start_cluster()
    try:
        await cluster.api.create(LLMD, sample(name), cluster.namespace)
    except ApiFailure as refused:
        assert refused.code == 422, refused.message
        assert "metadata.name" in refused.message or "name" in refused.message.split(":", 1)[-1], refused.message
        return
    # Accepted: fail, saying what then happens to the children.
    evidence = await cluster.eventually(lambda: _trouble(cluster), what="the operator's trouble", timeout=10) \
        if isinstance(cluster, EmulatorCluster) else []
    pytest.fail(f"{name!r} was accepted; then: {evidence}")


async def _trouble(cluster: Cluster) -> list[str]:
    """Writes the API server refused, and the exceptions the operator raised."""
    assert isinstance(cluster, EmulatorCluster)
    refused = {r.message[:200] for r in cluster.emulator.audit if r.code == 422 and "testing value" not in r.message}
    log = cluster.operator.logs() if cluster.operator is not None else ""
    raised = {line.strip()[:200] for line in log.splitlines() if line.startswith(("ValueError", "TypeError"))}
    return sorted(refused)[:3] + sorted(raised)[:2]


async def test_long_namespace_and_name_get_a_certificate(start_cluster: Start) -> None:
    # Found by the strict emulator: the CA's common name was 'stratus <namespace>/<name>', and past 64 characters
    # issuing it raised, so the reconcile crashed before any child or status. The longest name the CRD admits, in
    # the longest namespace there is (a DNS label).
    name = "m" + "x" * (MAX_DEPLOYMENT_NAME_LENGTH - 1)
    cluster = await start_cluster(namespace=f"team-{'n' * 58}")
    await cluster.api.create(LLMD, sample(name), cluster.namespace)

    async def reconciled() -> bool:
        llmd = await cluster.api.get(LLMD, name, cluster.namespace) or {}
        return bool((llmd.get("status") or {}).get("phase"))

    await cluster.eventually(reconciled, what="a first status", explain=lambda: cluster.describe(name))


async def _cloud_gpu(cluster: Cluster) -> dict[str, Any] | None:
    dep = await cluster.api.get(DEPLOYMENTS, "smollm2-cloud", cluster.namespace)
    if dep is None:
        return None
    return dep["spec"]["template"]["spec"]["containers"][0]["resources"]  # type: ignore[no-any-return]


async def test_gpu_request_equals_limit(start_cluster: Start) -> None:
    cluster = await start_cluster()
    manifest = sample()
    manifest["spec"]["cloud"]["resources"] = {"requests": {"nvidia.com/gpu": "2"}}
    try:
        await cluster.api.create(LLMD, manifest, cluster.namespace)
    except ApiFailure as refused:  # refused at admission: one way to fix it
        assert refused.code == 422 and "nvidia.com/gpu" in refused.message, refused.message
        return
    resources = await cluster.eventually(lambda: _cloud_gpu(cluster), what="the cloud Deployment",
                                         explain=lambda: cluster.describe("smollm2"))
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], resources


async def test_edge_gpu_request_gets_a_limit(start_cluster: Start) -> None:
    cluster = await start_cluster()
    cluster.require("finish-jobs", "a compression Job that finishes with a chosen summary")
    assert isinstance(cluster, EmulatorCluster)
    await cluster.add_kind_nodes(host_dirs={CACHE_DIR}, edge_extended={"nvidia.com/gpu": "1"})  # Jetson-like
    await cluster.emulator.controllers.volumes.add_class("nfs", "nfs.csi.k8s.io", default=True)
    manifest = sample()
    manifest["spec"]["edge"]["variants"][0]["resources"] = {"requests": {"nvidia.com/gpu": "1"}}
    await cluster.api.create(LLMD, manifest, cluster.namespace)
    job = await job_of(cluster)
    await cluster.finish_compression(job["metadata"]["name"], SUMMARY)
    edge = await cluster.eventually(lambda: cluster.api.get(DEPLOYMENTS, "smollm2-edge-int8", cluster.namespace),
                                    what="the edge Deployment", explain=lambda: cluster.describe("smollm2"))
    resources = edge["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1", resources
