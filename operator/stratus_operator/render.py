"""The Kubernetes executor (pure): binds a logical Plan to Jobs, Deployments, Services, ConfigMaps, HPAs, a PVC.

A model reference becomes a mount or fetch and a path in the pod, a backend name a Service DNS name; the
worker command lines come from `stratus_operator.commands`, as the local executor's do.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stratus_operator.commands import RouterFlags, ServeFlags, compress_command, router_config
from stratus_operator.config import Config
from stratus_operator.names import (
    ARTIFACTS_DIR,
    CACHE_DIR,
    COMPONENT_LABEL,
    COMPRESS_CONTAINER,
    CONFIG_DIR,
    CONFIG_HASH_ANNOTATION,
    GENERATION_ANNOTATION,
    GRPC_PORT,
    HTTP_PORT,
    IMAGE_CACHE_DIR,
    INSTANCE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODELS_DIR,
    NAME_LABEL,
    PART_OF_LABEL,
    SERVER_LABEL,
    SPEC_FILE,
    SPEC_HASH_ANNOTATION,
    TERMINATION_LOG,
    TLS_DIR,
    TLS_HASH_ANNOTATION,
    TOKENS_DIR,
    TOKENS_FILE,
    VARIANT_LABEL,
    VERSION_LABEL,
    PortRole,
    artifacts_name,
    child_name,
    cleanup_name,
    server_tls_name,
    stable_hash,
)
from stratus_operator.placement import parse_quantity
from stratus_operator.planner import (
    Artifact,
    CompressionJobPlan,
    Endpoints,
    ModelRef,
    Plan,
    RouterPlan,
    ServerPlan,
    Source,
)
from stratus_operator.spec import API_VERSION, KIND, Autoscaling, LLMDeployment, Toleration, is_extended_resource
from stratus_workers.compress.spec import VERDICT_EXIT_CODES
from stratus_workers.models.source import parse_source

COMPRESS_BACKOFF_LIMIT = 2
# The workers image's user (deploy/images/workers.Dockerfile); numeric, so the kubelet can check runAsNonRoot.
RUN_AS = 65532
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
    # Large artifact volumes: chown them only when their root is not ours yet.
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}


def service_address(namespace: str, name: str, role: PortRole = "grpc") -> str:
    """host:port of a child Service's port `role`, by in-cluster DNS."""
    return f"{name}.{namespace}.svc:{GRPC_PORT if role == 'grpc' else HTTP_PORT}"


def router_endpoints(p: Plan, namespace: str) -> Endpoints:
    """Where clients in the cluster reach the plan's router (for `.status.router`)."""
    if p.router is None:
        return Endpoints()
    name = p.router.name
    return Endpoints(service_address(namespace, name, "grpc"), service_address(namespace, name, "http"))


@dataclass(frozen=True)
class SecretRefs:
    """The mTLS Secrets pods mount, and hashes of their content (a new certificate rolls the pods).

    Either one Secret every pod shares (the user's `tlsSecretName`), or one the operator issued per server and
    router (`<child>-tls`, `names.server_tls_name`), or none (plaintext).
    """

    shared: str | None = None
    issued: bool = False
    # The router's or a server's child name (or "" for the shared Secret) -> its content hash.
    hashes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, deployment: LLMDeployment, hashes: Mapping[str, str] | None = None) -> SecretRefs:
        security = deployment.spec.security
        if not security.mtls:
            return cls()
        return cls(shared=security.tls_secret_name, issued=security.tls_secret_name is None, hashes=dict(hashes or {}))

    def tls(self, name: str) -> tuple[str, str] | None:
        """(Secret, content hash) the pods of child `name` mount, or None without mTLS."""
        if self.shared:
            return self.shared, self.hashes.get("", "")
        if self.issued:
            return server_tls_name(name), self.hashes.get(name, "")
        return None


def _tls_volume(secret: str) -> dict[str, Any]:
    # Only the three files a process needs, by name: whatever else a user's Secret holds stays out.
    items = [{"key": k, "path": k} for k in ("tls.crt", "tls.key", "ca.crt")]
    return {"name": "tls", "secret": {"secretName": secret, "items": items, "defaultMode": 0o440}}


def _tls_args() -> list[str]:
    return ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key", "--tls-ca", f"{TLS_DIR}/ca.crt"]


