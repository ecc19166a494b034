"""The operator's one Config, read from STRATUS_* environment variables (each field says its variable)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from stratus_operator.render import RenderOptions
from stratus_operator.spec import Toleration

PREFIX = "STRATUS_"


@dataclass(frozen=True)
class Config:
    """Everything an operator process is configured with; `from_env()` reads STRATUS_<FIELD_NAME>."""

    # STRATUS_NAMESPACES: comma-separated namespaces (globs allowed) to watch; empty = the whole cluster.
    namespaces: tuple[str, ...] = ()
    # STRATUS_IMAGE: the image that runs the workers (serve, router, compress) and the model fetch.
    image: str = "ghcr.io/stratus-llm/stratus-workers:0.1.0"
    # STRATUS_IMAGE_PULL_POLICY: imagePullPolicy of every container the operator creates.
    image_pull_policy: str = "IfNotPresent"
    # STRATUS_S3_IMAGE: image with the aws CLI, for s3:// model sources and object-store artifacts.
    s3_image: str = "amazon/aws-cli:2.17.0"
    # STRATUS_CACHE_HOST_PATH: the per-node cache (a hostPath) that init containers fetch s3:// and hf://
    # models and object-store artifacts into; it must exist on every node and be writable by uid 65532.
    # Empty: an emptyDir per pod instead (each pod fetches its own copy; no hostPath, as the restricted
    # Pod Security Standard requires). Bundled models come from the image and need no cache.
    cache_host_path: str = "/var/cache/stratus"
    # STRATUS_JOB_DEADLINE_SECONDS: activeDeadlineSeconds of a compression Job.
    job_deadline_seconds: int = 6 * 3600
    # STRATUS_HEALTH_PORT: port of the liveness endpoint (/healthz); 0 disables it.
    health_port: int = 8081
    # STRATUS_METRICS_PORT: port of the Prometheus endpoint (/metrics); 0 disables it.
    metrics_port: int = 9090
    # STRATUS_RESYNC_SECONDS: every LLMDeployment is re-reconciled this often, events or not.
    resync_seconds: float = 60.0
    # STRATUS_PEERING: a kopf peering name for running several replicas (one active); empty = standalone.
    peering: str = ""
    # STRATUS_WORKER_LIMIT: concurrent reconciles (kopf's worker limit); 0 = unlimited.
    worker_limit: int = 0
    # STRATUS_FINALIZER: the finalizer the operator puts on LLMDeployments.
    finalizer: str = "stratus.dev/finalizer"
    # STRATUS_EDGE_NODE_SELECTOR: JSON object; the nodeSelector of edge variants that set none
    # (this cluster's edge-node label, e.g. {"stratus.dev/edge": "true"}).
    edge_node_selector: Mapping[str, str] = field(default_factory=dict)
    # STRATUS_EDGE_TOLERATIONS: JSON list of Pod tolerations for edge variants that set none.
    edge_tolerations: tuple[Mapping[str, Any], ...] = ()
    # STRATUS_GPU_RESOURCE_NAME: the extended resource GPUs are requested and counted as.
    gpu_resource_name: str = "nvidia.com/gpu"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read each field from STRATUS_<NAME>; unset variables keep the default above."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = PREFIX + f.name.upper()
            if key not in env:
                continue
            raw = env[key]
            default = f.default
            try:
                if f.name == "namespaces":
                    values[f.name] = tuple(n.strip() for n in raw.split(",") if n.strip())
                elif f.name == "edge_node_selector":
                    parsed = json.loads(raw or "{}")
                    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
                        raise ValueError("expected a JSON object of strings")
                    values[f.name] = parsed
                elif f.name == "edge_tolerations":
                    parsed = json.loads(raw or "[]")
                    if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
                        raise ValueError("expected a JSON list of tolerations")
                    for t in parsed:
                        Toleration.model_validate(t)
                    values[f.name] = tuple(parsed)
                elif isinstance(default, bool):
                    values[f.name] = raw.lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except (ValueError, ValidationError) as exc:
                raise ValueError(f"{key}={raw!r}: {exc}") from exc
        return cls(**values)

    def render_options(self) -> RenderOptions:
        return RenderOptions(image=self.image, image_pull_policy=self.image_pull_policy, s3_image=self.s3_image,
                             cache_host_path=self.cache_host_path,
                             job_active_deadline_seconds=self.job_deadline_seconds)
