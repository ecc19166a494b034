"""The kopf indexes a reconcile reads instead of listing the API: their names, their records, a typed reader.

main.py registers each index under the name here; `Observed` reads them back from a handler's kwargs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stratus_operator.kube import CHILDREN, Resource
from stratus_operator.placement import ClusterView, NodeView, Resources

# Nodes by name -> NodeView.
NODES_INDEX = "stratus_nodes"
# Pods: ("node", node name) -> PodHold, and ("job", namespace, Job name) -> a compress container's message.
PODS_INDEX = "stratus_pods"


def child_index(resource: Resource) -> str:
    """The index of one kind of child: (namespace, instance) -> ChildInfo."""
    return f"stratus_{resource.plural}"


CHILD_INDEXES: tuple[str, ...] = tuple(child_index(r) for r in CHILDREN)
INDEXES: tuple[str, ...] = (NODES_INDEX, PODS_INDEX, *CHILD_INDEXES)


@dataclass(frozen=True)
class ChildInfo:
    """What the operator remembers about one of its children (kept small: 1,000s of them sit in memory)."""

    api_version: str
    kind: str
    name: str
    spec_hash: str
    # apply.live_fingerprint of the object as last seen: what drift is measured against.
    live: str = ""
    ready: int = 0
    # For PersistentVolumeClaims: status.phase (Pending, Bound, Lost), and what the claim was created with
    # ({"accessMode", "size", "storageClassName"}): a claim's spec never changes after that.
    phase: str = ""
    claim: Mapping[str, str] | None = None
    # For Jobs: {"spec": {"backoffLimit"}, "status": {...}, "generation": the owner's, at creation}.
    job: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PodHold:
    """Resources a pod holds on a node, and whose pod it is (instance is None for pods not ours)."""

    namespace: str
    instance: str | None
    requests: Resources


@dataclass(frozen=True)
class Observed:
    """The kopf indexes a reconcile reads, behind a typed face."""

    indexes: Mapping[str, Any]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Observed:
        return cls({k: kwargs[k] for k in INDEXES if k in kwargs})

    def _values(self, index: str, key: Any) -> Iterable[Any]:
        idx = self.indexes.get(index)
        if idx is None or key not in idx:
            return ()
        return list(idx[key])

    def children(self, namespace: str, instance: str) -> dict[tuple[str, str], ChildInfo]:
        """The deployment's children by (kind, name)."""
        out: dict[tuple[str, str], ChildInfo] = {}
        for index in CHILD_INDEXES:
            for info in self._values(index, (namespace, instance)):
                out[(info.kind, info.name)] = info
        return out

    def job_message(self, namespace: str, job: str) -> str | None:
        """The latest termination message of the Job's compress container, if any pod has one."""
        messages = [m for m in self._values(PODS_INDEX, ("job", namespace, job)) if m is not None]
        return messages[-1] if messages else None

    def cluster(self, namespace: str, instance: str) -> ClusterView:
        """Nodes with the requests of every pod but this deployment's own (so its placement stays put)."""
        nodes_idx = self.indexes.get(NODES_INDEX) or {}
        pods_idx = self.indexes.get(PODS_INDEX) or {}
        views: list[NodeView] = []
        for name in sorted(k for k in nodes_idx):
            for node in nodes_idx[name]:
                held = Resources()
                key = ("node", node.name)
                if key in pods_idx:
                    for hold in pods_idx[key]:
                        if hold.namespace == namespace and hold.instance == instance:
                            continue
                        held = held + hold.requests
                views.append(NodeView(name=node.name, labels=node.labels, taints=node.taints,
                                      allocatable=node.allocatable, requested=held, ready=node.ready,
                                      unschedulable=node.unschedulable))
        return ClusterView(nodes=tuple(views))
