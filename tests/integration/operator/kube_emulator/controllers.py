"""Stand-ins for the controllers, scheduler and kubelet of a cluster, driven explicitly by tests.

Like envtest, the emulator runs no controllers by itself; a test that needs pods to exist, land, mount their
volumes and run calls `await emu.controllers.settle()`, which repeats these steps until nothing changes:

- Deployments and Jobs make pods from their templates (rolling updates respect maxSurge/maxUnavailable;
  Recreate deletes first); a pod refused at admission is a FailedCreate event on its owner.
- the scheduler binds a pending pod only to a node whose labels (nodeSelector, required node affinity),
  taints (tolerations) and free allocatable capacity (cpu, memory, pods, extended resources, against the
  requests of pods already bound) admit it, and to the node of a local volume it uses; otherwise the pod
  stays Pending with PodScheduled=False and a FailedScheduling event naming why, as the real one words it.
- the volume binder provisions claims through their StorageClass (the default class when none is named);
  a claim whose class is missing or whose provisioner does not offer its access mode stays Pending with a
  ProvisioningFailed event; WaitForFirstConsumer classes wait for a scheduled pod.
- the kubelet starts a bound pod only when its volumes mount: a hostPath of type Directory must exist on the
  node (`emu.host_dirs[node]`), Secrets, ConfigMaps and the keys they project must exist, and a
  ReadWriteOnce claim cannot attach to a second node (Multi-Attach); otherwise ContainerCreating with a
  FailedMount / FailedAttachVolume event. Tests end pods with `kubelet.terminate`.
- the namespace controller empties a terminating namespace and removes it once nothing is left.
- the HPA controller checks what it would need to scale: a request for a Resource metric in every
  container, a Pods metric the custom-metrics API serves (`hpas.custom_metrics`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from . import quantity
from .errors import ApiError
from .keys import DEPLOYMENTS, EVENTS, HPAS, JOBS, NAMESPACES, NODES, PODS, PVCS, PVS, STORAGECLASSES, Key

if TYPE_CHECKING:
    from .server import Emulator

TERMINAL = ("Succeeded", "Failed")
# A generated name's random suffix: events that differ only in it are one event (the recorder aggregates them).
_GENERATED = re.compile(r"-[a-z0-9]{5}\b")
CSI_MODES = {"ReadWriteOnce": "SINGLE_NODE_WRITER", "ReadWriteMany": "MULTI_NODE_MULTI_WRITER",
             "ReadOnlyMany": "MULTI_NODE_READER_ONLY", "ReadWriteOncePod": "SINGLE_NODE_SINGLE_WRITER"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    uid = _meta(owner).get("uid")
    return any(ref.get("uid") == uid for ref in _meta(obj).get("ownerReferences") or [])


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _live(pod: dict[str, Any]) -> bool:
    return _phase(pod) not in TERMINAL and not _meta(pod).get("deletionTimestamp")


def pod_requests(spec: dict[str, Any]) -> dict[str, Fraction]:
    """What the scheduler counts for a pod: the sum of its containers, or its largest init container if more."""
    total: dict[str, Fraction] = {}
    for c in spec.get("containers") or []:
        for name, value in ((c.get("resources") or {}).get("requests") or {}).items():
            total[name] = total.get(name, Fraction(0)) + quantity.parse(value)
    for c in spec.get("initContainers") or []:
        for name, value in ((c.get("resources") or {}).get("requests") or {}).items():
            total[name] = max(total.get(name, Fraction(0)), quantity.parse(value))
    return total


class Step:
    """One controller: `run` makes the changes it would make now and says whether it made any."""

    component = "controller"

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu

    def acting(self) -> Any:
        return self.emu.acting_as(self.component, helper=False)

    async def event(self, obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """Post an Event about `obj` once (a repeat of the same reason and message is not posted again)."""
        meta = _meta(obj)
        namespace = meta.get("namespace") or "default"
        for e in self.emu.read_all(EVENTS, namespace):
            involved = e.get("involvedObject") or {}
            if involved.get("uid") == meta.get("uid") and e.get("reason") == reason and \
                    _GENERATED.sub("*", e.get("message") or "") == _GENERATED.sub("*", message):
                return
        body = {"metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
                "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                                   "name": meta.get("name"), "namespace": meta.get("namespace"),
                                   "uid": meta.get("uid")},
                "type": kind, "reason": reason, "message": message, "count": 1,
                "firstTimestamp": _now(), "lastTimestamp": _now(), "source": {"component": self.component}}
        try:
            with self.acting():
                await self.emu.create_obj(EVENTS, namespace, body)
        except ApiError:
            pass  # a terminating namespace takes no events; the condition or status still says it

    async def run(self) -> bool:
        raise NotImplementedError


# --- storage --------------------------------------------------------------------------------------------------


@dataclass
class Provisioner:
    """A volume provisioner: the access modes it can offer, and whether its volumes live on one node."""

    access_modes: frozenset[str]
    node_local: bool = False


BLOCK = frozenset({"ReadWriteOnce", "ReadWriteOncePod"})
SHARED = frozenset({"ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany"})


class Volumes(Step):
    """The PV controller and the external provisioners."""

    component = "persistentvolume-controller"

    def __init__(self, emu: Emulator) -> None:
        super().__init__(emu)
        self.provisioners: dict[str, Provisioner] = {
            "ebs.csi.aws.com": Provisioner(BLOCK), "pd.csi.storage.gke.io": Provisioner(BLOCK),
            "disk.csi.azure.com": Provisioner(BLOCK), "rancher.io/local-path": Provisioner(BLOCK, node_local=True),
            "efs.csi.aws.com": Provisioner(SHARED), "nfs.csi.k8s.io": Provisioner(SHARED),
            "filestore.csi.storage.gke.io": Provisioner(SHARED),
        }

    async def add_class(self, name: str, provisioner: str, *, default: bool = False,
                        binding_mode: str = "Immediate") -> dict[str, Any]:
        """Create a StorageClass (the default one when `default`)."""
        annotations = {"storageclass.kubernetes.io/is-default-class": "true"} if default else {}
        return await self.emu.create_obj(STORAGECLASSES, None, {
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name, "annotations": annotations}, "provisioner": provisioner,
            "reclaimPolicy": "Delete", "volumeBindingMode": binding_mode})

    def consumers(self, claim: dict[str, Any]) -> list[dict[str, Any]]:
        meta = _meta(claim)
        return [p for p in self.emu.read_all(PODS, meta.get("namespace")) if _live(p) and any(
            (v.get("persistentVolumeClaim") or {}).get("claimName") == meta.get("name")
            for v in (p.get("spec") or {}).get("volumes") or [])]

    def problem(self, claim: dict[str, Any]) -> tuple[str, str] | None:
        """(reason, message) why this claim cannot be provisioned at all; None when it can."""
        spec = claim.get("spec") or {}
        klass_name = spec.get("storageClassName")
        if not klass_name:
            return "FailedBinding", "no persistent volumes available for this claim and no storage class is set"
        klass = self.emu.read(STORAGECLASSES, None, klass_name)
        if klass is None:
            return "ProvisioningFailed", f'storageclass.storage.k8s.io "{klass_name}" not found'
        provisioner = self.provisioners.get(klass.get("provisioner", ""))
        if provisioner is None:
            return "ExternalProvisioning", (f"Waiting for a volume to be created either by the external provisioner "
                                            f"'{klass.get('provisioner')}' or manually by the system administrator. "
                                            f"If volume creation is delayed, please verify that the provisioner is "
                                            f"running and correctly registered.")
        missing = [m for m in spec.get("accessModes") or [] if m not in provisioner.access_modes]
        if missing:
            offered = ", ".join(sorted(provisioner.access_modes))
            return "ProvisioningFailed", (f'failed to provision volume with StorageClass "{klass_name}": rpc error: '
                                          f"code = InvalidArgument desc = Volume capabilities "
                                          f"{', '.join(CSI_MODES.get(m, m) for m in missing)} not supported. "
                                          f"Only AccessModes[{offered}] supported.")
        return None

    def waits_for_consumer(self, claim: dict[str, Any]) -> bool:
        klass = self.emu.read(STORAGECLASSES, None, (claim.get("spec") or {}).get("storageClassName") or "")
        return bool(klass and klass.get("volumeBindingMode") == "WaitForFirstConsumer")

    async def run(self) -> bool:
        changed = False
        for claim in self.emu.read_all(PVCS):
            if (claim.get("status") or {}).get("phase") == "Bound" or _meta(claim).get("deletionTimestamp"):
                continue
            if (claim.get("status") or {}).get("phase") != "Pending":
                with self.acting():
                    await self.emu.patch_status(PVCS, _meta(claim)["namespace"], _meta(claim)["name"],
                                                {"phase": "Pending"})
                changed = True
            problem = self.problem(claim)
            if problem is not None:
                kind = "Normal" if problem[0] == "ExternalProvisioning" else "Warning"
                await self.event(claim, kind, *problem)
                continue
            node = None
            if self.waits_for_consumer(claim):
                scheduled = [p for p in self.consumers(claim) if (p.get("spec") or {}).get("nodeName")]
                if not scheduled:
                    await self.event(claim, "Normal", "WaitForFirstConsumer",
                                     "waiting for first consumer to be created before binding")
                    continue
                node = scheduled[0]["spec"]["nodeName"]
            await self._provision(claim, node)
            changed = True
        return changed

    async def _provision(self, claim: dict[str, Any], node: str | None) -> None:
        meta, spec = _meta(claim), claim.get("spec") or {}
        klass = self.emu.read(STORAGECLASSES, None, spec["storageClassName"]) or {}
        provisioner = self.provisioners[klass.get("provisioner", "")]
        name = f"pvc-{meta['uid']}"
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
        pv: dict[str, Any] = {
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": storage}, "accessModes": spec.get("accessModes"),
                     "persistentVolumeReclaimPolicy": "Delete", "storageClassName": spec["storageClassName"],
                     "claimRef": {"kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                                  "name": meta["name"], "uid": meta["uid"]},
                     "csi": {"driver": klass.get("provisioner"), "volumeHandle": name}},
        }
        if provisioner.node_local and node:
            pv["spec"]["nodeAffinity"] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}
        with self.acting():
            await self.emu.create_obj(PVS, None, pv)
            await self.emu.patch_status(PVS, None, name, {"phase": "Bound"})
            await self.emu.patch_obj(PVCS, meta["namespace"], meta["name"], {"spec": {"volumeName": name}})
            await self.emu.patch_status(PVCS, meta["namespace"], meta["name"], {
                "phase": "Bound", "accessModes": spec.get("accessModes"), "capacity": {"storage": storage}})
        await self.event(claim, "Normal", "ProvisioningSucceeded",
                         f"Successfully provisioned volume {name}")


# --- scheduling -----------------------------------------------------------------------------------------------


def _label_requirement(req: dict[str, Any], labels: dict[str, str]) -> bool:
    key, op, values = req.get("key"), req.get("operator"), req.get("values") or []
    have = labels.get(str(key))
    if op == "In":
        return have in values
    if op == "NotIn":
        return have not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and have is not None:
        try:
            return int(have) > int(values[0]) if op == "Gt" else int(have) < int(values[0])
        except ValueError:
            return False
    return False


def node_selector_terms_match(terms: list[dict[str, Any]], node: dict[str, Any]) -> bool:
    labels = _meta(node).get("labels") or {}
    for term in terms:
        expressions = term.get("matchExpressions") or []
        fields_ = term.get("matchFields") or []
        if not expressions and not fields_:
            continue  # an empty term matches nothing
        if all(_label_requirement(r, labels) for r in expressions) and all(
                (_meta(node).get("name") in (r.get("values") or [])) == (r.get("operator") == "In")
                for r in fields_):
            return True
    return False


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t.get("key") == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


class Scheduler(Step):
    """The default scheduler's filters and a least-allocated choice among the nodes that pass."""

    component = "default-scheduler"

    def allocatable(self, node: dict[str, Any]) -> dict[str, Fraction]:
        raw = (node.get("status") or {}).get("allocatable") or {}
        out = {name: quantity.parse(value) for name, value in raw.items()}
        out.setdefault("pods", Fraction(110))
        return out

    def used(self, node_name: str, exclude: str = "") -> dict[str, Fraction]:
        total: dict[str, Fraction] = {}
        for pod in self.emu.read_all(PODS):
            if (pod.get("spec") or {}).get("nodeName") != node_name or not _live(pod):
                continue
            if _meta(pod).get("uid") == exclude:
                continue
            for name, value in pod_requests(pod.get("spec") or {}).items():
                total[name] = total.get(name, Fraction(0)) + value
            total["pods"] = total.get("pods", Fraction(0)) + 1
        return total

    def free(self, node: dict[str, Any]) -> dict[str, Fraction]:
        used = self.used(_meta(node)["name"])
        return {name: value - used.get(name, Fraction(0)) for name, value in self.allocatable(node).items()}

    def why_not(self, pod: dict[str, Any], node: dict[str, Any]) -> list[str]:
        """The filters `node` fails for `pod`, in the scheduler's words; empty when it fits."""
        spec = pod.get("spec") or {}
        node_spec = node.get("spec") or {}
        reasons = []
        if node_spec.get("unschedulable"):
            reasons.append("node(s) were unschedulable")
        ready = [c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
        if ready and ready[0].get("status") != "True":
            reasons.append("node(s) were not ready")
        labels = _meta(node).get("labels") or {}
        selector = spec.get("nodeSelector") or {}
        terms = ((((spec.get("affinity") or {}).get("nodeAffinity") or {})
                  .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms"))
        if any(labels.get(k) != v for k, v in selector.items()) or (
                terms is not None and not node_selector_terms_match(terms, node)):
            reasons.append("node(s) didn't match Pod's node affinity/selector")
        for taint in node_spec.get("taints") or []:
            if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(spec.get("tolerations") or [],
                                                                                     taint):
                reasons.append(f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}")
        free = self.free(node)
        wanted = pod_requests(spec)
        if free.get("pods", Fraction(0)) < 1:
            reasons.append("Too many pods")
        for name, amount in sorted(wanted.items()):
            if amount > 0 and amount > free.get(name, Fraction(0)):
                reasons.append(f"Insufficient {name}")
        reasons += self._volume_reasons(pod, node)
        return reasons

    def _claims(self, pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Each claim a pod's volumes name, with the claim object (None: it does not exist)."""
        namespace = _meta(pod).get("namespace")
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            claim_name = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim_name:
                yield claim_name, self.emu.read(PVCS, namespace, claim_name)

    def _volume_reasons(self, pod: dict[str, Any], node: dict[str, Any]) -> list[str]:
        out = []
        for _, claim in self._claims(pod):
            if claim is None:
                continue
            volume_name = (claim.get("spec") or {}).get("volumeName")
            pv = self.emu.read(PVS, None, volume_name) if volume_name else None
            required = (((pv or {}).get("spec") or {}).get("nodeAffinity") or {}).get("required")
            if required and not node_selector_terms_match(required.get("nodeSelectorTerms") or [], node):
                out.append("node(s) had volume node affinity conflict")
        return out

    def _pod_wide(self, pod: dict[str, Any]) -> str | None:
        """A reason that holds on every node (a missing or unbound claim, a claim another pod has to itself)."""
        for claim_name, claim in self._claims(pod):
            if claim is None:
                return f'persistentvolumeclaim "{claim_name}" not found'
            bound = (claim.get("status") or {}).get("phase") == "Bound"
            if not bound and not (self.emu.controllers.volumes.waits_for_consumer(claim)
                                  and self.emu.controllers.volumes.problem(claim) is None):
                return "pod has unbound immediate PersistentVolumeClaims"
            if "ReadWriteOncePod" in ((claim.get("spec") or {}).get("accessModes") or []):
                others = [p for p in self.emu.controllers.volumes.consumers(claim)
                          if _meta(p).get("uid") != _meta(pod).get("uid") and (p.get("spec") or {}).get("nodeName")]
                if others:
                    return ("node(s) unavailable due to PersistentVolumeClaim with ReadWriteOncePod access mode "
                            "already in-use by another pod")
        return None

    async def run(self) -> bool:
        changed = False
        nodes = self.emu.read_all(NODES)
        for pod in self.emu.read_all(PODS):
            spec = pod.get("spec") or {}
            if spec.get("nodeName") or not _live(pod) or spec.get("schedulingGates"):
                continue
            meta = _meta(pod)
            pod_wide = self._pod_wide(pod)
            fits: list[dict[str, Any]] = []
            reasons: Counter[str] = Counter()
            if pod_wide is not None:
                reasons[pod_wide] = len(nodes)
            else:
                for node in nodes:
                    why = self.why_not(pod, node)
                    if why:
                        reasons.update(why)
                    else:
                        fits.append(node)
            if not fits:
                message = (f"0/{len(nodes)} nodes are available: "
                           + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: x[0]))
                           + f". preemption: 0/{len(nodes)} nodes are available: {len(nodes)} Preemption is not "
                             f"helpful for scheduling.") if nodes else "no nodes available to schedule pods"
                condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                             "message": message}
                current = [c for c in (pod.get("status") or {}).get("conditions") or []
                           if c.get("type") == "PodScheduled"]
                if not current or current[0].get("message") != message:
                    with self.acting():
                        await self.emu.patch_status(PODS, meta["namespace"], meta["name"], {
                            "phase": "Pending", "conditions": [{**condition, "lastTransitionTime": _now()}]})
                    changed = True
                await self.event(pod, "Warning", "FailedScheduling", message)
                continue
            chosen = min(fits, key=lambda n: (self._load(n, pod), _meta(n)["name"]))
            with self.acting():
                await self.emu.patch_obj(PODS, meta["namespace"], meta["name"],
                                         {"spec": {"nodeName": _meta(chosen)["name"]}})
                await self.emu.patch_status(PODS, meta["namespace"], meta["name"], {
                    "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True",
                                                        "lastTransitionTime": _now()}]})
            await self.event(pod, "Normal", "Scheduled",
                             f"Successfully assigned {meta['namespace']}/{meta['name']} to {_meta(chosen)['name']}")
            changed = True
        return changed

    def _load(self, node: dict[str, Any], pod: dict[str, Any]) -> Fraction:
        allocatable, free = self.allocatable(node), self.free(node)
        wanted = pod_requests(pod.get("spec") or {})
        shares = []
        for name in ("cpu", "memory"):
            if allocatable.get(name):
                shares.append((allocatable[name] - free.get(name, Fraction(0)) + wanted.get(name, Fraction(0)))
                              / allocatable[name])
        return sum(shares, Fraction(0)) / max(len(shares), 1)


