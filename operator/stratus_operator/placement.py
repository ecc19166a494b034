"""Pure edge placement: which nodes match a tier's selector, tolerate its taints and have room for it."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from stratus_operator.spec import ResourceRequirements, Toleration
from stratus_workers.models.source import BUNDLED_SMOLLM2, SourceKind, parse_source

GPU_RESOURCE = "nvidia.com/gpu"
HOSTNAME_LABEL = "kubernetes.io/hostname"
MIB = 1024 * 1024
# A served model takes more memory than its file: activations, KV cache, the Python/torch runtime.
MODEL_MEMORY_FACTOR = 1.25
RUNTIME_MEMORY_BYTES = 512 * MIB
DEFAULT_EDGE_CPU_MILLI = 500
# A cloud pod's requests when its resources name none: one core, and memory for the model held in fp32
# (the loader's peak, before it moves the weights to the GPU) where its size is known, else 4 GiB.
DEFAULT_CLOUD_CPU_MILLI = 1000
DEFAULT_CLOUD_MEMORY_BYTES = 4 * 1024 * MIB
# Parameters of the models whose size is known before anything is downloaded.
BUNDLED_PARAMETERS = {BUNDLED_SMOLLM2: 135_000_000}
LOCAL_NODE = "localhost"

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15),
    "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40), "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ("500m", "1.5Gi", "2", 3) as a Decimal; raises ValueError when malformed."""
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]
    except InvalidOperation as exc:
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from exc


def format_bytes(n: int) -> str:
    """Bytes as the largest binary unit that keeps one decimal, e.g. 1.5Gi."""
    for unit, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)


@dataclass(frozen=True, order=True)
class Resources:
    """The three resources placement weighs: CPU (millicores), memory (bytes) and GPUs."""

    cpu_milli: int = 0
    memory: int = 0
    gpu: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu_milli + other.cpu_milli, self.memory + other.memory, self.gpu + other.gpu)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu_milli - other.cpu_milli, self.memory - other.memory, self.gpu - other.gpu)

    def scaled(self, n: int) -> Resources:
        return Resources(self.cpu_milli * n, self.memory * n, self.gpu * n)

    def fits_in(self, free: Resources) -> bool:
        return self.cpu_milli <= free.cpu_milli and self.memory <= free.memory and self.gpu <= free.gpu

    def describe(self) -> str:
        parts = [f"cpu {self.cpu_milli}m", f"memory {format_bytes(self.memory)}"]
        if self.gpu:
            parts.append(f"{self.gpu} GPU")
        return ", ".join(parts)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], gpu_resource: str = GPU_RESOURCE) -> Resources:
        """From a requests/allocatable map such as {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}."""
        cpu = values.get("cpu")
        memory = values.get("memory")
        gpu = values.get(gpu_resource)
        return cls(
            cpu_milli=math.ceil(parse_quantity(cpu) * 1000) if cpu is not None else 0,
            memory=math.ceil(parse_quantity(memory)) if memory is not None else 0,
            gpu=math.ceil(parse_quantity(gpu)) if gpu is not None else 0,
        )


@dataclass(frozen=True)
class Taint:
    """A node taint; NoSchedule and NoExecute keep untolerating pods off, PreferNoSchedule only discourages."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """Kubernetes' toleration matching rule."""
    if toleration.effect is not None and toleration.effect != taint.effect:
        return False
    if toleration.operator == "Exists":
        return not toleration.key or toleration.key == taint.key
    return toleration.key == taint.key and (toleration.value or "") == taint.value


@dataclass(frozen=True)
class NodeView:
    """What placement knows about one node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    allocatable: Resources = Resources()
    requested: Resources = Resources()
    ready: bool = True
    unschedulable: bool = False

    @property
    def free(self) -> Resources:
        return self.allocatable - self.requested

    @property
    def hostname(self) -> str:
        return self.labels.get(HOSTNAME_LABEL, self.name)


def _pod_requests(pod: Mapping[str, Any], gpu_resource: str) -> Resources:
    spec = pod.get("spec") or {}
    total = Resources()
    for container in spec.get("containers") or []:
        total = total + Resources.from_mapping((container.get("resources") or {}).get("requests") or {},
                                               gpu_resource)
    # Init containers run before the others, so a pod needs the larger of the two, per resource.
    for container in spec.get("initContainers") or []:
        init = Resources.from_mapping((container.get("resources") or {}).get("requests") or {}, gpu_resource)
        total = Resources(max(total.cpu_milli, init.cpu_milli), max(total.memory, init.memory),
                          max(total.gpu, init.gpu))
    return total


def pod_node_requests(pod: Mapping[str, Any], gpu_resource: str = GPU_RESOURCE) -> tuple[str, Resources] | None:
    """(node name, requests) of a pod that holds node resources, or None (unscheduled or finished)."""
    node = (pod.get("spec") or {}).get("nodeName")
    phase = (pod.get("status") or {}).get("phase")
    if not node or phase in ("Succeeded", "Failed"):
        return None
    return node, _pod_requests(pod, gpu_resource)


def node_view(node: Mapping[str, Any], requested: Resources = Resources(),
              gpu_resource: str = GPU_RESOURCE) -> NodeView:
    """A NodeView from a v1 Node object."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return NodeView(
        name=meta.get("name", ""),
        labels=dict(meta.get("labels") or {}),
        taints=tuple(Taint(t.get("key", ""), t.get("value") or "", t.get("effect", "NoSchedule"))
                     for t in spec.get("taints") or []),
        allocatable=Resources.from_mapping(status.get("allocatable") or status.get("capacity") or {}, gpu_resource),
        requested=requested,
        # A node without conditions (as in tests or a fresh node object) counts as ready.
        ready=conditions.get("Ready", "True") == "True",
        unschedulable=bool(spec.get("unschedulable")),
    )


