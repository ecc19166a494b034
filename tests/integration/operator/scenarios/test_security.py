"""Issue 13.2.12 and 13.2.13: what the pods can read, who may reach the servers, and what the operator may do."""

from __future__ import annotations

from typing import Any

import pytest
from kube_emulator import DEPLOYMENTS, LLMD, NETWORKPOLICIES, SECRETS, selector_matches
from scenario import OPERATOR_SA, Cluster, EmulatorCluster, Start, rbac_objects, sample


async def _children(cluster: Cluster) -> list[dict[str, Any]]:
    async def both() -> list[dict[str, Any]] | None:
        deps = [await cluster.api.get(DEPLOYMENTS, n, cluster.namespace) for n in ("smollm2-cloud", "smollm2-router")]
        return [d for d in deps if d] if all(deps) else None

    return await cluster.eventually(both, what="the cloud and router Deployments")  # type: ignore[no-any-return]


def _mounted_secrets(dep: dict[str, Any]) -> set[str]:
    return {v["secret"]["secretName"] for v in dep["spec"]["template"]["spec"].get("volumes") or [] if "secret" in v}


async def test_ca_key_not_in_mounted_secret(start_cluster: Start) -> None:
    cluster = await start_cluster()
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    referenced = set().union(*(_mounted_secrets(d) for d in await _children(cluster)))
    assert referenced, "no pod mounts a Secret: mTLS is expected on by default"
    holding = []
    for name in sorted(referenced):
        secret = await cluster.eventually(lambda n=name: cluster.api.get(SECRETS, n, cluster.namespace),
                                          what=f"Secret {name}")
        if "ca.key" in (secret.get("data") or {}):
            holding.append(name)
    assert not holding, f"Secrets the pods reference hold ca.key: {holding}"


async def test_each_tier_has_its_own_certificate(start_cluster: Start) -> None:
    cluster = await start_cluster()
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    cloud, router = await _children(cluster)
    assert _mounted_secrets(cloud) != _mounted_secrets(router), _mounted_secrets(cloud)


async def test_servers_in_user_namespace_get_a_network_policy(start_cluster: Start) -> None:
    cluster = await start_cluster()
    await cluster.api.create(LLMD, sample(), cluster.namespace)
    cloud, _ = await _children(cluster)
    labels = cloud["spec"]["template"]["metadata"]["labels"]

    async def covered() -> bool:
        for policy in await cluster.api.list(NETWORKPOLICIES, cluster.namespace):
            selector = (policy.get("spec") or {}).get("podSelector") or {}
            wanted = ",".join(f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items())
            if "Ingress" in (policy["spec"].get("policyTypes") or ["Ingress"]) and selector_matches(wanted, labels):
                return True
        return False

    await cluster.eventually(covered, what="a NetworkPolicy selecting the cloud server pods",
                             explain=lambda: cluster.describe("smollm2"))


async def test_operator_rbac_can_list_crds(start_cluster: Start) -> None:
    cluster = await start_cluster()
    cluster.require("audit", "the API server's audit log")
    assert isinstance(cluster, EmulatorCluster)
    await cluster.api.create(LLMD, sample(), cluster.namespace)

    async def reconciled() -> bool:
        return bool((await cluster.api.get(LLMD, "smollm2", cluster.namespace) or {}).get("status") or {})

    await cluster.eventually(reconciled, what="the first status")
    user = "system:serviceaccount:{}:{}".format(*OPERATOR_SA)
    denied = sorted({f"{r.verb} {r.resource}" for r in cluster.emulator.audit if r.user == user and r.code == 403})
    assert not denied, f"the chart's RBAC denied the operator: {denied}"


# What the review found granted and never used (Jobs are create-only; kopf lists namespaces only when it serves a
# namespace pattern, not in the default cluster-wide mode).
UNUSED = [("", "events", "patch"), ("batch", "jobs", "patch"), ("", "pods", "get"), ("", "nodes", "get"),
          ("stratus.dev", "llmdeployments/status", "get"), ("", "namespaces", "list")]


@pytest.mark.unit
def test_operator_rbac_grants_no_unused_verbs() -> None:
    role = next(o for o in rbac_objects() if o["kind"] == "ClusterRole")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert not granted & set(UNUSED), sorted(granted & set(UNUSED))
