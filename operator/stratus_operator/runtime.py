"""Operator-process state shared by the handlers: config, API client, metrics, indexed observations."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import Counter, Gauge, Histogram

from stratus_operator.config import Config
from stratus_operator.kube import Kube
from stratus_operator.placement import ClusterView, NodeView, Resources
from stratus_operator.render import RenderOptions

RECONCILES = Counter("stratus_operator_reconciles_total", "Reconciles of LLMDeployments, by result.", ["result"])
ERRORS = Counter("stratus_operator_reconcile_errors_total", "Failed reconciles, by error type.", ["error"])
DURATION = Histogram("stratus_operator_reconcile_duration_seconds", "Time per reconcile.",
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PHASES = Gauge("stratus_operator_deployments", "LLMDeployments by phase.", ["phase"])
CHILD_KINDS = ("jobs", "deployments", "services", "configmaps", "hpas", "pvcs")


@dataclass(frozen=True)
class ChildInfo:
    """What the operator remembers about one of its children (kept small: 1,000s of them sit in memory)."""

    api_version: str
    kind: str
    name: str
    spec_hash: str
    ready: int = 0
    # For Jobs: {"spec": {"backoffLimit"}, "status": {...}, "generation": the owner's, at creation}.
    job: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PodHold:
    """Resources a pod holds on a node, and whose pod it is."""

    namespace: str
    instance: str | None
    requests: Resources


@dataclass(frozen=True)
class Observed:
    """The kopf indexes a reconcile reads, behind a typed face."""

    indexes: Mapping[str, Any]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Observed:
        return cls({k: v for k, v in kwargs.items() if k.startswith("stratus_")})

    def _values(self, index: str, key: Any) -> Iterable[Any]:
        idx = self.indexes.get(index)
        if idx is None or key not in idx:
            return ()
        return list(idx[key])

    def children(self, namespace: str, instance: str) -> dict[tuple[str, str], ChildInfo]:
        out: dict[tuple[str, str], ChildInfo] = {}
        for kind in CHILD_KINDS:
            for info in self._values(f"stratus_{kind}", (namespace, instance)):
                out[(info.kind, info.name)] = info
        return out

    def job_message(self, namespace: str, job: str) -> str | None:
        messages = [m for m in self._values("stratus_pods", ("job", namespace, job)) if m is not None]
        return messages[-1] if messages else None

    def cluster(self, namespace: str, instance: str) -> ClusterView:
        """Nodes with the requests of every pod but this deployment's own (so its placement stays put)."""
        nodes_idx = self.indexes.get("stratus_nodes") or {}
        pods_idx = self.indexes.get("stratus_pods") or {}
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


@dataclass
class _Slot:
    running: bool = False
    dirty: bool = False
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Coalescer:
    """Runs at most one reconcile per object at a time; requests during a run fold into one rerun."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], _Slot] = {}

    async def run(self, key: tuple[str, str], fn: Callable[[], Awaitable[None]]) -> None:
        slot = self._slots.setdefault(key, _Slot())
        slot.dirty = True
        if slot.running:
            # Wait for the running loop to pick this request up, so callers see their change applied.
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            slot.waiters.append(waiter)
            await waiter
            return
        slot.running = True
        try:
            while slot.dirty:
                slot.dirty = False
                waiters, slot.waiters = slot.waiters, []
                try:
                    await fn()
                finally:
                    for w in waiters:
                        if not w.done():
                            w.set_result(None)
        finally:
            slot.running = False
            for w in slot.waiters:
                if not w.done():
                    w.set_result(None)
            slot.waiters = []
            self._slots.pop(key, None)


@dataclass
class Runtime:
    """Everything handlers share in one operator process (kept in kopf's memo)."""

    config: Config
    kube: Kube
    options: RenderOptions
    coalescer: Coalescer = field(default_factory=Coalescer)
    phases: dict[tuple[str, str], str] = field(default_factory=dict)
    # Last seen readiness signature per child uid: child events that change nothing trigger nothing.
    signatures: dict[str, Any] = field(default_factory=dict)
    # mTLS Secrets found good, per deployment: (secret name, hosts) -> (checked until, content hash).
    # Saves a GET per reconcile; a renewal or a rotated user Secret is seen when the entry runs out.
    tls_checked: dict[tuple[str, str], tuple[tuple[str, tuple[str, ...]], float, str]] = field(default_factory=dict)

    def set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        old = self.phases.pop(key, None)
        if old is not None:
            PHASES.labels(old).dec()
        if phase is not None:
            self.phases[key] = phase
            PHASES.labels(phase).inc()


def runtime_of(memo: Any) -> Runtime:
    rt = getattr(memo, "runtime", None)
    if not isinstance(rt, Runtime):
        raise kopf.TemporaryError("the operator runtime is not initialised yet", delay=1)
    return rt
