"""The RBAC rules the operator needs, derived from the resources its client is allowed to call."""

from __future__ import annotations

from typing import Any

from stratus_operator.kube import RESOURCES, Resource


def _rule(resource: Resource) -> dict[str, Any]:
    name = f"{resource.plural}/{resource.subresource}" if resource.subresource else resource.plural
    return {"apiGroups": [resource.group], "resources": [name], "verbs": sorted(resource.verbs)}


# One rule per resource, sorted: what the chart's ClusterRole (and deploy/rbac) must grant.
REQUIRED_RULES: list[dict[str, Any]] = sorted(
    (_rule(r) for r in RESOURCES), key=lambda rule: (rule["apiGroups"][0], rule["resources"][0])
)


def cluster_role(name: str = "stratus-operator") -> dict[str, Any]:
    """A ClusterRole granting exactly REQUIRED_RULES."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "stratus",
                                              "app.kubernetes.io/component": "operator"}},
        "rules": REQUIRED_RULES,
    }
