"""Admission the API server runs on pods and claims: Pod Security (baseline/restricted), default StorageClass,
ExtendedResourceToleration (off unless asked for, as on kind's config and GKE)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import quantity

LEVELS = ("privileged", "baseline", "restricted")
_BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                          "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret", "image"}


def _containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for part in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(part) or []:
            if isinstance(c, dict):
                yield c


def violations(spec: Any, level: str) -> list[str]:
    """What a pod spec breaks of a Pod Security Standard, in the words of the PodSecurity admission plugin."""
    if level not in ("baseline", "restricted") or not isinstance(spec, dict):
        return []
    out: list[str] = []
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            out.append(f"host namespaces ({host}=true)")
    for c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f'privileged (container "{c.get("name")}" must not set securityContext.privileged=true)')
        added = set((sc.get("capabilities") or {}).get("add") or []) - _BASELINE_CAPABILITIES
        if added:
            out.append(f'non-default capabilities (container "{c.get("name")}" must not include '
                       f'{", ".join(sorted(repr(a) for a in added))} in securityContext.capabilities.add)')
        for port in c.get("ports") or []:
            if isinstance(port, dict) and port.get("hostPort"):
                out.append(f'hostPort (container "{c.get("name")}" uses hostPort {port["hostPort"]})')
    host_paths = [v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict) and "hostPath" in v]
    if host_paths:
        out.append("hostPath volumes (" + ", ".join(f'volume "{n}"' for n in host_paths) + ")")
    pod_sc = spec.get("securityContext") or {}
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append('seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")')
    if level == "baseline":
        return out
    for v in spec.get("volumes") or []:
        if isinstance(v, dict):
            kinds = [k for k in v if k != "name"]
            if kinds and kinds[0] not in _RESTRICTED_VOLUMES and kinds[0] != "hostPath":
                out.append(f'restricted volume types (volume "{v.get("name")}" uses restricted volume type '
                           f'"{kinds[0]}")')
    for c in _containers(spec):
        sc = c.get("securityContext") or {}
        name = c.get("name")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f'allowPrivilegeEscalation != false (container "{name}" must set '
                       f'securityContext.allowPrivilegeEscalation=false)')
        if not (sc.get("runAsNonRoot") or (pod_sc.get("runAsNonRoot") and sc.get("runAsNonRoot") is not False)):
            out.append(f'runAsNonRoot != true (pod or container "{name}" must set securityContext.runAsNonRoot=true)')
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f'runAsUser=0 (container "{name}" must not set runAsUser=0)')
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f'seccompProfile (pod or container "{name}" must set securityContext.seccompProfile.type '
                       f'to "RuntimeDefault" or "Localhost")')
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f'unrestricted capabilities (container "{name}" must set securityContext.capabilities.'
                       f'drop=["ALL"])')
        elif set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f'unrestricted capabilities (container "{name}" must not include capabilities other '
                       f'than NET_BIND_SERVICE in securityContext.capabilities.add)')
    return out


def level_of(namespace: dict[str, Any] | None, mode: str) -> str:
    labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
    return str(labels.get(f"pod-security.kubernetes.io/{mode}", "privileged"))


def pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec a workload will create pods from (Deployment, ReplicaSet, Job, ...); None for others."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return spec if isinstance(spec, dict) else None
    template = spec.get("template") if isinstance(spec, dict) else None
    return (template or {}).get("spec") if isinstance(template, dict) else None


def extended_resource_tolerations(spec: dict[str, Any]) -> None:
    """What the ExtendedResourceToleration plugin adds: a toleration for each extended resource requested."""
    wanted: set[str] = set()
    for c in _containers(spec):
        resources = c.get("resources") or {}
        for part in ("requests", "limits"):
            wanted |= {name for name in resources.get(part) or {} if quantity.is_extended(name)}
    tolerations = list(spec.get("tolerations") or [])
    for name in sorted(wanted):
        toleration = {"key": name, "operator": "Exists", "effect": "NoSchedule"}
        if toleration not in tolerations:
            tolerations.append(toleration)
    if tolerations:
        spec["tolerations"] = tolerations


def qos_class(spec: dict[str, Any]) -> str:
    """The pod's QoS class as the API server sets it: BestEffort, Burstable or Guaranteed (cpu and memory only)."""
    containers = [c for c in _containers(spec) if c.get("restartPolicy") != "Always"]
    requests_any = False
    guaranteed = True
    for c in containers:
        resources = c.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        for name in ("cpu", "memory"):
            request = requests.get(name, limits.get(name))  # a limit alone defaults the request
            if request is not None or name in limits:
                requests_any = True
            if name not in limits or request is None or quantity.parse(request) != quantity.parse(limits[name]):
                guaranteed = False
    if not requests_any:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"
