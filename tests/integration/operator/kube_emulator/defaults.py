"""What the API server fills in before it validates and stores a built-in object (the defaulting the operator meets).

Only defaults that change what a client reads back or what validation sees: pod template fields, Deployment
strategy, the Job's generated selector and labels, Service cluster IPs and port protocols, PVC volume mode,
Secret stringData.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
from typing import Any

from .keys import DEPLOYMENTS, JOBS, PODS, PVCS, REPLICASETS, SECRETS, SERVICES, Key

_CLUSTER_IPS = (str(ipaddress.IPv4Address("10.96.0.10") + i) for i in itertools.count())


def _container(c: dict[str, Any]) -> None:
    if not isinstance(c, dict):
        return
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    image = str(c.get("image") or "")
    c.setdefault("imagePullPolicy", "Always" if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]
                 else "IfNotPresent")
    for port in c.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")


def _requests_from_limits(c: dict[str, Any]) -> None:
    # A pod's container with limits but no requests gets requests equal to its limits (SetDefaults_Pod).
    resources = c.get("resources")
    if isinstance(resources, dict) and isinstance(resources.get("limits"), dict):
        requests = resources.setdefault("requests", {})
        if isinstance(requests, dict):
            for name, value in resources["limits"].items():
                requests.setdefault(name, value)


def pod_spec(spec: Any, *, in_job: bool = False) -> None:
    if not isinstance(spec, dict):
        return
    if not in_job:
        spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        _container(c)


def apply(key: Key, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
    """Fill in the defaults of `obj` in place (old: the stored object on an update)."""
    spec = obj.get("spec")
    if key == PODS:
        pod_spec(spec)
        if isinstance(spec, dict):
            for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
                if isinstance(c, dict):
                    _requests_from_limits(c)
    elif key in (DEPLOYMENTS, REPLICASETS) and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        if key == DEPLOYMENTS:
            spec.setdefault("progressDeadlineSeconds", 600)
            strategy = spec.setdefault("strategy", {})
            if isinstance(strategy, dict):
                strategy.setdefault("type", "RollingUpdate")
                if strategy["type"] == "RollingUpdate":
                    rolling = strategy.setdefault("rollingUpdate", {})
                    if isinstance(rolling, dict):
                        rolling.setdefault("maxUnavailable", "25%")
                        rolling.setdefault("maxSurge", "25%")
        pod_spec((spec.get("template") or {}).get("spec"))
    elif key == JOBS and isinstance(spec, dict):
        _job(obj, spec, old)
    elif key == SERVICES and isinstance(spec, dict):
        _service(spec, old)
    elif key == PVCS and isinstance(spec, dict):
        spec.setdefault("volumeMode", "Filesystem")
    elif key == SECRETS:
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None)
        if isinstance(string_data, dict):
            data = obj.setdefault("data", {})
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()


def _job(obj: dict[str, Any], spec: dict[str, Any], old: dict[str, Any] | None) -> None:
    spec.setdefault("completions", 1)
    spec.setdefault("parallelism", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    template = spec.get("template")
    if isinstance(template, dict):
        pod_spec(template.get("spec"), in_job=True)
    if spec.get("manualSelector"):
        return
    uid = (obj.get("metadata") or {}).get("uid", "")
    name = (obj.get("metadata") or {}).get("name", "")
    if old is not None:
        return  # the generated selector and labels are set once, at creation
    generated = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                 "controller-uid": uid, "job-name": name}
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    if isinstance(template, dict):
        meta = template.setdefault("metadata", {})
        if isinstance(meta, dict):
            meta["labels"] = {**(meta.get("labels") or {}), **generated}


def _service(spec: dict[str, Any], old: dict[str, Any] | None) -> None:
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    old_spec = (old or {}).get("spec") or {}
    if spec["type"] != "ExternalName":
        if not spec.get("clusterIP") and old_spec.get("clusterIP"):
            spec["clusterIP"] = old_spec["clusterIP"]  # an update without it keeps the allocated address
        if not spec.get("clusterIP"):
            spec["clusterIP"] = next(_CLUSTER_IPS)
        if spec["clusterIP"] != "None":
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
    for port in spec.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
