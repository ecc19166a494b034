"""Operator-process state shared by the handlers (kept in kopf's memo): config, API client, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import Counter, Gauge, Histogram

from stratus_operator.coalescer import Coalescer
from stratus_operator.config import Config
from stratus_operator.kube import Kube
from stratus_operator.render import RenderOptions

RECONCILES = Counter("stratus_operator_reconciles_total", "Reconciles of LLMDeployments, by result.", ["result"])
ERRORS = Counter("stratus_operator_reconcile_errors_total", "Failed reconciles, by error type.", ["error"])
DURATION = Histogram("stratus_operator_reconcile_duration_seconds", "Time per reconcile.",
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PHASES = Gauge("stratus_operator_deployments", "LLMDeployments by phase.", ["phase"])


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
    # mTLS Secrets found good, per deployment: (what was checked, checked until, content hash per pod owner).
    # Saves GETs per reconcile; a renewal or a rotated user Secret is seen when the entry runs out.
    tls_checked: dict[tuple[str, str], tuple[tuple[str, tuple[str, ...]], float, dict[str, str]]] = field(
        default_factory=dict)
    # Per deployment (namespace, name): what each child's last server-side apply left (apply.AppliedState), so
    # an unchanged child costs no call and a drifted one is applied again.
    applied: dict[tuple[str, str], dict[tuple[str, str], tuple[str, str, float]]] = field(default_factory=dict)
    # The liveness probe found LLMDeployments served by the API server (handle_probe_operator); checked until then.
    api_served: bool = False

    @classmethod
    def from_config(cls, config: Config, kube: Kube) -> Runtime:
        return cls(config=config, kube=kube, options=RenderOptions.from_config(config))

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
