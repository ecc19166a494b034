"""The Kubernetes executor (pure): binds a logical Plan to Jobs, Deployments, Services, ConfigMaps, HPAs, a PVC.

A model reference becomes a mount or fetch and a path in the pod, a backend name a Service DNS name; the
worker command lines come from `stratus_operator.commands`, as the local executor's do.
"""

from __future__ import annotations

import json
import shlex
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
    cleanup_name,
    stable_hash,
    tls_name,
)
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
from stratus_operator.spec import API_VERSION, KIND, Autoscaling, LLMDeployment, Toleration
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
    """The Secrets pods mount: the mTLS Secret (None: plaintext) and a hash of its content (rolls pods)."""

    tls_secret: str | None = None
    tls_hash: str = ""

    @classmethod
    def of(cls, deployment: LLMDeployment, tls_hash: str = "") -> SecretRefs:
        return cls(tls_secret_name(deployment), tls_hash)


def tls_secret_name(deployment: LLMDeployment) -> str | None:
    """The Secret holding the deployment's mTLS certificate: the user's, else the operator's `<name>-tls`."""
    security = deployment.spec.security
    if not security.mtls:
        return None
    return security.tls_secret_name or tls_name(deployment.metadata.name)


def _tls_volume(secret: str) -> dict[str, Any]:
    # Only the three files a process needs: an operator-issued Secret also holds the CA's key.
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
    image_pull_policy: str = _DEFAULTS.image_pull_policy
    # Used only for s3:// sources and object-store artifacts.
    s3_image: str = _DEFAULTS.s3_image
    # A per-node cache for fetched models (s3://, hf://, object-store artifacts); it must exist and be
    # writable by uid 65532. Empty: an emptyDir per pod (each pod fetches its own copy).
    cache_host_path: str = _DEFAULTS.cache_host_path
    compress_resources: dict[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
    )
    router_resources: dict[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "256Mi"}}
    )
    job_active_deadline_seconds: int = _DEFAULTS.job_deadline_seconds
    version: str = "0.1.0"

    @classmethod
    def from_config(cls, config: Config) -> RenderOptions:
        return cls(image=config.image, image_pull_policy=config.image_pull_policy, s3_image=config.s3_image,
                   cache_host_path=config.cache_host_path, job_active_deadline_seconds=config.job_deadline_seconds)


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


def _cache_volume(options: RenderOptions) -> dict[str, Any]:
    # A prepared hostPath: each node fetches a model once, whatever pods come and go. "Directory", not
    # "DirectoryOrCreate": the kubelet would create it root-owned, which our non-root pods cannot write.
    if options.cache_host_path:
        return {"name": "cache", "hostPath": {"path": options.cache_host_path, "type": "Directory"}}
    return {"name": "cache", "emptyDir": {}}


def harden(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """Non-root, read-only root filesystem, no capabilities, RuntimeDefault seccomp; /tmp is an emptyDir."""
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
        }], [_cache_volume(options)], [cache_mount])
    if source.kind == 'hf':
        target = f"{CACHE_DIR}/models/{key}"
        script = f"from huggingface_hub import snapshot_download as d; d({source.ref!r}, local_dir='@TARGET@')"
        return _ModelMount(target, [{
            "name": "fetch-model", "image": options.image, "imagePullPolicy": options.image_pull_policy,
            "command": ["sh", "-c", _once(target, f"python -c {shlex.quote(script)}")],
            "volumeMounts": [cache_mount],
        }], [_cache_volume(options)], [cache_mount])
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
        }], [_cache_volume(options)], [cache_mount])
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
                      mounts: list[dict[str, Any]], env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "image": options.image,
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


def _deployment(deployment: LLMDeployment, name: str, component: str, replicas: int | None,
                pod_spec: dict[str, Any], options: RenderOptions, extra_labels: dict[str, str],
                pod_annotations: dict[str, str]) -> dict[str, Any]:
    lbls = labels(deployment, component, options, **extra_labels, **{SERVER_LABEL: name})
    selector = {INSTANCE_LABEL: deployment.metadata.name, COMPONENT_LABEL: component, SERVER_LABEL: name}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
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
    volumes = _dedupe([{"name": "spec", "configMap": {"name": job.name}}, _cache_volume(options),
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
    harden(pod_spec)
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
    if secrets.tls_secret:
        command += _tls_args()
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append(_tls_volume(secrets.tls_secret))
        if secrets.tls_hash:
            pod_annotations[TLS_HASH_ANNOTATION] = secrets.tls_hash  # a new certificate restarts the pods
    container = _server_container(
        "server", command, _resources(dict(server.resources.requests), dict(server.resources.limits)),
        options, mounts, [],
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
        # Pin to the nodes placement found room on (by node name); the scheduler picks among them.
        pod_spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": list(server.placement.nodes)}]}]}}}
    harden(pod_spec)
    replicas = None if server.autoscaling is not None else server.replicas
    out = [
        _with_hash(_deployment(deployment, server.name, component, replicas, pod_spec, options, extra,
                               pod_annotations)),
        _with_hash(_service(deployment, server.name, component, options, extra)),
    ]
    if server.autoscaling is not None:
        out.append(_with_hash(_hpa(deployment, server.name, component, server.autoscaling, options, extra)))
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
    if secrets.tls_secret:
        command += _tls_args()
        if security.client_tls:
            command.append("--client-tls")
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append(_tls_volume(secrets.tls_secret))
        if secrets.tls_hash:
            annotations[TLS_HASH_ANNOTATION] = secrets.tls_hash
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
    harden(pod_spec)
    return [
        _with_hash(config_map),
        _with_hash(_deployment(deployment, router.name, "router", router.replicas, pod_spec, options, {},
                               annotations)),
        _with_hash(_service(deployment, router.name, "router", options, {})),
    ]


def render_storage(deployment: LLMDeployment, options: RenderOptions) -> list[dict[str, Any]]:
    """The artifacts PVC, when the operator owns it (no object store and no existing claim named)."""
    storage = deployment.spec.storage
    if storage.object_store is not None or (storage.pvc is not None and storage.pvc.claim_name):
        return []
    pvc = storage.pvc
    spec: dict[str, Any] = {
        "accessModes": [pvc.access_mode if pvc else "ReadWriteMany"],
        "resources": {"requests": {"storage": pvc.size if pvc else "20Gi"}},
    }
    if pvc is not None and pvc.storage_class_name:
        spec["storageClassName"] = pvc.storage_class_name
    name = artifacts_name(deployment.metadata.name)
    return [_with_hash({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": _meta(deployment, name, labels(deployment, "artifacts", options)),
                        "spec": spec})]


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
                     {"restartPolicy": "Never", "containers": [container], "volumes": volumes})}},
    })]