def _dedupe(volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for v in volumes:
        seen.setdefault(v["name"], v)
    return list(seen.values())


# The operator's configuration defaults are the rendering defaults (one source: Config's fields).
_DEFAULTS = Config()


@dataclass(frozen=True)
class RenderOptions:
    """Cluster-specific choices that are not part of the LLMDeployment (see Config for each field)."""

    image: str = _DEFAULTS.image
    # The model servers' images per tier; empty: `image`.
    cloud_image: str = _DEFAULTS.cloud_image
    edge_image: str = _DEFAULTS.edge_image
    image_pull_policy: str = _DEFAULTS.image_pull_policy
    image_pull_secrets: tuple[str, ...] = _DEFAULTS.image_pull_secrets
    service_account: str = _DEFAULTS.service_account
    # Used only for s3:// sources and object-store artifacts.
    s3_image: str = _DEFAULTS.s3_image
    # A per-node cache for fetched models (s3://, hf://, object-store artifacts); it must exist and be
    # writable by uid 65532. Empty (the default): an emptyDir per pod (each pod fetches its own copy).
    cache_host_path: str = _DEFAULTS.cache_host_path
    compress_resources: dict[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
    )
    router_resources: dict[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "256Mi"}}
    )
    job_active_deadline_seconds: int = _DEFAULTS.job_deadline_seconds
    network_policies: bool = _DEFAULTS.network_policies
    router_ingress_from: tuple[Mapping[str, Any], ...] = _DEFAULTS.router_ingress_from
    version: str = "0.1.0"

    @classmethod
    def from_config(cls, config: Config) -> RenderOptions:
        return cls(image=config.image, cloud_image=config.cloud_image, edge_image=config.edge_image,
                   image_pull_policy=config.image_pull_policy, image_pull_secrets=config.image_pull_secrets,
                   service_account=config.service_account, s3_image=config.s3_image,
                   cache_host_path=config.cache_host_path, job_active_deadline_seconds=config.job_deadline_seconds,
                   network_policies=config.network_policies, router_ingress_from=config.router_ingress_from)

    def server_image(self, tier: str) -> str:
        """The image of a tier's model servers."""
        return (self.cloud_image if tier == "cloud" else self.edge_image if tier == "edge" else "") or self.image


def labels(deployment: LLMDeployment, component: str, options: RenderOptions, **extra: str) -> dict[str, str]:
    """The standard app.kubernetes.io/* labels of every child."""
    out = {
        NAME_LABEL: "stratus",
        INSTANCE_LABEL: deployment.metadata.name,
        COMPONENT_LABEL: component,
        PART_OF_LABEL: "stratus",
        MANAGED_BY_LABEL: MANAGED_BY,
        VERSION_LABEL: options.version,
    }
    out.update(extra)
    return out


def owner_reference(deployment: LLMDeployment) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": deployment.metadata.name,
        "uid": deployment.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(deployment: LLMDeployment, name: str, lbls: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": deployment.metadata.namespace,
        "labels": lbls,
        "annotations": {},
        "ownerReferences": [owner_reference(deployment)],
    }


