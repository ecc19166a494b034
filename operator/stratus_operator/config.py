"""The operator's one Config, read from STRATUS_* environment variables by the workers' settings parser."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stratus_operator.spec import Toleration
from stratus_workers.settings import env_name, parse_config

PREFIX = env_name("")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _namespaces(raw: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in raw.split(",") if n.strip())


# Any of these makes a namespace entry a kopf pattern (a glob or a negation) rather than a name. The chart's
# RBAC decision is generated from it (`make manifests` writes it into the chart's _rules.tpl).
NAMESPACE_PATTERN_CHARS = "*?[!"


def named_namespaces_only(namespaces: Sequence[str]) -> bool:
    """Whether `namespaces` names namespaces exactly (no globs or negations): there is nothing to discover.

    Empty is the whole cluster, not exact names. The operator turns kopf's discovery of namespaces and CRDs
    off in this mode, and the chart grants nothing that only discovery needs.
    """
    return bool(namespaces) and not any(set(ns) & set(NAMESPACE_PATTERN_CHARS) for ns in namespaces)


def _names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    bad = [n for n in names if not _DNS_SUBDOMAIN.match(n)]
    if bad:
        raise ValueError(f"not Secret names: {', '.join(bad)}")
    return names


def _node_selector(raw: str) -> dict[str, str]:
    parsed = json.loads(raw or "{}")
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise ValueError("expected a JSON object of strings")
    return parsed


def _tolerations(raw: str) -> tuple[Mapping[str, Any], ...]:
    parsed = json.loads(raw or "[]")
    if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
        raise ValueError("expected a JSON list of tolerations")
    for t in parsed:
        Toleration.model_validate(t)  # a ValidationError is a ValueError naming the field
    return tuple(parsed)


def _peers(raw: str) -> tuple[Mapping[str, Any], ...]:
    parsed = json.loads(raw or "[]")
    allowed = {"podSelector", "namespaceSelector", "ipBlock"}
    if not isinstance(parsed, list) or not all(isinstance(p, dict) and p and set(p) <= allowed for p in parsed):
        raise ValueError("expected a JSON list of NetworkPolicyPeers (podSelector, namespaceSelector, ipBlock)")
    return tuple(parsed)


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class Config:
    """Everything an operator process is configured with: STRATUS_<FIELD_NAME>, documented by each help."""

    namespaces: tuple[str, ...] = field(default=(), metadata=_doc(
        "comma-separated namespaces (globs allowed) to watch; empty: the whole cluster", parse=_namespaces))
    image: str = field(default="ghcr.io/stratus-llm/stratus-workers:0.1.0", metadata=_doc(
        "the image that runs the workers (serve, router, compress) and the model fetch"))
    cloud_image: str = field(default="", metadata=_doc(
        "the image of cloud model servers (a CUDA build); empty: STRATUS_IMAGE"))
    edge_image: str = field(default="", metadata=_doc(
        "the image of edge model servers (a CPU build, multi-arch for arm64 devices); empty: STRATUS_IMAGE"))
    image_pull_policy: str = field(default="IfNotPresent", metadata=_doc(
        "imagePullPolicy of every container the operator creates"))
    image_pull_secrets: tuple[str, ...] = field(default=(), metadata=_doc(
        "comma-separated Secrets (in each deployment's namespace) every pod the operator creates pulls with",
        parse=_names))
    service_account: str = field(default="", metadata=_doc(
        "serviceAccountName of every pod the operator creates (e.g. one bound to a cloud IAM role for s3:// "
        "access through IRSA or Workload Identity); empty: the namespace's default, with no API token mounted"))
    s3_image: str = field(default="amazon/aws-cli:2.17.0", metadata=_doc(
        "image with the aws CLI, for s3:// model sources and object-store artifacts"))
    # Empty (the default): an emptyDir per pod (each pod fetches its own copy), which a namespace enforcing the
    # restricted Pod Security Standard admits; a hostPath is opt-in. Bundled models come from the image.
    cache_host_path: str = field(default="", metadata=_doc(
        "a per-node cache directory (a hostPath of type Directory: it must exist on every node, writable by uid "
        "65532) for s3:// and hf:// models, object-store artifacts and compression baselines; empty: an emptyDir "
        "per pod. An LLMDeployment's spec.cache.hostPath overrides it"))
    job_deadline_seconds: int = field(default=6 * 3600, metadata=_doc(
        "activeDeadlineSeconds of a compression Job"))
    health_port: int = field(default=8081, metadata=_doc("port of the liveness endpoint (/healthz); 0 disables it"))
    metrics_port: int = field(default=9090, metadata=_doc(
        "port of the Prometheus endpoint (/metrics); 0 disables it"))
    resync_seconds: float = field(default=60.0, metadata=_doc(
        "every LLMDeployment is re-reconciled this often, events or not"))
    peering: str = field(default="", metadata=_doc(
        "a kopf peering name for running several replicas (one active); empty: standalone"))
    worker_limit: int = field(default=0, metadata=_doc("concurrent reconciles (kopf's worker limit); 0: unlimited"))
    finalizer: str = field(default="stratus.dev/finalizer", metadata=_doc(
        "the finalizer the operator puts on LLMDeployments"))
    edge_node_selector: Mapping[str, str] = field(default_factory=dict, metadata=_doc(
        'JSON object: the nodeSelector of edge variants that set none (e.g. {"stratus.dev/edge": "true"})',
        parse=_node_selector))
    edge_tolerations: tuple[Mapping[str, Any], ...] = field(default=(), metadata=_doc(
        "JSON list of Pod tolerations for edge variants that set none", parse=_tolerations))
    cloud_node_selector: Mapping[str, str] = field(default_factory=dict, metadata=_doc(
        "JSON object: the nodeSelector of cloud tiers that set none", parse=_node_selector))
    cloud_tolerations: tuple[Mapping[str, Any], ...] = field(default=(), metadata=_doc(
        'JSON list of Pod tolerations for cloud tiers that set none (e.g. [{"key": "nvidia.com/gpu", "operator": '
        '"Exists", "effect": "NoSchedule"}] where GPU nodes are tainted and no admission plugin adds it)',
        parse=_tolerations))
    network_policies: bool = field(default=True, metadata=_doc(
        "give every LLMDeployment a NetworkPolicy: its model servers accept gRPC only from its router"))
    router_ingress_from: tuple[Mapping[str, Any], ...] = field(default=(), metadata=_doc(
        "JSON list of NetworkPolicyPeers allowed to reach the routers (e.g. [{\"namespaceSelector\": "
        "{\"matchLabels\": {\"team\": \"apps\"}}}]); empty: anyone", parse=_peers))
    gpu_resource_name: str = field(default="nvidia.com/gpu", metadata=_doc(
        "the extended resource GPUs are requested and counted as"))

    @property
    def named_namespaces_only(self) -> bool:
        """Scoped to namespaces named exactly (no globs or negations): there is nothing to discover."""
        return named_namespaces_only(self.namespaces)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read each field from STRATUS_<NAME> in `env` (default os.environ); unset ones keep their default.

        Raises ValueError naming the variable when a value does not parse.
        """
        # No flags: `stratus operator` turns its own flags into these variables before the operator reads them.
        return parse_config(cls, [], prog="stratus operator", environ=env)
