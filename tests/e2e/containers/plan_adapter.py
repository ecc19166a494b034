"""The one place the container suite calls the operator's planner, renderer and TLS issuer.

Everything the suite starts comes from here: the operator's Config as the shipped manifests set it
(deploy/operator/deployment.yaml), the plan of an LLMDeployment for a small cluster (one GPU node, one
tainted edge node), the objects `render` makes of it, the mTLS Secret the operator would issue, and a
compression Job's result read the way the operator reads it. When the planner or renderer moves, update
this module only.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stratus_operator.config import Config
from stratus_operator.observe import job_result
from stratus_operator.placement import ClusterView, parse_quantity
from stratus_operator.planner import CompressionResult, Plan, plan
from stratus_operator.render import RenderOptions, SecretRefs, render_plan
from stratus_operator.spec import LLMDeployment
from stratus_operator.tls import ca_certificate, check_secret, identities, issue_ca_secret, issue_server_secret

REPO = Path(__file__).resolve().parents[3]
OPERATOR_MANIFEST = REPO / "deploy" / "operator" / "deployment.yaml"
GPU_NODE = "gpu-0"
EDGE_NODE = "edge-0"

Manifest = dict[str, Any]
__all__ = [
    "Manifest",
    "Rendered",
    "TLSSecrets",
    "compression_result",
    "load_deployment",
    "operator_config",
    "parse_quantity",
    "reconcile",
    "tls_secrets",
]


def operator_env() -> dict[str, str]:
    """The STRATUS_* variables the shipped operator Deployment sets (the chart's default render)."""
    for doc in yaml.safe_load_all(OPERATOR_MANIFEST.read_text()):
        if doc and doc.get("kind") == "Deployment":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    raise AssertionError(f"{OPERATOR_MANIFEST} holds no Deployment")


def operator_config(workers_image: str) -> Config:
    """The operator's Config as deployed, with the workers image under test (pulled never: it is local)."""
    env = operator_env() | {"STRATUS_IMAGE": workers_image, "STRATUS_IMAGE_PULL_POLICY": "Never"}
    return Config.from_env(env)


def load_deployment(manifest: Manifest, *, namespace: str, uid: str = "e2e-containers") -> LLMDeployment:
    meta = manifest["metadata"]
    return LLMDeployment.from_parts(name=meta["name"], namespace=namespace, uid=uid, generation=1,
                                    spec=manifest["spec"])


def cluster() -> ClusterView:
    """A GPU node for the cloud tier and one edge node, labelled and tainted as docs/install.md says."""
    nodes = [
        {"metadata": {"name": GPU_NODE, "labels": {"kubernetes.io/hostname": GPU_NODE,
                                                   "nvidia.com/gpu.present": "true"}},
         "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}}},
        {"metadata": {"name": EDGE_NODE, "labels": {"kubernetes.io/hostname": EDGE_NODE, "stratus.dev/edge": "true"}},
         "spec": {"taints": [{"key": "stratus.dev/edge", "value": "true", "effect": "NoSchedule"}]},
         "status": {"allocatable": {"cpu": "2", "memory": "4Gi"}}},
    ]
    return ClusterView.from_objects(nodes)


@dataclass(frozen=True)
class Rendered:
    """One reconcile's outcome: the plan and every child object the operator would apply."""

    plan: Plan
    objects: list[Manifest]

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]


def _effective(deployment: LLMDeployment, config: Config) -> LLMDeployment:
    return deployment.with_edge_defaults(node_selector=config.edge_node_selector,
                                         tolerations=config.edge_tolerations)


@dataclass(frozen=True)
class TLSSecrets:
    """The mTLS Secrets the operator issues for a deployment: its CA (mounted by no pod) and one certificate per
    server and the router, each checked as the operator checks them before it renders."""

    ca: Manifest
    issued: dict[str, Manifest]  # child name -> its Secret
    hashes: dict[str, str]  # child name -> the content hash that rolls its pods

    @property
    def objects(self) -> list[Manifest]:
        return [self.ca, *self.issued.values()]

    def of(self, child: str) -> Manifest:
        return self.issued[child]


def reconcile(deployment: LLMDeployment, config: Config, results: dict[str, CompressionResult],
              tls: TLSSecrets | None) -> Rendered:
    """What one reconcile pass renders, given the compression results known so far."""
    dep = _effective(deployment, config)
    p = plan(dep, cluster(), results, gpu_resource=config.gpu_resource_name)
    secrets = SecretRefs.of(dep)
    if secrets.issued:
        assert tls is not None, "mTLS is on: issue the Secrets first (tls_secrets)"
        secrets = SecretRefs.of(dep, tls.hashes)
    return Rendered(p, render_plan(p, dep, RenderOptions.from_config(config), secrets))


def tls_secrets(deployment: LLMDeployment, config: Config) -> TLSSecrets | None:
    """The operator-issued mTLS Secrets (None when mTLS is off or the user names a Secret of their own)."""
    dep = _effective(deployment, config)
    if not SecretRefs.of(dep).issued:
        return None
    options = RenderOptions.from_config(config)
    ca = issue_ca_secret(dep, options)
    now = datetime.datetime.now(datetime.UTC)
    issued: dict[str, Manifest] = {}
    hashes: dict[str, str] = {}
    for identity in identities(dep):
        secret = issue_server_secret(dep, options, identity, ca)
        verdict = check_secret(secret, identity.hosts, now, ca=ca_certificate(ca))
        assert verdict.ok, verdict.problem
        issued[identity.name], hashes[identity.name] = secret, verdict.content_hash
    return TLSSecrets(ca, issued, hashes)


def compression_result(rendered: Rendered, job_name: str, *, exit_code: int,
                       message: str) -> CompressionResult | None:
    """A finished Job's result as the operator reads it: the Job's status and its termination message."""
    job = next(j for j in rendered.plan.compression_jobs if j.name == job_name)
    condition = "Complete" if exit_code == 0 else "Failed"
    now = datetime.datetime.now(datetime.UTC)
    stamp = (now - datetime.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {"conditions": [{"type": condition, "status": "True", "lastTransitionTime": stamp,
                              "reason": "Completed" if exit_code == 0 else "PodFailurePolicy"}]}
    status["succeeded" if exit_code == 0 else "failed"] = 1
    return job_result({"status": status, "spec": {"backoffLimit": 0}}, message, variant=job.variant,
                      spec_hash=job.spec_hash, now=now)