def _with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """Stamp the object's own hash, so an executor patches only when the desired state changed."""
    obj["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = stable_hash(obj, 16)
    return obj


def _tolerations(tolerations: tuple[Toleration, ...]) -> list[dict[str, Any]]:
    return [t.model_dump(by_alias=True, exclude_none=True) for t in tolerations]


def _resources(requests: dict[str, str], limits: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = dict(requests)
    if limits:
        out["limits"] = dict(limits)
    return out


def _cache_volume(deployment: LLMDeployment, options: RenderOptions) -> dict[str, Any]:
    """The pod's cache: an emptyDir, or the node directory the spec (else the operator's config) asks for."""
    cache = deployment.spec.cache
    host_path = cache.host_path if cache.host_path is not None else options.cache_host_path
    # A prepared hostPath: each node fetches a model once, whatever pods come and go. "Directory", not
    # "DirectoryOrCreate": the kubelet would create it root-owned, which our non-root pods cannot write.
    if host_path:
        return {"name": "cache", "hostPath": {"path": host_path, "type": "Directory"}}
    return {"name": "cache", "emptyDir": {"sizeLimit": cache.size_limit} if cache.size_limit else {}}


def harden(pod_spec: dict[str, Any], options: RenderOptions) -> dict[str, Any]:
    """Non-root, read-only root filesystem, no capabilities, RuntimeDefault seccomp; /tmp is an emptyDir. The
    pod's identity: the configured service account and pull Secrets; no API token (no pod of ours calls the
    API), unless a service account is named (a cloud IAM binding may need its token)."""
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    else:
        pod_spec["automountServiceAccountToken"] = False
    if options.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    pod_spec["securityContext"] = dict(POD_SECURITY_CONTEXT)
    pod_spec.setdefault("volumes", []).append({"name": "tmp", "emptyDir": {}})
    for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        c["securityContext"] = dict(CONTAINER_SECURITY_CONTEXT)
        c["volumeMounts"] = [*c.get("volumeMounts", []), {"name": "tmp", "mountPath": "/tmp"}]
        env = list(c.get("env", []))
        if not any(e["name"] == "HOME" for e in env):
            env.append({"name": "HOME", "value": "/tmp"})  # the aws CLI writes under $HOME
        c["env"] = env
    return pod_spec


def _s3_env(deployment: LLMDeployment) -> list[dict[str, Any]]:
    store = deployment.spec.storage.object_store
    env: list[dict[str, Any]] = []
    if store is None:
        return env
    if store.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": store.endpoint})
    if store.secret_name:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": store.secret_name, "key": key}}})
    return env


def _once(target: str, fetch: str) -> str:
    # Fetch into a temporary directory and rename it, so a half-fetched model is never used.
    t = shlex.quote(target)
    return (f"set -eu; if [ -f {t}/.complete ]; then exit 0; fi; mkdir -p $(dirname {t}); rm -rf {t}.tmp; "
            f"{fetch.replace('@TARGET@', t + '.tmp')}; touch {t}.tmp/.complete; rm -rf {t}; mv {t}.tmp {t}")


@dataclass
class _ModelMount:
    """How a pod gets its model: init containers, volumes, mounts, and the path or source to pass."""

    model: str
    init_containers: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)


def _full_model(deployment: LLMDeployment, uri: str, options: RenderOptions) -> _ModelMount:
    source = parse_source(uri)
    cache_mount = {"name": "cache", "mountPath": CACHE_DIR}
    key = stable_hash(str(source), 12)
    if source.kind == 'bundled':
        # The workers image carries it converted under /opt/stratus/cache (its STRATUS_CACHE_DIR): no fetch.
        return _ModelMount(str(source))
    if source.kind == 'pvc':
        claim, _, sub = source.ref.partition("/")
        return _ModelMount(f"{MODELS_DIR}/{claim}/{sub}".rstrip("/"), [],
                           [{"name": "model-source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
                           [{"name": "model-source", "mountPath": f"{MODELS_DIR}/{claim}", "readOnly": True}])
    if source.kind == 's3':
        target = f"{CACHE_DIR}/models/{key}"
        return _ModelMount(target, [{
            "name": "fetch-model", "image": options.s3_image, "imagePullPolicy": options.image_pull_policy,
            "command": ["sh", "-c", _once(target, f"aws s3 sync {shlex.quote(str(source))} @TARGET@")],
            "env": _s3_env(deployment), "volumeMounts": [cache_mount],
        }], [_cache_volume(deployment, options)], [cache_mount])
    if source.kind == 'hf':
        target = f"{CACHE_DIR}/models/{key}"
        script = f"from huggingface_hub import snapshot_download as d; d({source.ref!r}, local_dir='@TARGET@')"
        return _ModelMount(target, [{
            "name": "fetch-model", "image": options.image, "imagePullPolicy": options.image_pull_policy,
            "command": ["sh", "-c", _once(target, f"python -c {shlex.quote(script)}")],
            "volumeMounts": [cache_mount],
        }], [_cache_volume(deployment, options)], [cache_mount])
    return _ModelMount(str(source))  # a path inside the image


def _artifacts_volume(deployment: LLMDeployment, *, read_only: bool = False) -> dict[str, Any]:
    pvc = deployment.spec.storage.pvc
    if deployment.spec.storage.object_store is not None:
        return {"name": "artifacts", "emptyDir": {}}
    claim = pvc.claim_name if pvc is not None and pvc.claim_name else artifacts_name(deployment.metadata.name)
    source: dict[str, Any] = {"claimName": claim}
    if read_only:
        source["readOnly"] = True
    return {"name": "artifacts", "persistentVolumeClaim": source}


def _artifact_prefix(deployment: LLMDeployment) -> str:
    store = deployment.spec.storage.object_store
    assert store is not None
    return f"{store.url.rstrip('/')}/{deployment.metadata.namespace}/{deployment.metadata.name}"


def artifact_path(variant: str) -> str:
    """Where a variant's compression Job writes its artifact, and an edge pod finds it, on the artifacts volume."""
    return f"{ARTIFACTS_DIR}/{variant}"


def _edge_model(deployment: LLMDeployment, artifact: Artifact, options: RenderOptions) -> _ModelMount:
    variant = artifact.variant
    key = f"{deployment.metadata.namespace}-{deployment.metadata.name}-{variant}-{artifact.spec_hash}"
    target = f"{CACHE_DIR}/artifacts/{key}"
    cache_mount = {"name": "cache", "mountPath": CACHE_DIR}
    if deployment.spec.storage.object_store is not None:
        url = f"{_artifact_prefix(deployment)}/{variant}"
        return _ModelMount(target, [{
            "name": "fetch-model", "image": options.s3_image, "imagePullPolicy": options.image_pull_policy,
            "command": ["sh", "-c", _once(target, f"aws s3 sync {shlex.quote(url)} @TARGET@")],
            "env": _s3_env(deployment), "volumeMounts": [cache_mount],
        }], [_cache_volume(deployment, options)], [cache_mount])
    # On the artifacts claim: read in place (read-only); the server loads it into memory once at start.
    return _ModelMount(artifact_path(variant), [], [_artifacts_volume(deployment, read_only=True)],
                       [{"name": "artifacts", "mountPath": ARTIFACTS_DIR, "subPath": deployment.metadata.name,
                         "readOnly": True}])


def _model(deployment: LLMDeployment, ref: ModelRef, options: RenderOptions) -> _ModelMount:
    """Bind a plan's model reference to this pod: the full model's fetch or mount, or the variant's artifact."""
    if isinstance(ref, Artifact):
        return _edge_model(deployment, ref, options)
    return _full_model(deployment, ref.uri, options)


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def _server_container(name: str, command: list[str], resources: dict[str, Any], options: RenderOptions,
                      mounts: list[dict[str, Any]], env: list[dict[str, Any]], image: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "image": image or options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": command,
        "ports": [{"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
        # Loading a model takes a while: the startup probe gives it up to 10 minutes before liveness counts.
        "startupProbe": _probe("/healthz", "http", 5, 120),
        "livenessProbe": _probe("/healthz", "http", 10, 3),
        "readinessProbe": _probe("/readyz", "http", 5, 3),
    }


# A surge pod needs room beside the old one. Edge pods are pinned to nodes placement filled, and a GPU may be the
# cluster's last: there the surge pod never schedules and the roll-out never ends. Those tiers replace a pod
# before starting its successor instead (one pod down at a time; with one replica, a short gap).
SURGE = {"maxUnavailable": 0, "maxSurge": 1}
REPLACE = {"maxUnavailable": 1, "maxSurge": 0}


def _strategy(component: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """REPLACE for edge servers and pods holding an extended resource (a GPU), else SURGE."""
    extended = any(is_extended_resource(r) for c in pod_spec["containers"]
                   for r in (c.get("resources") or {}).get("limits") or {})
    replace = component == "edge-server" or extended
    return {"type": "RollingUpdate", "rollingUpdate": dict(REPLACE if replace else SURGE)}


def _deployment(deployment: LLMDeployment, name: str, component: str, replicas: int | None,
                pod_spec: dict[str, Any], options: RenderOptions, extra_labels: dict[str, str],
                pod_annotations: dict[str, str]) -> dict[str, Any]:
    lbls = labels(deployment, component, options, **extra_labels, **{SERVER_LABEL: name})
    selector = {INSTANCE_LABEL: deployment.metadata.name, COMPONENT_LABEL: component, SERVER_LABEL: name}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "strategy": _strategy(component, pod_spec),
        "template": {
            "metadata": {"labels": lbls, "annotations": {
                "prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP_PORT), "prometheus.io/path": "/metrics",
                **pod_annotations}},
            "spec": pod_spec,
        },
    }
    if replicas is not None:  # under an HPA the replica count is the HPA's, not ours
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(deployment, name, lbls), "spec": spec}


def _service(deployment: LLMDeployment, name: str, component: str, options: RenderOptions,
             extra_labels: dict[str, str]) -> dict[str, Any]:
    lbls = labels(deployment, component, options, **extra_labels, **{SERVER_LABEL: name})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(deployment, name, lbls),
        "spec": {
            "type": "ClusterIP",
            "selector": {INSTANCE_LABEL: deployment.metadata.name, COMPONENT_LABEL: component, SERVER_LABEL: name},
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
            ],
        },
    }


def _hpa(deployment: LLMDeployment, target: str, component: str, autoscaling: Autoscaling,
         options: RenderOptions, extra_labels: dict[str, str]) -> dict[str, Any]:
    if autoscaling.metric == "cpu":
        metric: dict[str, Any] = {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": autoscaling.target_cpu_utilization}}}
    else:
        metric = {"type": "Pods", "pods": {"metric": {"name": autoscaling.queue_depth_metric}, "target": {
            "type": "AverageValue", "averageValue": autoscaling.target_queue_depth}}}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(deployment, target, labels(deployment, component, options, **extra_labels)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [metric],
        },
    }


def _pdb(deployment: LLMDeployment, name: str, component: str, options: RenderOptions,
         extra_labels: dict[str, str]) -> dict[str, Any]:
    # One pod of the tier down at a time during drains and upgrades; never blocks a drain (no minAvailable).
    selector = {INSTANCE_LABEL: deployment.metadata.name, COMPONENT_LABEL: component, SERVER_LABEL: name}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(deployment, name, labels(deployment, component, options, **extra_labels)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def render_network_policies(p: Plan, deployment: LLMDeployment, options: RenderOptions) -> list[dict[str, Any]]:
    """The deployment's NetworkPolicies: its model servers take gRPC only from its own router (their HTTP port,
    probes and metrics, stays open); the router takes traffic from the configured peers, else from anyone."""
    if not options.network_policies or not p.servers:
        return []
    name = deployment.metadata.name
    servers = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(deployment, child_name(name, "servers"), labels(deployment, "network-policy", options)),
        "spec": {
            "podSelector": {"matchLabels": {INSTANCE_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
                            "matchExpressions": [{"key": COMPONENT_LABEL, "operator": "In",
                                                  "values": ["cloud-server", "edge-server"]}]},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {INSTANCE_LABEL: name, COMPONENT_LABEL: "router",
                                                           MANAGED_BY_LABEL: MANAGED_BY}}}],
                 "ports": [{"port": "grpc", "protocol": "TCP"}]},
                {"ports": [{"port": "http", "protocol": "TCP"}]},
            ],
        },
    }
    out = [_with_hash(servers)]
    if options.router_ingress_from and p.router is not None:
        out.append(_with_hash({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(deployment, child_name(name, "router"), labels(deployment, "network-policy", options)),
            "spec": {
                "podSelector": {"matchLabels": {INSTANCE_LABEL: name, COMPONENT_LABEL: "router",
                                                MANAGED_BY_LABEL: MANAGED_BY}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [dict(peer) for peer in options.router_ingress_from],
                             "ports": [{"port": "grpc", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]}],
            },
        }))
    return out


