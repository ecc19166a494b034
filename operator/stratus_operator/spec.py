"""The typed LLMDeployment (spec and status): the one source the CRD schema, operator and local runner share."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from stratus_operator.names import DEPLOYMENT_NAME_PATTERN, MAX_DEPLOYMENT_NAME_LENGTH, VARIANT_NAME_MAX
from stratus_workers.compress.spec import CompressionRecipe, Evaluation, QualityGate
from stratus_workers.models.source import parse_source
from stratus_workers.router.config import RoutingSpec
from stratus_workers.runtimes import RUNTIME_LLAMACPP, RUNTIME_TORCH, Runtime
from stratus_workers.spec_model import SpecModel

GROUP = "stratus.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ("llmd",)

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes resource quantities ("500m", "2Gi", "1.5", "1e3"); the CRD accepts ints or strings.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _quantity_to_str(value: Any) -> Any:
    # YAML turns `cpu: 2` into an int; Kubernetes treats it as the quantity "2".
    if isinstance(value, bool):
        raise ValueError("a quantity cannot be a boolean")
    if isinstance(value, int | float):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN,
          json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]

Dtype = Literal["auto", "float32", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
Phase = Literal["Pending", "Compressing", "Deploying", "Ready", "Degraded", "Failed"]
PHASES: tuple[Phase, ...] = ("Pending", "Compressing", "Deploying", "Ready", "Degraded", "Failed")
ConditionType = Literal["Compressed", "CloudReady", "EdgeReady", "RouterReady", "Ready"]
CONDITION_TYPES: tuple[ConditionType, ...] = ("Compressed", "CloudReady", "EdgeReady", "RouterReady", "Ready")


# The CRD's rule on metadata.name (CEL at the root); `name_problem` is its twin for the local runner.
NAME_RULE = (f"self.metadata.name.matches('{DEPLOYMENT_NAME_PATTERN}') && "
             f"size(self.metadata.name) <= {MAX_DEPLOYMENT_NAME_LENGTH}")
NAME_MESSAGE = (f"metadata.name must be at most {MAX_DEPLOYMENT_NAME_LENGTH} characters of lowercase letters, "
                "digits and '-', starting with a letter and ending with a letter or digit (it starts every "
                "child's name and label, e.g. <name>-edge-<variant>, a Service name)")
_NAME_RE = re.compile(DEPLOYMENT_NAME_PATTERN)


def name_problem(name: str) -> str | None:
    """Why an LLMDeployment may not be called `name` (NAME_MESSAGE), or None."""
    if len(name) > MAX_DEPLOYMENT_NAME_LENGTH or not _NAME_RE.match(name):
        return f"{NAME_MESSAGE}; got {name!r}"
    return None


def _cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules; the CRD generator copies them as x-kubernetes-validations."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


# ---------------------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------------------


class ModelSpec(SpecModel):
    """Which model to serve."""

    source: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^((bundled|pvc|s3|hf|file)://.+|[^:]+)$",
        description="bundled://smollm2-135m-instruct, pvc://claim/path, s3://bucket/prefix, hf://org/name or a path "
        "inside the image.",
    )

    @field_validator("source")
    @classmethod
    def _known(cls, source: str) -> str:
        # The pattern admits the schemes; this names an unknown bundled model before a pod fails on it.
        parse_source(source)
        return source


# Extended resources (a domain-prefixed name outside kubernetes.io, or hugepages) cannot be overcommitted: the
# API server wants a request equal to the limit. The operator writes one given alone to both sides.
_EXTENDED = "(k.startsWith('hugepages-') || (k.contains('/') && !k.startsWith('kubernetes.io/')))"
EXTENDED_MESSAGE = "an extended resource (e.g. nvidia.com/gpu) needs the same value in requests and limits"


def is_extended_resource(name: str) -> bool:
    """A resource the API server accepts only with request == limit (nvidia.com/gpu, hugepages-2Mi, ...)."""
    return name.startswith("hugepages-") or ("/" in name and not name.startswith("kubernetes.io/"))


class ResourceRequirements(SpecModel):
    """Container resource requests and limits, as in a Pod spec."""

    model_config = ConfigDict(json_schema_extra=_cel((
        f"!has(self.requests) || !has(self.limits) || self.requests.all(k, !{_EXTENDED} || !(k in self.limits) "
        "|| string(self.limits[k]) == string(self.requests[k]))", EXTENDED_MESSAGE)))

    requests: dict[str, Quantity] = Field(default_factory=dict, description="e.g. {cpu: 500m, memory: 1Gi}.")
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="e.g. {memory: 2Gi, nvidia.com/gpu: 1}. An extended resource given "
        "on one side only is written to both (request == limit).")

    @model_validator(mode="after")
    def _extended_equal(self) -> ResourceRequirements:
        mismatched = [k for k, v in self.requests.items() if is_extended_resource(k) and k in self.limits
                      and self.limits[k] != v]
        if mismatched:
            raise ValueError(f"{EXTENDED_MESSAGE}; {', '.join(mismatched)} differ")
        return self


class Toleration(SpecModel):
    """A Pod toleration: lets a tier's pods onto nodes with a matching taint."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("self.operator != 'Exists' || !has(self.value) || self.value == ''", "operator Exists takes no value"),
            ("has(self.key) || self.operator == 'Exists'", "an empty key needs operator Exists"),
        )
    )

    key: str | None = Field(None, max_length=317, description="Taint key; empty with Exists tolerates every taint.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal compares value; Exists ignores it.")
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; unset tolerates every effect."
    )
    toleration_seconds: int | None = Field(None, ge=0, description="For NoExecute: how long the pod stays bound.")

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if not self.key and self.operator != "Exists":
            raise ValueError("an empty key needs operator Exists")
        return self


