"""A strict in-memory Kubernetes API server for the operator's tests (kmock underneath), and its controller stand-ins.

`Emulator` is the server (server.py); `emu.controllers` the scheduler, kubelet, volume binder and workload
controllers a test drives (controllers.py). The rules it enforces are listed in docs/reliability.md.
"""

from __future__ import annotations

from .errors import ApiError, FieldError
from .keys import (
    CLUSTERROLEBINDINGS,
    CLUSTERROLES,
    CONFIGMAPS,
    CRDS,
    DEPLOYMENTS,
    EVENTS,
    HPAS,
    JOBS,
    LLMD,
    NAMESPACES,
    NETWORKPOLICIES,
    NODES,
    PODS,
    PVCS,
    PVS,
    REPLICASETS,
    ROLEBINDINGS,
    ROLES,
    SECRETS,
    SERVICEACCOUNTS,
    SERVICES,
    STORAGECLASSES,
    Key,
    ObjKey,
    resource_key,
)
from .rbac import User, service_account
from .server import AuditRecord, Emulator, selector_matches

__all__ = [
    "CLUSTERROLEBINDINGS", "CLUSTERROLES", "CONFIGMAPS", "CRDS", "DEPLOYMENTS", "EVENTS", "HPAS", "JOBS", "LLMD",
    "NAMESPACES", "NETWORKPOLICIES", "NODES", "PODS", "PVCS", "PVS", "REPLICASETS", "ROLEBINDINGS", "ROLES",
    "SECRETS", "SERVICEACCOUNTS", "SERVICES", "STORAGECLASSES", "ApiError", "AuditRecord", "Emulator", "FieldError",
    "Key", "ObjKey", "User", "resource_key", "selector_matches", "service_account",
]