def render_job(p: Plan, deployment: LLMDeployment, job: CompressionJobPlan,
               options: RenderOptions) -> list[dict[str, Any]]:
    """A compression Job and the ConfigMap holding its spec.json."""
    extra = {VARIANT_LABEL: job.variant}
    lbls = labels(deployment, "compress", options, **extra)
    model = _full_model(deployment, job.spec.model_source, options)
    job_spec = job.spec.model_copy(update={"model_source": model.model})
    config = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(deployment, job.name, lbls),
        "data": {"spec.json": job_spec.model_dump_json(by_alias=True, indent=2)},
    }
    cache_mount = {"name": "cache", "mountPath": CACHE_DIR}
    mounts = [{"name": "spec", "mountPath": CONFIG_DIR, "readOnly": True}, cache_mount,
              *(m for m in model.mounts if m["name"] != "cache")]
    volumes = _dedupe([{"name": "spec", "configMap": {"name": job.name}}, _cache_volume(deployment, options),
                       _artifacts_volume(deployment), *model.volumes])
    store = deployment.spec.storage.object_store
    if store is None:
        mounts.append({"name": "artifacts", "mountPath": ARTIFACTS_DIR, "subPath": deployment.metadata.name})
    else:
        mounts.append({"name": "artifacts", "mountPath": ARTIFACTS_DIR})
    compress = {
        "name": COMPRESS_CONTAINER,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": compress_command(spec=SPEC_FILE, out=artifact_path(job.variant), termination_log=TERMINATION_LOG,
                                    device=job.device),
        "env": [{"name": "STRATUS_CACHE_DIR", "value": CACHE_DIR}],
        "resources": (options.compress_resources if job.resources is None
                      else _resources(dict(job.resources.requests), dict(job.resources.limits))),
        "volumeMounts": mounts,
        # The worker writes its one-line JSON summary here; the operator reads it from the pod status.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    # The worker keeps baselines and the tokenised corpus in its (writable) cache; the bundled model it
    # finds there through a link to the image's converted copy instead of converting it again.
    source = parse_source(deployment.spec.model.source)
    init = list(model.init_containers)
    if source.kind == "bundled":
        link, real = f"{CACHE_DIR}/models/{source.ref}", f"{IMAGE_CACHE_DIR}/models/{source.ref}"
        init.insert(0, {
            "name": "prepare-cache", "image": options.image, "imagePullPolicy": options.image_pull_policy,
            "command": ["sh", "-c", f"mkdir -p {CACHE_DIR}/models && {{ [ -e {shlex.quote(link)} ] || "
                                    f"ln -s {shlex.quote(real)} {shlex.quote(link)}; }}"],
            "volumeMounts": [cache_mount],
        })
    containers = [compress]
    if store is not None:
        # Compress first (as an init container), then upload the artifact from the shared emptyDir.
        init.append(compress)
        url = f"{_artifact_prefix(deployment)}/{job.variant}"
        containers = [{
            "name": "upload", "image": options.s3_image, "imagePullPolicy": options.image_pull_policy,
            "command": ["sh", "-c",
                        f"aws s3 sync {shlex.quote(artifact_path(job.variant))} {shlex.quote(url)} --delete"],
            "env": _s3_env(deployment), "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS_DIR}],
        }]
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": containers, "volumes": volumes}
    if init:
        pod_spec["initContainers"] = init
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        pod_spec["tolerations"] = _tolerations(job.tolerations)
    harden(pod_spec, options)
    obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(deployment, job.name, lbls),
        "spec": {
            # A crash (exit 1, OOM kill) is retried by the Job controller with its exponential back-off
            # (10 s, 20 s, 40 s, ...); a gate rejection or a bad spec is an answer, not a flake: it fails
            # the Job at once. Evictions and preemptions do not count against the limit.
            "backoffLimit": COMPRESS_BACKOFF_LIMIT,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": COMPRESS_CONTAINER, "operator": "In",
                                                      "values": [int(code) for code in VERDICT_EXIT_CODES]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "activeDeadlineSeconds": options.job_active_deadline_seconds,
            "template": {"metadata": {"labels": lbls}, "spec": pod_spec},
        },
    }
    job_obj = _with_hash(obj)
    job_obj["metadata"]["annotations"][GENERATION_ANNOTATION] = str(p.generation)
    return [_with_hash(config), job_obj]