@dataclass(frozen=True)
class ClusterView:
    """The nodes placement chooses from; `local()` is this one machine, where every tier fits."""

    nodes: tuple[NodeView, ...] = ()
    is_local: bool = False

    @classmethod
    def local(cls) -> ClusterView:
        """This one machine: every tier fits, no labels or taints (the `stratus up` executor)."""
        return cls(nodes=(), is_local=True)

    @classmethod
    def from_objects(
        cls,
        nodes: Iterable[Mapping[str, Any]],
        pods: Iterable[Mapping[str, Any]] = (),
        *,
        ignore_pod_labels: Mapping[str, str] | None = None,
        gpu_resource: str = GPU_RESOURCE,
    ) -> ClusterView:
        """From v1 Node and Pod objects; pods carrying all of `ignore_pod_labels` (our own) are not counted."""
        per_node: dict[str, Resources] = {}
        for pod in pods:
            labels = (pod.get("metadata") or {}).get("labels") or {}
            if ignore_pod_labels and all(labels.get(k) == v for k, v in ignore_pod_labels.items()):
                continue
            held = pod_node_requests(pod, gpu_resource)
            if held is not None:
                per_node[held[0]] = per_node.get(held[0], Resources()) + held[1]
        return cls(nodes=tuple(node_view(n, per_node.get((n.get("metadata") or {}).get("name", ""), Resources()),
                                         gpu_resource) for n in nodes))


@dataclass(frozen=True)
class Placement:
    """Where a tier's replicas go, and why (or why nowhere)."""

    wanted_replicas: int
    assignments: tuple[str, ...] = ()
    reason: str = ""

    @property
    def placed_replicas(self) -> int:
        return len(self.assignments)

    @property
    def placed(self) -> bool:
        return self.placed_replicas > 0 or self.wanted_replicas == 0

    @property
    def complete(self) -> bool:
        return self.placed_replicas >= self.wanted_replicas

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.assignments)))


def _requested(resources: ResourceRequirements, gpu_resource: str) -> Resources:
    # What the API server will request: a limit without a request becomes the request too.
    return Resources.from_mapping({**resources.limits, **resources.requests}, gpu_resource)


def edge_demand(
    resources: ResourceRequirements, size_bytes: int, gpu_resource: str = GPU_RESOURCE, cache_bytes: int = 0
) -> Resources:
    """One edge pod's requests: explicit values win; memory otherwise follows the variant's measured size,
    plus `cache_bytes` that its server takes for caches whatever its traffic (a llama.cpp server's whole KV cache, a
    torch server's prefix cache of the size the manifest gives)."""
    explicit = _requested(resources, gpu_resource)
    return Resources(
        cpu_milli=explicit.cpu_milli or DEFAULT_EDGE_CPU_MILLI,
        memory=explicit.memory or _serving_memory(size_bytes, cache_bytes),
        gpu=explicit.gpu,
    )


def _serving_memory(model_bytes: int, cache_bytes: int = 0) -> int:
    return math.ceil((model_bytes * MODEL_MEMORY_FACTOR + RUNTIME_MEMORY_BYTES + cache_bytes) / MIB) * MIB


def cloud_demand(resources: ResourceRequirements, source: str, gpu_resource: str = GPU_RESOURCE) -> Resources:
    """One cloud pod's cpu and memory requests: explicit values win, else the defaults above."""
    explicit = _requested(resources, gpu_resource)
    parsed = parse_source(source)
    params = BUNDLED_PARAMETERS.get(parsed.ref) if parsed.kind is SourceKind.BUNDLED else None
    memory = explicit.memory or (_serving_memory(params * 4) if params else DEFAULT_CLOUD_MEMORY_BYTES)
    return Resources(cpu_milli=explicit.cpu_milli or DEFAULT_CLOUD_CPU_MILLI, memory=memory, gpu=explicit.gpu)


