"""Resource keys (group, version, plural) of the kinds the emulator serves, and what each one is."""

from __future__ import annotations

Key = tuple[str, str, str]  # group, version, plural
ObjKey = tuple[Key, str | None, str]  # resource, namespace (None: cluster-scoped), name


def resource_key(group: str, version: str, plural: str) -> Key:
    return (group, version, plural)


def api_version(key: Key) -> str:
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


LLMD: Key = ("stratus.dev", "v1alpha1", "llmdeployments")
JOBS: Key = ("batch", "v1", "jobs")
DEPLOYMENTS: Key = ("apps", "v1", "deployments")
REPLICASETS: Key = ("apps", "v1", "replicasets")
SERVICES: Key = ("", "v1", "services")
CONFIGMAPS: Key = ("", "v1", "configmaps")
PODS: Key = ("", "v1", "pods")
NODES: Key = ("", "v1", "nodes")
EVENTS: Key = ("", "v1", "events")
HPAS: Key = ("autoscaling", "v2", "horizontalpodautoscalers")
PVCS: Key = ("", "v1", "persistentvolumeclaims")
PVS: Key = ("", "v1", "persistentvolumes")
NAMESPACES: Key = ("", "v1", "namespaces")
SECRETS: Key = ("", "v1", "secrets")
SERVICEACCOUNTS: Key = ("", "v1", "serviceaccounts")
STORAGECLASSES: Key = ("storage.k8s.io", "v1", "storageclasses")
NETWORKPOLICIES: Key = ("networking.k8s.io", "v1", "networkpolicies")
CRDS: Key = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
LEASES: Key = ("coordination.k8s.io", "v1", "leases")
CLUSTERROLES: Key = ("rbac.authorization.k8s.io", "v1", "clusterroles")
CLUSTERROLEBINDINGS: Key = ("rbac.authorization.k8s.io", "v1", "clusterrolebindings")
ROLES: Key = ("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS: Key = ("rbac.authorization.k8s.io", "v1", "rolebindings")


# The kind of each resource above, for clients that build bodies (the emulator itself asks kmock's discovery).
KINDS: dict[Key, str] = {
    LLMD: "LLMDeployment", JOBS: "Job", DEPLOYMENTS: "Deployment", REPLICASETS: "ReplicaSet", SERVICES: "Service",
    CONFIGMAPS: "ConfigMap", PODS: "Pod", NODES: "Node", EVENTS: "Event", HPAS: "HorizontalPodAutoscaler",
    PVCS: "PersistentVolumeClaim", PVS: "PersistentVolume", NAMESPACES: "Namespace", SECRETS: "Secret",
    SERVICEACCOUNTS: "ServiceAccount", STORAGECLASSES: "StorageClass", NETWORKPOLICIES: "NetworkPolicy",
    CRDS: "CustomResourceDefinition", LEASES: "Lease", CLUSTERROLES: "ClusterRole",
    CLUSTERROLEBINDINGS: "ClusterRoleBinding", ROLES: "Role", ROLEBINDINGS: "RoleBinding",
}