def render_server(p: Plan, deployment: LLMDeployment, server: ServerPlan, options: RenderOptions,
                  secrets: SecretRefs | None = None) -> list[dict[str, Any]]:
    """A model server's Deployment, Service and (with autoscaling) HPA."""
    secrets = secrets if secrets is not None else SecretRefs.of(deployment)
    component = f"{server.tier}-server"
    extra = {VARIANT_LABEL: server.variant} if server.variant else {}
    model = _model(deployment, server.model, options)
    mounts = list(model.mounts)
    volumes = _dedupe(list(model.volumes))
    command = ServeFlags.of(server, model=model.model).command()
    pod_annotations: dict[str, str] = {}
    tls = secrets.tls(server.name)
    if tls is not None:
        command += _tls_args()
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append(_tls_volume(tls[0]))
        if tls[1]:
            pod_annotations[TLS_HASH_ANNOTATION] = tls[1]  # a new certificate restarts the pods
    container = _server_container(
        "server", command, _resources(dict(server.resources.requests), dict(server.resources.limits)),
        options, mounts, [], image=options.server_image(server.tier),
    )
    if server.tensor_parallel > 1 or server.pipeline_parallel > 1:
        # NCCL passes tensors through shared memory; the container default of 64 MiB is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"] = [*container.get("volumeMounts", []), {"name": "dshm", "mountPath": "/dev/shm"}]
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if model.init_containers:
        pod_spec["initContainers"] = model.init_containers
    if server.node_selector:
        pod_spec["nodeSelector"] = dict(server.node_selector)
    if server.tolerations:
        pod_spec["tolerations"] = _tolerations(server.tolerations)
    if server.tier == "edge" and server.placement.nodes:
        # Pin to the nodes placement found room on (by node name); the scheduler picks among them. A field
        # selector on metadata.name takes exactly one value, so one term (they are ORed) per node.
        pod_spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                                  for node in server.placement.nodes]}}}
    harden(pod_spec, options)
    replicas = None if server.autoscaling is not None else server.replicas
    out = [
        _with_hash(_deployment(deployment, server.name, component, replicas, pod_spec, options, extra,
                               pod_annotations)),
        _with_hash(_service(deployment, server.name, component, options, extra)),
    ]
    if server.autoscaling is not None:
        out.append(_with_hash(_hpa(deployment, server.name, component, server.autoscaling, options, extra)))
    if server.autoscaling is not None or server.replicas > 1:
        out.append(_with_hash(_pdb(deployment, server.name, component, options, extra)))
    return out