class ServingSpec(SpecModel):
    """Model server limits: passed to `python -m stratus_workers.serve` as flags."""

    max_batch_size: int = Field(8, ge=1, le=1024, description="Requests decoded together (continuous batching).")
    max_prompt_tokens: int = Field(2048, ge=1, le=1048576, description="Longer prompts are rejected.")
    max_new_tokens: int = Field(512, ge=1, le=1048576, description="Upper bound on generated tokens per request.")
    # Unset: the server's own default (`python -m stratus_workers.serve --help`), so that default lives in one place.
    prefill_chunk_tokens: int | None = Field(
        None, ge=1, le=1048576,
        description="Prompt tokens prefilled per engine step; longer prompts are split over steps so that running "
        "streams keep their pace (chunked prefill). Unset: the server's default (512).",
    )  # fmt: skip
    prefix_cache_tokens: int | None = Field(
        None, ge=-1, le=1 << 30,
        description="Tokens of shared prompt prefixes (system prompts, earlier turns) whose KV is kept for reuse: "
        "-1 sizes the cache from the device's free memory, 0 turns it off. Unset: the server's default (-1).",
    )  # fmt: skip
    stream_messages_per_second: int | None = Field(
        None, ge=0, le=1_000_000,
        description="Stream messages the server sends per second, all streams together: with n streams running, "
        "each gets a message every n / rate seconds carrying every token since (its first token and its end at "
        "once); 0 sends every engine step's tokens at once. Unset: the server's default (1000).",
    )  # fmt: skip