def _rejection(node: NodeView, selector: Mapping[str, str], tolerations: Sequence[Toleration]) -> str | None:
    """Why the node can never take the pod (capacity aside), or None."""
    if not node.ready:
        return "not ready"
    if node.unschedulable:
        return "cordoned"
    for key, value in selector.items():
        if node.labels.get(key) != value:
            return f"lacks label {key}={value}"
    for taint in node.taints:
        if taint.effect in ("NoSchedule", "NoExecute") and not any(tolerates(t, taint) for t in tolerations):
            return f"has untolerated taint {taint}"
    return None


def place(
    cluster: ClusterView,
    *,
    what: str,
    demand: Resources,
    replicas: int,
    node_selector: Mapping[str, str],
    tolerations: Sequence[Toleration],
    reserved: Mapping[str, Resources] | None = None,
    current: Sequence[str] = (),
) -> Placement:
    """Place `replicas` pods needing `demand` each, spreading over the emptiest eligible nodes.

    `reserved` holds what earlier placements in the same plan took from each node. `current` are the nodes
    the tier runs on now: each keeps one replica while it is eligible and still has room, so an unrelated pod
    landing elsewhere (or on it, if room is left) does not move a healthy server. The reason says which
    nodes were chosen, or summarises why each node was rejected when some replicas did not fit.
    """
    if cluster.is_local:
        return Placement(replicas, (LOCAL_NODE,) * replicas, "local machine: every tier fits")
    if replicas == 0:
        return Placement(0, (), "0 replicas requested")
    if not cluster.nodes:
        return Placement(replicas, (), f"no nodes in the cluster view for {what}")

    reserved = dict(reserved or {})
    rejected: dict[str, list[str]] = {}
    eligible: list[NodeView] = []
    for node in sorted(cluster.nodes, key=lambda n: n.name):
        why = _rejection(node, node_selector, tolerations)
        if why is None:
            eligible.append(node)
        else:
            rejected.setdefault(why, []).append(node.name)

    assignments: list[str] = []
    taken: dict[str, Resources] = {}
    by_name = {n.name: n for n in eligible}
    for name in sorted(set(current)):
        kept = by_name.get(name)
        if kept is None or len(assignments) >= replicas:
            continue
        if demand.fits_in(kept.free - reserved.get(name, Resources())):
            assignments.append(name)
            taken[name] = demand
    for _ in range(replicas - len(assignments)):
        best: tuple[tuple[int, int, int], NodeView] | None = None
        for node in eligible:  # sorted by name: ties go to the first
            free = node.free - reserved.get(node.name, Resources()) - taken.get(node.name, Resources())
            if not demand.fits_in(free):
                continue
            left = free - demand
            # Spread: prefer the node left with the most memory, then CPU; PreferNoSchedule taints last.
            prefer = 0 if any(t.effect == "PreferNoSchedule" for t in node.taints) else 1
            score = (prefer, left.memory, left.cpu_milli)
            if best is None or score > best[0]:
                best = (score, node)
        if best is None:
            break
        assignments.append(best[1].name)
        taken[best[1].name] = taken.get(best[1].name, Resources()) + demand

    per_pod = f"needs {demand.describe()} per pod"
    if len(assignments) == replicas:
        nodes = sorted(set(assignments))
        return Placement(replicas, tuple(assignments), f"{what}, which {per_pod}, placed on {', '.join(nodes)}")

    reasons: list[str] = []
    for why, names in sorted(rejected.items()):
        reasons.append(f"{len(names)} node{'s' if len(names) != 1 else ''} {why} ({', '.join(names[:3])}"
                       f"{', ...' if len(names) > 3 else ''})")
    if eligible:
        roomiest = max(eligible, key=lambda n: (n.free - reserved.get(n.name, Resources())).memory)
        free = roomiest.free - reserved.get(roomiest.name, Resources())
        too_small = [n.name for n in eligible if n.name not in assignments]
        if too_small:
            reasons.append(
                f"{len(too_small)} matching node{'s' if len(too_small) != 1 else ''} without room "
                f"(largest free: {free.describe()} on {roomiest.name})"
            )
    if not assignments:
        head = f"no node fits {what}, which {per_pod}"
    else:
        head = (f"only {len(assignments)} of {replicas} replicas of {what}, which {per_pod}, fit "
                f"on {', '.join(sorted(set(assignments)))}")
    return Placement(replicas, tuple(assignments), f"{head}: {'; '.join(reasons)}" if reasons else head)