# Files AutoTokenizer reads; an s3:// model's weights stay out of the router.
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model", "config.json",
                    "generation_config.json", "added_tokens.json", "chat_template*")


def _router_tokenizer(deployment: LLMDeployment, router: RouterPlan, options: RenderOptions) -> _ModelMount:
    """Where the router reads the tokenizer the planner named (the model's source) inside its pod."""
    if not isinstance(router.tokenizer, Source):
        return _ModelMount("")  # the planner names the full model's; an artifact would need its own fetch
    source = parse_source(router.tokenizer.uri)
    if source.kind == "pvc":
        claim, _, sub = source.ref.partition("/")
        return _ModelMount(f"{MODELS_DIR}/{claim}/{sub}".rstrip("/"), [],
                           [{"name": "model-source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
                           [{"name": "model-source", "mountPath": f"{MODELS_DIR}/{claim}", "readOnly": True}])
    target = f"{CACHE_DIR}/tokenizer"
    volumes = [{"name": "cache", "emptyDir": {}}]
    mounts = [{"name": "cache", "mountPath": CACHE_DIR, "readOnly": True}]
    if source.kind == "s3":
        patterns = " ".join(f"--include {shlex.quote(p)}" for p in _TOKENIZER_FILES)
        return _ModelMount(target, [{
            "name": "fetch-tokenizer", "image": options.s3_image, "imagePullPolicy": options.image_pull_policy,
            "command": ["sh", "-c", f"aws s3 sync {shlex.quote(str(source))} {target} --exclude '*' {patterns}"],
            "env": _s3_env(deployment), "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}],
        }], volumes, mounts)
    if source.kind == "hf":
        # The tokenizer files alone (handing the router hf:// would load the model's weights too).
        script = (f"from huggingface_hub import snapshot_download as d; "
                  f"d({source.ref!r}, local_dir={target!r}, allow_patterns={list(_TOKENIZER_FILES)!r})")
        return _ModelMount(target, [{
            "name": "fetch-tokenizer", "image": options.image, "imagePullPolicy": options.image_pull_policy,
            "command": ["python", "-c", script], "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}],
        }], volumes, mounts)
    # bundled:// is in the image (its converted copy carries the tokenizer); a path is in the image.
    return _ModelMount(str(source))


def render_router(p: Plan, deployment: LLMDeployment, router: RouterPlan, options: RenderOptions,
                  secrets: SecretRefs | None = None) -> list[dict[str, Any]]:
    """The router's ConfigMap (router.json: backends by Service DNS name), Deployment and Service."""
    secrets = secrets if secrets is not None else SecretRefs.of(deployment)
    security = deployment.spec.security
    tokenizer = _router_tokenizer(deployment, router, options)
    namespace = deployment.metadata.namespace
    config = router_config(p, router, address=lambda name: service_address(namespace, name),
                           tokenizer=tokenizer.model)
    config_json = config.model_dump_json(by_alias=True, indent=2)
    lbls = labels(deployment, "router", options, **{SERVER_LABEL: router.name})
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(deployment, router.name, lbls),
                  "data": {"router.json": config_json}}
    command = RouterFlags().command()
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, *tokenizer.mounts]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": router.name}}, *tokenizer.volumes]
    # A new config rolls the router pods (a ConfigMap change alone would not restart them).
    annotations = {CONFIG_HASH_ANNOTATION: stable_hash(json.loads(config_json), 16)}
    tls = secrets.tls(router.name)
    if tls is not None:
        command += _tls_args()
        if security.client_tls:
            command.append("--client-tls")
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append(_tls_volume(tls[0]))
        if tls[1]:
            annotations[TLS_HASH_ANNOTATION] = tls[1]
    if security.client_tokens is not None:
        # A directory mount, not subPath: the kubelet updates it when the Secret changes, and the router
        # re-reads the file (token rotation without a restart).
        command += ["--tokens-file", f"{TOKENS_DIR}/{TOKENS_FILE}"]
        mounts.append({"name": "tokens", "mountPath": TOKENS_DIR, "readOnly": True})
        volumes.append({"name": "tokens", "secret": {
            "secretName": security.client_tokens.secret_name, "defaultMode": 0o440,
            "items": [{"key": security.client_tokens.key, "path": TOKENS_FILE}]}})
    container = _server_container("router", command, dict(options.router_resources), options, mounts, [])
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if tokenizer.init_containers:
        pod_spec["initContainers"] = tokenizer.init_containers
    harden(pod_spec, options)
    return [
        _with_hash(config_map),
        _with_hash(_deployment(deployment, router.name, "router", router.replicas, pod_spec, options, {},
                               annotations)),
        _with_hash(_service(deployment, router.name, "router", options, {})),
    ]