class Autoscaling(SpecModel):
    """A HorizontalPodAutoscaler for the tier instead of a fixed replica count."""

    model_config = ConfigDict(json_schema_extra=_cel(("self.minReplicas <= self.maxReplicas",
                                                      "minReplicas must not exceed maxReplicas")))

    min_replicas: int = Field(ge=1, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    metric: Literal["cpu", "queue-depth"] = Field(
        "cpu", description="cpu: average CPU utilisation; queue-depth: the servers' queued requests per pod "
        "(a Pods metric served by a custom-metrics adapter)."
    )
    target_cpu_utilization: int = Field(70, ge=1, le=100, description="Percent of the CPU request (metric cpu).")
    target_queue_depth: Quantity = Field("4", description="Average queued requests per pod (metric queue-depth).")
    queue_depth_metric: str = Field(
        "stratus_server_waiting_requests", min_length=1, max_length=253,
        description="Pods metric name for queue-depth: by default the gauge every model server exports, served "
        "to the HPA by a custom-metrics adapter (the chart's autoscaling.prometheusAdapter rule).",
    )

    @model_validator(mode="after")
    def _check(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class CloudTier(SpecModel):
    """The full model on GPU pods."""

    model_config = ConfigDict(json_schema_extra=_cel(
        ("self.gpusPerPod == 0 || self.tensorParallel <= self.gpusPerPod",
         "tensorParallel cannot exceed gpusPerPod"),
        ("self.gpusPerPod == 0 || self.pipelineParallel <= self.gpusPerPod",
         "pipelineParallel cannot exceed gpusPerPod"),
        # Only when both exceed 1: either alone is the rule above, with its own message.
        ("self.gpusPerPod == 0 || self.tensorParallel == 1 || self.pipelineParallel == 1 "
         "|| self.tensorParallel * self.pipelineParallel <= self.gpusPerPod",
         "tensorParallel times pipelineParallel cannot exceed gpusPerPod (each stage is a tensor-parallel group, "
         "one GPU a rank)"),
    ))

    replicas: int = Field(1, ge=0, le=1000, description="Server pods (ignored when autoscaling is set).")
    gpus_per_pod: int = Field(1, ge=0, le=16, description="nvidia.com/gpu per pod; 0 runs on CPU.")
    tensor_parallel: int = Field(1, ge=1, le=16, description="Tensor-parallel degree within a pod.")
    pipeline_parallel: int = Field(
        1, ge=1, le=16,
        description="Pipeline stages within a pod: the decoder layers split into this many contiguous stages, "
                    "one process and GPU each, or tensorParallel of them (a stage's tensor-parallel group).",
    )
    dtype: Dtype = Field("auto", description="Weights dtype: auto (bfloat16 on GPU, float32 on CPU).")
    device: Device = Field("auto", description="auto picks cuda when a GPU is visible.")
    serving: ServingSpec = Field(default_factory=ServingSpec)
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    autoscaling: Autoscaling | None = None

    @model_validator(mode="after")
    def _check(self) -> CloudTier:
        if self.gpus_per_pod and self.tensor_parallel > self.gpus_per_pod:
            raise ValueError("tensorParallel cannot exceed gpusPerPod")
        if self.gpus_per_pod and self.pipeline_parallel > self.gpus_per_pod:
            raise ValueError("pipelineParallel cannot exceed gpusPerPod")
        if self.gpus_per_pod and self.tensor_parallel * self.pipeline_parallel > self.gpus_per_pod:
            raise ValueError(
                "tensorParallel times pipelineParallel cannot exceed gpusPerPod (each stage is a tensor-parallel "
                "group, one GPU a rank)"
            )
        return self


class CompressionJob(SpecModel):
    """Where a variant's compression Job runs and with what: a GPU node in the cloud for training, typically."""

    gpus: int = Field(
        0,
        ge=0,
        le=16,
        description="GPUs for the Job (the operator's GPU resource, requests == limits); the worker trains and "
        "calibrates on CUDA and still measures tokens/s on the CPU, the edge's kind of device. 0: CPU only.",
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="The Job container's resources; unset: the operator's defaults for compression Jobs "
        "(the GPUs are added either way).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. the cloud tier's GPU node labels.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="e.g. for GPU taints.")


class EdgeVariant(SpecModel):
    """One compressed variant of the model, gated on quality and placed on edge nodes.

    Its format picks the engine that serves it (`runtime`): a `gguf` quantization is served by
    llama.cpp on the CPU, every other recipe by torch.
    """

    model_config = ConfigDict(json_schema_extra=_cel(
        ("!has(self.compression) || !has(self.compression.quantization) || "
         "self.compression.quantization.method != 'gguf' || !has(self.device) || self.device != 'cuda'",
         "a gguf variant is served by llama.cpp on the CPU; set device cpu"),
    ))

    name: str = Field(min_length=1, max_length=VARIANT_NAME_MAX, pattern=DNS_LABEL,
                      description="A DNS label naming the variant (short: it is part of child names).")
    compression: CompressionRecipe = Field(default_factory=CompressionRecipe)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    gate: QualityGate = Field(default_factory=QualityGate)
    job: CompressionJob = Field(
        default_factory=CompressionJob,
        description="The compression Job's placement and resources (not the edge servers'; a change applies to "
        "the next Job, as a Job's pod template cannot change).",
    )
    replicas: int = Field(1, ge=0, le=1000, description="Server pods (ignored when autoscaling is set).")
    dtype: Dtype = Field("auto")
    device: Device = Field("cpu", description="Edge nodes usually have no GPU.")
    serving: ServingSpec = Field(default_factory=ServingSpec)
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="Unset memory is derived from the variant's measured size.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    autoscaling: Autoscaling | None = None

    @property
    def runtime(self) -> Runtime:
        """The engine that serves this variant: llamacpp for a GGUF artifact, torch otherwise."""
        return self.compression.runtime

    @model_validator(mode="after")
    def _check(self) -> EdgeVariant:
        if self.runtime == RUNTIME_LLAMACPP and self.device == "cuda":
            raise ValueError("a gguf variant is served by llama.cpp on the CPU; set device cpu")
        return self


class EdgeTier(SpecModel):
    """Compressed variants for edge nodes."""

    variants: Annotated[
        list[EdgeVariant],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}),
    ] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _unique(self) -> EdgeTier:
        names = [v.name for v in self.variants]
        if len(names) != len(set(names)):
            raise ValueError(f"edge.variants[].name must be unique: {names}")
        return self


class PVCStorage(SpecModel):
    """Artifacts on a PersistentVolumeClaim (ReadWriteMany when edge pods run on several nodes)."""

    claim_name: str | None = Field(
        None, max_length=253, pattern=DNS_LABEL,
        description="An existing claim; unset makes the operator create <name>-artifacts.",
    )
    size: Quantity = Field("20Gi", description="Size of the claim the operator creates.")
    storage_class_name: str | None = Field(None, max_length=253)
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = Field(
        "ReadWriteMany", description="Access mode of the claim the operator creates. ReadWriteMany (the default) "
        "needs a class that provides it (NFS, CephFS, EFS, Filestore, Azure Files), usually not the default block "
        "class; ReadWriteOnce/ReadWriteOncePod fit one edge variant of one replica only (CEL).")


class ObjectStoreStorage(SpecModel):
    """Artifacts in an S3-compatible bucket."""

    url: str = Field(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", description="s3://bucket/prefix")
    endpoint: str | None = Field(None, description="S3 endpoint URL for non-AWS stores (MinIO, Ceph).")
    secret_name: str | None = Field(
        None, pattern=DNS_LABEL, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
    )


class StorageSpec(SpecModel):
    """Where compressed artifacts live between the compression Job and the edge pods."""

    model_config = ConfigDict(json_schema_extra=_cel(("!(has(self.pvc) && has(self.objectStore))",
                                                      "set pvc or objectStore, not both")))

    pvc: PVCStorage | None = None
    object_store: ObjectStoreStorage | None = None

    @model_validator(mode="after")
    def _one(self) -> StorageSpec:
        if self.pvc is not None and self.object_store is not None:
            raise ValueError("set pvc or objectStore, not both")
        return self


class ModelCacheSpec(SpecModel):
    """Where pods keep the s3:// and hf:// models (and object-store artifacts) they fetch, and compression Jobs
    their baselines: a volume of each pod by default, a per-node directory only when asked for."""

    host_path: str | None = Field(
        None, max_length=4096, pattern=r"^(/.*)?$",
        description="A node directory (hostPath, type Directory: it must exist on every node, writable by uid "
        "65532) shared by the pods of a node, so each node fetches a model once. Unset: the operator's default "
        "(STRATUS_CACHE_HOST_PATH, empty unless the cluster admin set one); empty: a per-pod emptyDir. A "
        "hostPath is refused in namespaces enforcing the baseline or restricted Pod Security Standard.")
    size_limit: Quantity | None = Field(None, description="sizeLimit of the per-pod emptyDir; unset: none.")


class ClientTokens(SpecModel):
    """Bearer tokens edge devices and apps present to the router, from a Secret (one token per line)."""

    secret_name: str = Field(min_length=1, max_length=253, pattern=DNS_LABEL,
                             description="A Secret in the deployment's namespace.")
    key: str = Field("tokens", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="The Secret's key holding the tokens, one per line.")


class SecuritySpec(SpecModel):
    """Links between the router and the model servers, and who may call the router."""

    model_config = ConfigDict(json_schema_extra=_cel(
        ("self.mtls || !has(self.tlsSecretName)", "tlsSecretName needs mtls"),
        ("self.mtls || !self.clientTls", "clientTls needs mtls (the router serves callers with its certificate)"),
    ))

    mtls: bool = Field(True, description="Mutual TLS between the router and the model servers.")
    tls_secret_name: str | None = Field(
        None, min_length=1, max_length=253, pattern=DNS_LABEL,
        description="A Secret with tls.crt, tls.key and ca.crt whose certificate covers the servers' and the "
        "router's Service names; unset: the operator issues a CA and a certificate into <name>-tls.",
    )
    client_tls: bool = Field(False, description="The router also serves its callers over TLS (its certificate).")
    client_tokens: ClientTokens | None = Field(
        None, description="Require a bearer token from callers of the router; unset: no token needed.")

    @model_validator(mode="after")
    def _check(self) -> SecuritySpec:
        if not self.mtls and self.tls_secret_name:
            raise ValueError("tlsSecretName needs mtls")
        if not self.mtls and self.client_tls:
            raise ValueError("clientTls needs mtls (the router serves callers with its certificate)")
        return self


SINGLE_NODE_CLAIM_MESSAGE = (
    "storage.pvc.accessMode ReadWriteOnce or ReadWriteOncePod lets one node (one pod) mount the claim, while the "
    "compression Jobs and edge pods of several variants or replicas may run on several nodes at once: use at most "
    "one edge variant with one replica (autoscaling maxReplicas 1), or ReadWriteMany on a class that provides it, "
    "or storage.objectStore")


class LLMDeploymentSpec(SpecModel):
    """What the user asks for: one model, a cloud tier, edge variants, a routing policy and storage."""

    model_config = ConfigDict(json_schema_extra=_cel(
        ("!has(self.storage.pvc) || !has(self.storage.pvc.accessMode) || self.storage.pvc.accessMode == "
         "'ReadWriteMany' || self.routing.policy == 'cloud-only' || (size(self.edge.variants) <= 1 && "
         "self.edge.variants.all(v, (!has(v.replicas) || v.replicas <= 1) && "
         "(!has(v.autoscaling) || v.autoscaling.maxReplicas <= 1)))", SINGLE_NODE_CLAIM_MESSAGE),
        ("self.routing.policy != 'edge-only' || size(self.edge.variants) > 0",
         "policy edge-only needs at least one edge variant (edge.variants)"),
        ("self.routing.policy == 'edge-only' || self.cloud.replicas > 0 || has(self.cloud.autoscaling)",
         "policies cloud-only and cascade need cloud replicas (cloud.replicas > 0 or cloud.autoscaling)"),
    ))

    model: ModelSpec
    cloud: CloudTier = Field(default_factory=CloudTier)
    edge: EdgeTier = Field(default_factory=EdgeTier)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)
    cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec)

    @model_validator(mode="after")
    def _check(self) -> LLMDeploymentSpec:
        if self.routing.policy == "edge-only" and not self.edge.variants:
            raise ValueError("policy edge-only needs at least one edge variant (edge.variants)")
        pvc, variants = self.storage.pvc, self.edge.variants
        several = len(variants) > 1 or any(
            v.replicas > 1 or (v.autoscaling is not None and v.autoscaling.max_replicas > 1) for v in variants)
        if pvc is not None and pvc.access_mode != "ReadWriteMany" and self.routing.policy != "cloud-only" and several:
            raise ValueError(SINGLE_NODE_CLAIM_MESSAGE)
        if self.routing.policy != "edge-only" and self.cloud.replicas == 0 and self.cloud.autoscaling is None:
            raise ValueError(
                "policies cloud-only and cascade need cloud replicas (cloud.replicas > 0 or cloud.autoscaling)")
        return self