# --- the kubelet ----------------------------------------------------------------------------------------------


class Kubelet(Step):
    """Starts bound pods whose volumes mount and images pull; says why when they do not."""

    component = "kubelet"

    def __init__(self, emu: Emulator) -> None:
        super().__init__(emu)
        # Image prefixes a registry serves only with credentials (an imagePullSecrets entry naming a Secret).
        self.private_registries: set[str] = set()

    def _pull_problems(self, pod: dict[str, Any]) -> list[tuple[str, str]]:
        spec = pod.get("spec") or {}
        namespace = _meta(pod).get("namespace")
        secrets = [s.get("name") for s in spec.get("imagePullSecrets") or []]
        usable = any(self.emu.read(("", "v1", "secrets"), namespace, name or "") is not None for name in secrets)
        out = []
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            image = str(c.get("image") or "")
            if any(image.startswith(prefix) for prefix in self.private_registries) and not usable:
                out.append(("Failed", f'Failed to pull image "{image}": failed to resolve reference "{image}": '
                                      f"failed to authorize: 401 Unauthorized"))
        return out

    def _mount_problems(self, pod: dict[str, Any]) -> list[tuple[str, str]]:
        spec = pod.get("spec") or {}
        meta = _meta(pod)
        node = str(spec.get("nodeName") or "")
        namespace = meta.get("namespace")
        out: list[tuple[str, str]] = []
        for volume in spec.get("volumes") or []:
            name = volume.get("name")
            host = volume.get("hostPath")
            if isinstance(host, dict):
                path, kind = host.get("path", ""), host.get("type", "")
                if kind in ("Directory",) and path not in self.emu.host_dirs[node]:
                    out.append(("FailedMount", f'MountVolume.SetUp failed for volume "{name}" : hostPath type check '
                                               f"failed: {path} is not a directory"))
                elif kind == "DirectoryOrCreate":
                    self.emu.host_dirs[node].add(path)
            secret = volume.get("secret")
            if isinstance(secret, dict):
                out += self._projected("secret", secret.get("secretName", ""), secret, namespace, name)
            config = volume.get("configMap")
            if isinstance(config, dict):
                out += self._projected("configmap", config.get("name", ""), config, namespace, name)
            claim_ref = volume.get("persistentVolumeClaim")
            if isinstance(claim_ref, dict):
                claim = self.emu.read(PVCS, namespace, claim_ref.get("claimName", ""))
                if claim is None or (claim.get("status") or {}).get("phase") != "Bound":
                    out.append(("FailedMount", f'Unable to attach or mount volumes: unmounted volumes=[{name}]: '
                                               f'persistentvolumeclaim "{claim_ref.get("claimName")}" is not bound'))
                    continue
                modes = (claim.get("spec") or {}).get("accessModes") or []
                if "ReadWriteOnce" in modes or "ReadWriteOncePod" in modes:
                    elsewhere = [p for p in self.emu.controllers.volumes.consumers(claim)
                                 if (p.get("spec") or {}).get("nodeName") not in (None, node)
                                 and _phase(p) == "Running"]
                    if elsewhere:
                        pv = (claim.get("spec") or {}).get("volumeName")
                        out.append(("FailedAttachVolume", f'Multi-Attach error for volume "{pv}" Volume is already '
                                                          f"used by pod(s) "
                                                          + ", ".join(_meta(p)["name"] for p in elsewhere)))
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            for env in c.get("env") or []:
                source = env.get("valueFrom") or {}
                for ref_kind, key in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
                    ref = source.get(ref_kind)
                    if isinstance(ref, dict) and not ref.get("optional"):
                        obj = self.emu.read(("", "v1", key), namespace, ref.get("name", ""))
                        if obj is None:
                            out.append(("Failed", f'Error: {key[:-1]} "{ref.get("name")}" not found'))
        return out

    def _projected(self, kind: str, name: str, source: dict[str, Any], namespace: str | None,
                   volume: str) -> list[tuple[str, str]]:
        if source.get("optional"):
            return []
        key: Key = ("", "v1", "secrets" if kind == "secret" else "configmaps")
        obj = self.emu.read(key, namespace, name)
        if obj is None:
            return [("FailedMount", f'MountVolume.SetUp failed for volume "{volume}" : {kind} "{name}" not found')]
        data = {**(obj.get("data") or {}), **(obj.get("binaryData") or {})}
        missing = [i.get("key") for i in source.get("items") or [] if i.get("key") not in data]
        if missing:
            return [("FailedMount", f'MountVolume.SetUp failed for volume "{volume}" : configmap references '
                                    f"non-existent config key: {missing[0]}" if kind == "configmap" else
                     f'MountVolume.SetUp failed for volume "{volume}" : references non-existent secret key: '
                     f"{missing[0]}")]
        return []

    async def run(self) -> bool:
        changed = False
        for pod in self.emu.read_all(PODS):
            spec, meta = pod.get("spec") or {}, _meta(pod)
            if not spec.get("nodeName") or _phase(pod) != "Pending" or not _live(pod):
                continue
            if self.emu.read(NODES, None, spec["nodeName"]) is None:
                continue
            pulls = self._pull_problems(pod)
            problems = self._mount_problems(pod) + pulls
            if problems:
                for reason, message in problems:
                    await self.event(pod, "Warning", reason, message)
                waiting = "ErrImagePull" if pulls else "CreateContainerConfigError" if any(
                    r == "Failed" for r, _ in problems) else "ContainerCreating"
                statuses = [{"name": c.get("name"), "ready": False, "restartCount": 0, "image": c.get("image"),
                             "state": {"waiting": {"reason": waiting}}} for c in spec.get("containers") or []]
                if (pod.get("status") or {}).get("containerStatuses") != statuses:
                    with self.acting():
                        await self.emu.patch_status(PODS, meta["namespace"], meta["name"],
                                                    {"phase": "Pending", "containerStatuses": statuses})
                    changed = True
                continue
            started = _now()
            statuses = [{"name": c.get("name"), "ready": True, "started": True, "restartCount": 0,
                         "image": c.get("image"), "state": {"running": {"startedAt": started}}}
                        for c in spec.get("containers") or []]
            conditions = [{"type": t, "status": "True", "lastTransitionTime": started}
                          for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
            with self.acting():
                await self.emu.patch_status(PODS, meta["namespace"], meta["name"], {
                    "phase": "Running", "startTime": started, "podIP": f"10.244.0.{len(self.emu.store) % 250 + 2}",
                    "conditions": conditions, "containerStatuses": statuses})
            await self.event(pod, "Normal", "Started", f"Started container {spec['containers'][0].get('name')}")
            changed = True
        return changed

    async def terminate(self, pod: dict[str, Any], *, exit_code: int = 0, message: str = "") -> dict[str, Any]:
        """End a running pod's containers (as its process exiting would): Succeeded on 0, else Failed."""
        meta, spec = _meta(pod), pod.get("spec") or {}
        statuses = [{"name": c.get("name"), "ready": False, "restartCount": 0, "image": c.get("image"),
                     "state": {"terminated": {"exitCode": exit_code, "message": message,
                                              "reason": "Completed" if exit_code == 0 else "Error",
                                              "finishedAt": _now()}}} for c in spec.get("containers") or []]
        with self.acting():
            return await self.emu.patch_status(PODS, meta["namespace"], meta["name"], {
                "phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": statuses,
                "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}]})


# --- workloads ------------------------------------------------------------------------------------------------


def template_hash(template: Any) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _resolve(value: Any, replicas: int, *, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = Fraction(int(value[:-1]) * replicas, 100)
        return int(-(-exact // 1)) if round_up else int(exact // 1)
    return int(value or 0)


class Workloads(Step):
    """Pods from templates: what the ReplicaSet and Job controllers do."""

    component = "kube-controller-manager"

    async def create_pod(self, owner: dict[str, Any], template: dict[str, Any], prefix: str,
                         extra_labels: dict[str, str]) -> dict[str, Any] | None:
        meta = _meta(owner)
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": prefix, "namespace": meta["namespace"],
                             "labels": {**((template.get("metadata") or {}).get("labels") or {}), **extra_labels},
                             "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                             "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                                  "name": meta["name"], "uid": meta["uid"], "controller": True,
                                                  "blockOwnerDeletion": True}]},
                "spec": json.loads(json.dumps(template.get("spec") or {}))}
        try:
            with self.acting():
                return await self.emu.create_obj(PODS, meta["namespace"], body)
        except ApiError as exc:
            await self.event(owner, "Warning", "FailedCreate", f"Error creating: {exc.message}")
            return None


class Deployments(Workloads):
    """The Deployment controller (without ReplicaSets: pods carry the template hash and point at the Deployment)."""

    async def run(self) -> bool:
        changed = False
        for dep in self.emu.read_all(DEPLOYMENTS):
            if _meta(dep).get("deletionTimestamp"):
                continue
            changed |= await self._sync(dep)
        return changed

    async def _sync(self, dep: dict[str, Any]) -> bool:
        meta, spec = _meta(dep), dep.get("spec") or {}
        template = spec.get("template") or {}
        current = template_hash(template)
        pods = [p for p in self.emu.read_all(PODS, meta["namespace"]) if _owned_by(p, dep) and _live(p)]
        new = [p for p in pods if (_meta(p).get("labels") or {}).get("pod-template-hash") == current]
        old = [p for p in pods if p not in new]
        replicas = int(spec.get("replicas", 1))
        strategy = spec.get("strategy") or {}
        changed = False
        if strategy.get("type") == "Recreate":
            if old:
                for p in old:
                    await self._delete(p)
                return True
            for _ in range(replicas - len(new)):
                changed |= await self.create_pod(dep, template, f"{meta['name']}-{current}-",
                                                 {"pod-template-hash": current}) is not None
        else:
            rolling = strategy.get("rollingUpdate") or {}
            surge = _resolve(rolling.get("maxSurge", "25%"), replicas, round_up=True)
            unavailable = _resolve(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
            if surge == 0 and unavailable == 0:
                unavailable = 1
            room = replicas + surge - len(pods)
            for _ in range(max(0, min(replicas - len(new), room))):
                changed |= await self.create_pod(dep, template, f"{meta['name']}-{current}-",
                                                 {"pod-template-hash": current}) is not None
            ready = sum(_ready(p) for p in pods)
            removable = ready - (replicas - unavailable)
            for p in sorted(old, key=_ready):  # unready old pods first: they cost no availability
                if not _ready(p):
                    await self._delete(p)
                    changed = True
                elif removable > 0:
                    await self._delete(p)
                    removable -= 1
                    changed = True
            for p in new[replicas:]:
                await self._delete(p)
                changed = True
        changed |= await self._status(dep)
        return changed

    async def _delete(self, pod: dict[str, Any]) -> None:
        with self.acting(), contextlib.suppress(ApiError):
            await self.emu.delete_obj(PODS, _meta(pod)["namespace"], _meta(pod)["name"])

    async def _status(self, dep: dict[str, Any]) -> bool:
        meta, spec = _meta(dep), dep.get("spec") or {}
        current = template_hash(spec.get("template") or {})
        pods = [p for p in self.emu.read_all(PODS, meta["namespace"]) if _owned_by(p, dep) and _live(p)]
        new = [p for p in pods if (_meta(p).get("labels") or {}).get("pod-template-hash") == current]
        replicas = int(spec.get("replicas", 1))
        ready = sum(_ready(p) for p in pods)
        rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        unavailable = _resolve(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
        complete = len(new) == replicas == len(pods) and all(_ready(p) for p in new)
        status = {
            "observedGeneration": meta.get("generation", 1), "replicas": len(pods), "updatedReplicas": len(new),
            "readyReplicas": ready, "availableReplicas": ready, "unavailableReplicas": max(0, replicas - ready),
            "conditions": [
                {"type": "Available", "status": "True" if ready >= replicas - unavailable else "False",
                 "reason": "MinimumReplicasAvailable" if ready >= replicas - unavailable
                 else "MinimumReplicasUnavailable"},
                {"type": "Progressing", "status": "True",
                 "reason": "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated"},
            ],
        }
        if {k: v for k, v in (dep.get("status") or {}).items()} == status:
            return False
        with self.acting():
            await self.emu.patch_status(DEPLOYMENTS, meta["namespace"], meta["name"], status)
        return True


class Jobs(Workloads):
    """The Job controller: one pod at a time (completions 1), back-off and pod failure policy by counts."""

    async def run(self) -> bool:
        changed = False
        for job in self.emu.read_all(JOBS):
            meta, spec, status = _meta(job), job.get("spec") or {}, job.get("status") or {}
            if meta.get("deletionTimestamp") or spec.get("suspend"):
                continue
            if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in status.get("conditions") or []):
                continue
            uid = meta["uid"]
            pods = [p for p in self.emu.read_all(PODS, meta["namespace"])
                    if (_meta(p).get("labels") or {}).get("batch.kubernetes.io/controller-uid") == uid]
            succeeded = sum(_phase(p) == "Succeeded" for p in pods)
            failed = [p for p in pods if _phase(p) == "Failed"]
            active = [p for p in pods if _live(p)]
            condition: dict[str, Any] | None = None
            if succeeded >= int(spec.get("completions", 1)):
                condition = {"type": "Complete", "status": "True"}
            elif self._fail_job(spec, failed):
                condition = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                             "message": "Container failed with an exit code matching a FailJob rule"}
            elif len(failed) > int(spec.get("backoffLimit", 6)):
                condition = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                             "message": "Job has reached the specified backoff limit"}
            elif not active:
                template = spec.get("template") or {}
                changed |= await self.create_pod(job, template, f"{meta['name']}-", {}) is not None
                active = [p for p in self.emu.read_all(PODS, meta["namespace"])
                          if (_meta(p).get("labels") or {}).get("batch.kubernetes.io/controller-uid") == uid
                          and _live(p)]
            new_status: dict[str, Any] = {"active": len(active), "succeeded": succeeded, "failed": len(failed),
                                          "ready": sum(_ready(p) for p in active)}
            if condition is not None:
                new_status["conditions"] = [{**condition, "lastTransitionTime": _now()}]
                new_status["active"] = 0
            if any(status.get(k) != v for k, v in new_status.items() if k != "conditions") or condition:
                with self.acting():
                    await self.emu.patch_status(JOBS, meta["namespace"], meta["name"], new_status)
                changed = True
        return changed

    @staticmethod
    def _fail_job(spec: dict[str, Any], failed: list[dict[str, Any]]) -> bool:
        rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
        for pod in failed:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
                for rule in rules:
                    codes = rule.get("onExitCodes") or {}
                    if rule.get("action") == "FailJob" and codes and code in (codes.get("values") or []) and \
                            codes.get("containerName") in (None, cs.get("name")):
                        return True
        return False


class Namespaces(Step):
    """The namespace controller: deletes what a terminating namespace holds, then the namespace."""

    component = "namespace-controller"

    async def run(self) -> bool:
        changed = False
        for ns in self.emu.read_all(NAMESPACES):
            meta = _meta(ns)
            if not meta.get("deletionTimestamp"):
                continue
            name = meta["name"]
            contents = [(k, o) for (k, namespace, _), o in list(self.emu.store.items()) if namespace == name]
            for key, obj in contents:
                if not _meta(obj).get("deletionTimestamp"):
                    with self.acting(), contextlib.suppress(ApiError):
                        await self.emu.delete_obj(key, name, _meta(obj)["name"])
                    changed = True
            left = [o for (k, namespace, _), o in self.emu.store.items() if namespace == name]
            if left:
                finalizers = Counter(f for o in left for f in _meta(o).get("finalizers") or [])
                message = "Some content in the namespace has finalizers remaining: " + ", ".join(
                    f"{f} in {n} resource instances" for f, n in sorted(finalizers.items()))
                conditions = [{"type": "NamespaceFinalizersRemaining", "status": "True",
                               "reason": "SomeFinalizersRemain", "message": message}] if finalizers else []
                if (ns.get("status") or {}).get("conditions") != conditions:
                    with self.acting():
                        await self.emu.patch_status(NAMESPACES, None, name, {"conditions": conditions})
                    changed = True
                continue
            with self.acting():
                stored = self.emu.store.get((NAMESPACES, None, name))
                if stored is not None:
                    stored.setdefault("spec", {})["finalizers"] = []
                    await self.emu._remove((NAMESPACES, None, name))
            changed = True
        return changed


class Hpas(Step):
    """What the HPA controller needs before it can scale: metrics it can read for the target's pods."""

    component = "horizontal-pod-autoscaler"

    def __init__(self, emu: Emulator) -> None:
        super().__init__(emu)
        self.custom_metrics: set[str] = set()  # the metric names a custom-metrics adapter serves

    async def run(self) -> bool:
        changed = False
        for hpa in self.emu.read_all(HPAS):
            meta, spec = _meta(hpa), hpa.get("spec") or {}
            ref = spec.get("scaleTargetRef") or {}
            target = self.emu.read(DEPLOYMENTS, meta["namespace"], ref.get("name", "")) \
                if ref.get("kind") == "Deployment" else None
            condition = {"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound",
                         "message": "the HPA was able to successfully calculate a replica count"}
            if target is None:
                condition = {"type": "ScalingActive", "status": "False", "reason": "FailedGetScale",
                             "message": f'deployments/scale.apps "{ref.get("name")}" not found'}
            else:
                problem = self._problem(spec, target)
                if problem is not None:
                    condition = {"type": "ScalingActive", "status": "False", "reason": problem[0],
                                 "message": f"the HPA was unable to compute the replica count: {problem[1]}"}
            conditions = [{"type": "AbleToScale", "status": "True", "reason": "SucceededGetScale"}, condition]
            if (hpa.get("status") or {}).get("conditions") != conditions:
                with self.acting():
                    await self.emu.patch_status(HPAS, meta["namespace"], meta["name"], {
                        "conditions": conditions,
                        "currentReplicas": ((target or {}).get("status") or {}).get("replicas", 0),
                        "desiredReplicas": ((target or {}).get("spec") or {}).get("replicas", 0)})
                changed = True
            if condition["status"] == "False":
                await self.event(hpa, "Warning", condition["reason"], condition["message"])
        return changed

    def _problem(self, spec: dict[str, Any], target: dict[str, Any]) -> tuple[str, str] | None:
        template = ((target.get("spec") or {}).get("template") or {}).get("spec") or {}
        pod_name = f"{_meta(target).get('name')}-{template_hash((target.get('spec') or {}).get('template'))}-x"
        for metric in spec.get("metrics") or []:
            if metric.get("type") == "Resource":
                resource = (metric.get("resource") or {}).get("name")
                if ((metric.get("resource") or {}).get("target") or {}).get("type") != "Utilization":
                    continue
                for c in template.get("containers") or []:
                    if resource not in ((c.get("resources") or {}).get("requests") or {}):
                        return ("FailedGetResourceMetric",
                                f"failed to get {resource} utilization: missing request for {resource} in "
                                f'container "{c.get("name")}" of Pod "{pod_name}"')
            elif metric.get("type") == "Pods":
                name = (metric.get("pods") or {}).get("metric", {}).get("name")
                if name not in self.custom_metrics:
                    return ("FailedGetPodsMetric",
                            f"unable to get metric {name}: unable to fetch metrics from custom metrics API: the "
                            f"server could not find the metric {name} for pods")
        return None


class Controllers:
    """Every stand-in, in the order a cluster's would act on a change; `settle` runs them until quiet."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.volumes = Volumes(emu)
        self.deployments = Deployments(emu)
        self.jobs = Jobs(emu)
        self.scheduler = Scheduler(emu)
        self.kubelet = Kubelet(emu)
        self.namespaces = Namespaces(emu)
        self.hpas = Hpas(emu)

    @property
    def steps(self) -> list[Step]:
        return [self.namespaces, self.deployments, self.jobs, self.volumes, self.scheduler, self.volumes,
                self.kubelet, self.deployments, self.hpas]

    async def settle(self, rounds: int = 30) -> int:
        """Run the controllers until a round changes nothing (at most `rounds`); the number of rounds run."""
        for n in range(1, rounds + 1):
            changed = False
            for step in self.steps:
                changed |= await step.run()
            if not changed:
                return n
        return rounds

    async def add_node(self, name: str, *, cpu: str = "4", memory: str = "8Gi", labels: dict[str, str] | None = None,
                       taints: list[dict[str, str]] | None = None, extended: dict[str, str] | None = None,
                       host_dirs: set[str] | None = None) -> dict[str, Any]:
        """A Ready node with this allocatable capacity, labels, taints and existing host directories."""
        allocatable = {"cpu": cpu, "memory": memory, "pods": "110", **(extended or {})}
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                      **(labels or {})}},
                "spec": {"taints": taints or []},
                "status": {"allocatable": allocatable, "capacity": allocatable,
                           "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}
        node = await self.emu.create_obj(NODES, None, body)
        self.emu.host_dirs[name] |= set(host_dirs or ())
        return node