def render_storage(deployment: LLMDeployment, options: RenderOptions) -> list[dict[str, Any]]:
    """The artifacts PVC, when the operator owns it (no object store and no existing claim named)."""
    spec = _own_claim_spec(deployment)
    if spec is None:
        return []
    name = artifacts_name(deployment.metadata.name)
    return [_with_hash({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": _meta(deployment, name, labels(deployment, "artifacts", options)),
                        "spec": spec})]


def _own_claim_spec(deployment: LLMDeployment) -> dict[str, Any] | None:
    storage = deployment.spec.storage
    if storage.object_store is not None or (storage.pvc is not None and storage.pvc.claim_name):
        return None
    pvc = storage.pvc
    spec: dict[str, Any] = {
        "accessModes": [pvc.access_mode if pvc else "ReadWriteMany"],
        "resources": {"requests": {"storage": pvc.size if pvc else "20Gi"}},
    }
    if pvc is not None and pvc.storage_class_name:
        spec["storageClassName"] = pvc.storage_class_name
    return spec


def artifacts_claim(deployment: LLMDeployment) -> str | None:
    """The claim compression Jobs write artifacts to: the user's, the operator's own, or None (object store)."""
    storage = deployment.spec.storage
    if storage.object_store is not None:
        return None
    if storage.pvc is not None and storage.pvc.claim_name:
        return storage.pvc.claim_name
    return artifacts_name(deployment.metadata.name)