# ---------------------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------------------


class Condition(SpecModel):
    """A condition in the Kubernetes shape (metav1.Condition)."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field("", max_length=32768)
    last_transition_time: str = Field(description="RFC 3339 time of the last status change.")
    observed_generation: int = Field(0, ge=0)


VariantState = Literal["Pending", "Compressing", "Accepted", "Rejected", "Failed"]


class VariantStatus(SpecModel):
    """One edge variant: its compression figures and where it runs."""

    name: str
    state: VariantState = "Pending"
    recipe: str = Field("", description="Short recipe summary, e.g. quantize:int8-weight.")
    runtime: Runtime = Field(RUNTIME_TORCH, description="The engine serving it: torch, or llamacpp for a GGUF.")
    job: str = Field("", description="The compression Job's name.")
    size_bytes: int | None = None
    perplexity: float | None = None
    perplexity_increase: float | None = Field(None, description="Relative to the full model (0.05 = +5%).")
    tokens_per_second: float | None = None
    agreement: float | None = None
    reasons: list[str] = Field(default_factory=list, description="Why the gate rejected it or the Job failed.")
    placed: bool = False
    nodes: list[str] = Field(default_factory=list)
    placement: str = Field("", description="Why these nodes, or why none.")
    ready_replicas: int = 0
    replicas: int = 0


class TierStatus(SpecModel):
    """Ready and desired server pods of a tier."""

    ready_replicas: int = 0
    desired_replicas: int = 0
    summary: str = Field("0/0", description="ready/desired, shown by kubectl get.")
    topology: str = Field("", description="How one server of the tier spans its GPUs (tensor or pipeline parallel).")


class RouterStatus(SpecModel):
    """How clients reach the deployment."""

    endpoint: str = Field("", description="gRPC host:port of the router Service.")
    http_endpoint: str = Field("", description="HTTP (OpenAI-style) host:port of the router Service.")
    ready: bool = False
    backends: list[str] = Field(default_factory=list)


class LLMDeploymentStatus(SpecModel):
    """What the operator observed and did."""

    phase: Phase = "Pending"
    observed_generation: int = 0
    effective_policy: str = Field("", description="The policy the router applies now (cloud-only when degraded).")
    url: str = Field("", description="The router's HTTP (OpenAI-style) URL inside the cluster; empty until a router "
                     "exists. gRPC clients use router.endpoint.")
    conditions: Annotated[
        list[Condition],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
    ] = Field(default_factory=list)
    variants: Annotated[
        list[VariantStatus],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}),
    ] = Field(default_factory=list)
    cloud: TierStatus = Field(default_factory=TierStatus)
    edge: TierStatus = Field(default_factory=TierStatus)
    router: RouterStatus = Field(default_factory=RouterStatus)
    message: str = ""


# ---------------------------------------------------------------------------------------------------------
# The object
# ---------------------------------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The parts of metadata the planner uses; the rest of Kubernetes' metadata is ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=253)
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _child_safe(cls, name: str) -> str:
        # The twin of the CRD's NAME_RULE: without the API server (the local runner), and for objects
        # created before the rule, the name is refused here instead of by every child's create.
        problem = name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        return name


class LLMDeployment(SpecModel):
    """A whole LLMDeployment object as kubectl or the API server has it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["stratus.dev/v1alpha1"] = "stratus.dev/v1alpha1"
    kind: Literal["LLMDeployment"] = "LLMDeployment"
    metadata: ObjectMeta
    spec: LLMDeploymentSpec
    status: LLMDeploymentStatus | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> LLMDeployment:
        """Validate a manifest (YAML-loaded dict or API object); raises pydantic.ValidationError."""
        return cls.model_validate(manifest)

    @classmethod
    def from_parts(
        cls, *, name: str, namespace: str | None, uid: str, generation: int | None, spec: dict[str, Any]
    ) -> LLMDeployment:
        """Build from the pieces a kopf handler receives."""
        return cls.model_validate({
            "metadata": {"name": name, "namespace": namespace or "default", "uid": uid,
                         "generation": generation or 0},
            "spec": dict(spec),
        })

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LLMDeployment:
        """From the object a kopf handler or the API hands over; its status is not read (the operator's own).

        Raises pydantic.ValidationError; `spec` that is not an object at all (possible only without the CRD)
        is validated as such, so the error names it.
        """
        meta = body.get("metadata") or {}
        generation = meta.get("generation")
        spec = body.get("spec")
        return cls.from_parts(
            name=meta.get("name") or "", namespace=meta.get("namespace"), uid=meta.get("uid") or "",
            generation=generation if isinstance(generation, int) else 0,
            spec=dict(spec) if isinstance(spec, Mapping) else {"": spec} if spec is not None else {},
        )

    def with_edge_defaults(self, *, node_selector: Mapping[str, str],
                           tolerations: Sequence[Mapping[str, Any]]) -> LLMDeployment:
        """The cluster's edge defaults (operator config) for variants that set no nodeSelector or tolerations."""
        if not node_selector and not tolerations:
            return self
        variants = []
        for v in self.spec.edge.variants:
            update: dict[str, Any] = {}
            if not v.node_selector and node_selector:
                update["node_selector"] = dict(node_selector)
            if not v.tolerations and tolerations:
                update["tolerations"] = [Toleration.model_validate(t) for t in tolerations]
            variants.append(v.model_copy(update=update) if update else v)
        edge = self.spec.edge.model_copy(update={"variants": variants})
        spec = self.spec.model_copy(update={"edge": edge})
        return self.model_copy(update={"spec": spec})

    def with_cloud_defaults(self, *, node_selector: Mapping[str, str],
                            tolerations: Sequence[Mapping[str, Any]]) -> LLMDeployment:
        """The cluster's cloud defaults (operator config) where the cloud tier sets no nodeSelector or tolerations."""
        cloud = self.spec.cloud
        update: dict[str, Any] = {}
        if not cloud.node_selector and node_selector:
            update["node_selector"] = dict(node_selector)
        if not cloud.tolerations and tolerations:
            update["tolerations"] = [Toleration.model_validate(t) for t in tolerations]
        if not update:
            return self
        spec = self.spec.model_copy(update={"cloud": cloud.model_copy(update=update)})
        return self.model_copy(update={"spec": spec})
