"""Issue 13.2.4: deleting a namespace that holds an LLMDeployment finishes."""

from __future__ import annotations

from typing import Any

import pytest
from kube_emulator import LLMD, NAMESPACES
from scenario import Cluster, EmulatorCluster, Start, sample


async def _deleted(cluster: Cluster) -> bool:
    return await cluster.api.get(NAMESPACES, cluster.namespace) is None


@pytest.mark.parametrize("storage", [
    {"objectStore": {"url": "s3://artifacts/stratus"}},
    {"pvc": {"claimName": "shared-artifacts"}},
], ids=["object-store", "existing-claim"])
async def test_delete_in_terminating_namespace_finishes(start_cluster: Start, storage: dict[str, Any]) -> None:
    cluster = await start_cluster()
    api, ns = cluster.api, cluster.namespace
    await api.create(LLMD, sample(storage=storage), ns)

    async def finalized() -> bool:
        llmd = await api.get(LLMD, "smollm2", ns) or {}
        return bool(llmd.get("metadata", {}).get("finalizers")) and bool(llmd.get("status"))

    await cluster.eventually(finalized, what="the operator's finalizer and first status")
    await api.delete(NAMESPACES, ns)
    await cluster.eventually(lambda: _deleted(cluster), what=f"namespace {ns} deleted",
                             explain=lambda: _namespace_state(cluster))


async def _namespace_state(cluster: Cluster) -> str:
    namespace = await cluster.api.get(NAMESPACES, cluster.namespace) or {}
    conditions = [f"  {c.get('type')}: {c.get('message')}" for c in (namespace.get("status") or {}).get("conditions")
                  or []]
    refused = cluster.refusals()[-3:] if isinstance(cluster, EmulatorCluster) else []
    return "\n".join([f"namespace phase: {(namespace.get('status') or {}).get('phase')}", *conditions,
                      "operator requests refused:", *refused])