def claim_problem(deployment: LLMDeployment, phase: str | None) -> str | None:
    """Why the artifacts claim holds the compression Jobs back (`phase` is its status.phase; None: missing)."""
    claim = artifacts_claim(deployment)
    if claim is None or phase == "Bound":
        return None
    pvc = deployment.spec.storage.pvc
    if pvc is not None and pvc.claim_name:
        if phase is None:
            return f"artifacts claim {claim} (storage.pvc.claimName) does not exist in {deployment.metadata.namespace}"
        return f"artifacts claim {claim} (storage.pvc.claimName) is {phase}: no volume is bound to it"
    if phase is None:
        return None  # the operator creates it in this pass
    mode = pvc.access_mode if pvc is not None else "ReadWriteMany"
    klass = (f"storage class {pvc.storage_class_name}" if pvc is not None and pvc.storage_class_name
             else "the cluster's default storage class")
    return (f"artifacts claim {claim} is {phase}: no volume is bound to it. It asks {klass} for {mode}"
            f"{' (the default)' if pvc is None or 'access_mode' not in pvc.model_fields_set else ''}, which "
            "block storage (EBS, GCE PD, Azure Disk, local-path) does not provide; set storage.pvc.storageClassName "
            "to a class that does, or storage.pvc.accessMode ReadWriteOnce with one edge variant of one replica, "
            "or storage.objectStore (a WaitForFirstConsumer class binds it once the Job's pod is scheduled; "
            f"`kubectl describe pvc {claim}` shows the provisioner's events)")


def claim_change(deployment: LLMDeployment, created: Mapping[str, str]) -> str | None:
    """What `spec.storage.pvc` now asks of the operator's claim that the claim, created otherwise, does not do
    (`created` as the index records it), or None. A claim's access mode and class never change and its size is
    not resized here, so the change would otherwise be ignored without a word."""
    spec = _own_claim_spec(deployment)
    if spec is None:
        return None
    differs = []
    mode = spec["accessModes"][0]
    if created.get("accessMode") and created["accessMode"] != mode:
        differs.append(f"accessMode {mode} (created {created['accessMode']})")
    size = spec["resources"]["requests"]["storage"]
    if created.get("size") and parse_quantity(created["size"]) != parse_quantity(size):
        differs.append(f"size {size} (created {created['size']})")
    # An unset class is filled in by the API server (the default class): only a class asked for is compared.
    klass = spec.get("storageClassName")
    if klass and created.get("storageClassName") != klass:
        differs.append(f"storageClassName {klass} (created {created.get('storageClassName') or 'unset'})")
    if not differs:
        return None
    claim = artifacts_name(deployment.metadata.name)
    return (f"spec.storage.pvc asks for {', '.join(differs)}, but artifacts claim {claim} keeps what it was "
            "created with (a claim's access mode and class never change; the operator does not resize it). To move "
            f"the artifacts: `kubectl delete pvc {claim}`; the operator creates it anew and compresses again")


def render_plan(p: Plan, deployment: LLMDeployment, options: RenderOptions,
                secrets: SecretRefs | None = None) -> list[dict[str, Any]]:
    """Every child object of the plan, in apply order (the mTLS Secret is the reconcile's, not here)."""
    secrets = secrets if secrets is not None else SecretRefs.of(deployment)
    objects: list[dict[str, Any]] = []
    if p.compression_jobs:
        objects += render_storage(deployment, options)
    for job in p.compression_jobs:
        objects += render_job(p, deployment, job, options)
    for server in p.servers:
        objects += render_server(p, deployment, server, options, secrets)
    if p.router is not None:
        objects += render_router(p, deployment, p.router, options, secrets)
    objects += render_network_policies(p, deployment, options)
    return objects


def render_cleanup(deployment: LLMDeployment, options: RenderOptions) -> list[dict[str, Any]]:
    """A Job that deletes the deployment's artifacts from storage it does not own (run by the finalizer).

    It carries no owner reference, since its owner is being deleted; it removes itself after a while.
    """
    storage = deployment.spec.storage
    name = cleanup_name(deployment.metadata.name)
    lbls = labels(deployment, "cleanup", options)
    if storage.object_store is not None:
        container = {"name": "cleanup", "image": options.s3_image, "env": _s3_env(deployment),
                     "command": ["sh", "-c", f"aws s3 rm --recursive {shlex.quote(_artifact_prefix(deployment))}"]}
        volumes: list[dict[str, Any]] = []
    elif storage.pvc is not None and storage.pvc.claim_name:
        container = {"name": "cleanup", "image": options.image,
                     "command": ["sh", "-c", f"rm -rf {ARTIFACTS_DIR}/{shlex.quote(deployment.metadata.name)}"],
                     "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS_DIR}]}
        volumes = [{"name": "artifacts", "persistentVolumeClaim": {"claimName": storage.pvc.claim_name}}]
    else:
        return []  # the operator's own PVC goes with its owner
    meta = {"name": name, "namespace": deployment.metadata.namespace, "labels": lbls, "annotations": {}}
    return [_with_hash({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {"backoffLimit": 2, "ttlSecondsAfterFinished": 600,
                 "template": {"metadata": {"labels": lbls}, "spec": harden(
                     {"restartPolicy": "Never", "containers": [container], "volumes": volumes}, options)}},
    })]
