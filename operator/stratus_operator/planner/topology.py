"""Stage 2 of planning: (LLMDeployment, cluster view, compression results) -> the desired topology.

The plan is executor-neutral: it names models (`ModelRef`), servers and the router's backends, and says
where replicas fit, but holds no command lines, no in-pod paths and no cluster DNS names. `render` binds it
to Kubernetes objects, `local.runner` to processes on loopback ports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from stratus_operator.names import cloud_name, edge_name, router_name
from stratus_operator.placement import (
    GPU_RESOURCE,
    ClusterView,
    Placement,
    Resources,
    cloud_demand,
    edge_demand,
    format_bytes,
    place,
)
from stratus_operator.planner.jobs import CompressionJobPlan, CompressionResult, plan_jobs
from stratus_operator.spec import (
    Autoscaling,
    Device,
    Dtype,
    LLMDeployment,
    Phase,
    ResourceRequirements,
    ServingSpec,
    Toleration,
    VariantState,
    is_extended_resource,
)
from stratus_workers.router.config import RoutingSpec
from stratus_workers.runtimes import (
    DEFAULT_MAX_SESSIONS,
    RUNTIME_LLAMACPP,
    RUNTIME_TORCH,
    Runtime,
    llamacpp_cache_bytes,
)

Tier = Literal["edge", "cloud"]


@dataclass(frozen=True)
class Source:
    """The deployment's full model, as `spec.model.source` names it (bundled://, pvc://, s3://, hf://, a path)."""

    uri: str


@dataclass(frozen=True)
class Artifact:
    """A compressed variant: the artifact the compression Job with this recipe hash wrote."""

    variant: str
    spec_hash: str


# What a server loads or the router reads its tokenizer from; each executor binds it to a path of its world.
ModelRef = Source | Artifact


@dataclass(frozen=True)
class ServerPlan:
    """One model server (a Deployment and its Service in a cluster, a process locally)."""

    name: str
    tier: Tier
    variant: str | None
    model: ModelRef
    replicas: int
    dtype: Dtype
    device: Device
    serving: ServingSpec
    resources: ResourceRequirements
    node_selector: Mapping[str, str]
    tolerations: tuple[Toleration, ...]
    placement: Placement
    autoscaling: Autoscaling | None = None
    # GPUs one server spans; the server starts its other ranks itself (no torchrun needed).
    tensor_parallel: int = 1
    # The engine that serves the model: the server picks llama.cpp itself for a GGUF artifact; the plan
    # carries it so that status and `stratus up` say which.
    runtime: Runtime = RUNTIME_TORCH
    # Pipeline stages of one server, one process and GPU each in its one pod; it starts them itself.
    pipeline_parallel: int = 1


@dataclass(frozen=True)
class RouterPlan:
    """The router: its routing section (the effective policy), the servers it routes to, its tokenizer."""

    name: str
    routing: RoutingSpec
    # Server names, in plan order; each executor gives them addresses.
    backends: tuple[str, ...]
    # The router counts prompt tokens (cascade's maxEdgePromptTokens) and drafts (speculative) with the
    # model's tokenizer.
    tokenizer: ModelRef
    replicas: int = 1


@dataclass(frozen=True)
class VariantPlan:
    """What the plan decided for one edge variant."""

    name: str
    state: VariantState
    recipe: str
    job: CompressionJobPlan | None
    placement: Placement | None
    server: str | None
    wanted_replicas: int = 0
    runtime: Runtime = RUNTIME_TORCH


@dataclass(frozen=True)
class Plan:
    """The desired topology of one LLMDeployment."""

    deployment: str
    generation: int
    policy: str
    effective_policy: str
    compression_jobs: list[CompressionJobPlan]
    servers: list[ServerPlan]
    router: RouterPlan | None
    variants: list[VariantPlan]
    notes: list[str] = field(default_factory=list)

    @property
    def cloud(self) -> ServerPlan | None:
        return next((s for s in self.servers if s.tier == "cloud"), None)

    @property
    def edge(self) -> list[ServerPlan]:
        return [s for s in self.servers if s.tier == "edge"]

    def server(self, name: str) -> ServerPlan:
        """The server named `name` (a router backend)."""
        return next(s for s in self.servers if s.name == name)

    def job(self, variant: str) -> CompressionJobPlan:
        """The compression Job of `variant`."""
        return next(j for j in self.compression_jobs if j.variant == variant)

    @property
    def pending_jobs(self) -> list[CompressionJobPlan]:
        return [j for j in self.compression_jobs if not j.done]

    @property
    def failed_jobs(self) -> list[CompressionJobPlan]:
        return [j for j in self.compression_jobs if j.state == "failed"]

    @property
    def phase(self) -> Phase:
        """The phase that follows from the plan alone (readiness refines it in `assess`)."""
        if self.failed_jobs:
            return "Failed"
        if self.pending_jobs:
            return "Compressing"
        return "Deploying"

    @classmethod
    def empty(cls, deployment: str, generation: int) -> Plan:
        """Nothing to run: the plan of a spec that could not be read."""
        return cls(deployment, generation, "", "", [], [], None, [])


def _tier_replicas(replicas: int, autoscaling: Autoscaling | None) -> int:
    return autoscaling.min_replicas if autoscaling is not None else replicas


def _extended_equal(resources: ResourceRequirements) -> ResourceRequirements:
    """Extended resources with request == limit: either one given is written to both (the CRD refuses two
    different values)."""
    requests, limits = dict(resources.requests), dict(resources.limits)
    for name in {*requests, *limits}:
        if is_extended_resource(name):
            value = limits.get(name, requests.get(name))
            assert value is not None
            requests[name] = limits[name] = value
    return ResourceRequirements(requests=requests, limits=limits)


def _with_gpu(resources: ResourceRequirements, gpus: int, gpu_resource: str) -> ResourceRequirements:
    """`gpus` of `gpu_resource` unless the resources name a count of their own, request == limit."""
    resources = _extended_equal(resources)
    if gpus <= 0 or gpu_resource in resources.limits:
        return resources
    count = str(gpus)
    return ResourceRequirements(requests={**resources.requests, gpu_resource: count},
                                limits={**resources.limits, gpu_resource: count})


def _with_requests(resources: ResourceRequirements, demand: Resources) -> ResourceRequirements:
    """The demand placement (or the cloud default) counted with, as requests the scheduler counts too."""
    resources = _extended_equal(resources)
    requests, limits = dict(resources.requests), dict(resources.limits)
    # A limit alone is the request too (the API server defaults it so); a smaller request beside it is fine,
    # a larger one would be refused.
    if "cpu" not in limits:
        requests.setdefault("cpu", f"{demand.cpu_milli}m")
    if "memory" not in limits:
        requests.setdefault("memory", f"{demand.memory // (1024 * 1024)}Mi")
    return ResourceRequirements(requests=requests, limits=limits)


def _fit_autoscaling(autoscaling: Autoscaling | None, placement: Placement) -> Autoscaling | None:
    # The HPA may not scale past the replicas placement found room for.
    if autoscaling is None or placement.placed_replicas >= autoscaling.max_replicas:
        return autoscaling
    top = max(placement.placed_replicas, 1)
    return autoscaling.model_copy(update={"max_replicas": top, "min_replicas": min(autoscaling.min_replicas, top)})


def _with_result(job: CompressionJobPlan, results: Mapping[str, CompressionResult]) -> CompressionJobPlan:
    result = results.get(job.variant)
    if result is not None and result.spec_hash is not None and result.spec_hash != job.spec_hash:
        return job  # a result for an older recipe
    return replace(job, result=result) if result is not None else job


def plan(
    deployment: LLMDeployment,
    cluster: ClusterView,
    results: Mapping[str, CompressionResult],
    *,
    gpu_resource: str = GPU_RESOURCE,
    current: Mapping[str, Sequence[str]] | None = None,
) -> Plan:
    """The desired children of `deployment` given the nodes in `cluster` and the compression `results`.

    `current` maps variant names to the nodes their edge servers run on now (the last status): placement
    keeps them while they fit, so the pin and the pods stay put.

    `results` maps variant names to outcomes; a result whose spec_hash differs from the current job's
    (the recipe changed since) is ignored. Edge servers start only for accepted variants, placed by
    their measured size; routing falls back to the cloud where no edge server runs.
    """
    spec = deployment.spec
    meta = deployment.metadata
    name = meta.name
    policy = spec.routing.policy
    notes: list[str] = []

    jobs = [_with_result(job, results) for job in plan_jobs(deployment, gpu_resource=gpu_resource)]
    variants: list[VariantPlan] = []
    servers: list[ServerPlan] = []
    reserved: dict[str, Resources] = {}

    if policy != "edge-only":
        cloud = spec.cloud
        replicas = _tier_replicas(cloud.replicas, cloud.autoscaling)
        servers.append(ServerPlan(
            name=cloud_name(name),
            tier="cloud",
            variant=None,
            model=Source(spec.model.source),
            replicas=replicas,
            dtype=cloud.dtype,
            device=cloud.device,
            serving=cloud.serving,
            # A tensor- or pipeline-parallel server needs one GPU per rank in its one pod (a pipeline's stages
            # times their tensor-parallel ranks).
            # CPU and memory requests by default: the pods are not BestEffort, the scheduler counts the model's
            # memory, and an HPA on CPU utilisation has a request to divide by.
            resources=_with_requests(
                # gpusPerPod GPUs (CEL keeps tensorParallel x pipelineParallel within them); 0 runs on CPU,
                # whatever the degree.
                _with_gpu(cloud.resources, cloud.gpus_per_pod, gpu_resource),
                cloud_demand(cloud.resources, spec.model.source)),
            node_selector=dict(cloud.node_selector),
            tolerations=tuple(cloud.tolerations),
            # The cloud tier is left to the scheduler: GPU nodes are sized for the full model.
            placement=Placement(replicas, (), f"scheduler: {cloud.gpus_per_pod} GPU per pod")
            if not cluster.is_local else place(cluster, what="cloud", demand=Resources(), replicas=replicas,
                                               node_selector={}, tolerations=()),
            autoscaling=cloud.autoscaling,
            tensor_parallel=cloud.tensor_parallel,
            pipeline_parallel=cloud.pipeline_parallel,
        ))

    variant_specs = {v.name: v for v in spec.edge.variants}
    for job in jobs:
        variant = variant_specs[job.variant]
        result = job.result
        recipe = variant.compression.summary
        runtime = variant.runtime
        wanted = _tier_replicas(variant.replicas, variant.autoscaling)
        if result is None:
            variants.append(VariantPlan(variant.name, "Compressing", recipe, job, None, None, wanted, runtime))
            continue
        if result.status == "failed":
            variants.append(VariantPlan(variant.name, "Failed", recipe, job, None, None, wanted, runtime))
            continue
        if result.status == "rejected":
            notes.append(f"variant {variant.name} rejected by its gate: {'; '.join(result.reasons) or 'no reason'}")
            variants.append(VariantPlan(variant.name, "Rejected", recipe, job, None, None, wanted, runtime))
            continue
        replicas = wanted
        place_replicas = variant.autoscaling.max_replicas if variant.autoscaling is not None else replicas
        size = result.summary.size_bytes
        cache = 0
        serving, per_token = variant.serving, result.summary.kv_bytes_per_token
        pool_tokens = serving.prefix_cache_tokens or 0
        if runtime == RUNTIME_LLAMACPP and per_token:
            cache = llamacpp_cache_bytes(
                per_token, max_batch_size=serving.max_batch_size,
                max_tokens=serving.max_prompt_tokens + serving.max_new_tokens, max_sessions=DEFAULT_MAX_SESSIONS,
            )
        elif per_token and pool_tokens > 0:
            # A prefix cache sized in the manifest is the torch server's to fill (its pool grows to it on a CPU); the
            # automatic size, at most 256 MiB on a CPU, is not counted: set the variant's memory request where that
            # matters.
            cache = per_token * pool_tokens
        demand = edge_demand(variant.resources, size or 0, gpu_resource, cache)
        placement = place(
            cluster,
            what=f"edge variant {variant.name}" + (f" ({format_bytes(size)} model)" if size else ""),
            demand=demand,
            replicas=place_replicas,
            node_selector=variant.node_selector,
            tolerations=variant.tolerations,
            reserved=reserved,
            current=(current or {}).get(variant.name, ()),
        )
        for node in placement.assignments:
            reserved[node] = reserved.get(node, Resources()) + demand
        server = None
        if placement.placed_replicas > 0:
            server = edge_name(name, variant.name)
            if variant.autoscaling is None:
                replicas = min(replicas, placement.placed_replicas)
            servers.append(ServerPlan(
                name=server,
                tier="edge",
                variant=variant.name,
                model=Artifact(variant.name, job.spec_hash),
                replicas=replicas,
                dtype=variant.dtype,
                device=variant.device,
                serving=variant.serving,
                resources=_with_requests(variant.resources, demand) if not cluster.is_local
                else _extended_equal(variant.resources),
                node_selector=dict(variant.node_selector),
                tolerations=tuple(variant.tolerations),
                placement=placement,
                autoscaling=_fit_autoscaling(variant.autoscaling, placement),
                runtime=runtime,
            ))
        else:
            notes.append(placement.reason)
        variants.append(VariantPlan(variant.name, "Accepted", recipe, job, placement, server, wanted, runtime))

    effective = policy
    if policy not in ("cloud-only", "edge-only") and not any(s.tier == "edge" for s in servers):
        effective = "cloud-only"  # cascade and speculative need an edge server; the cloud serves alone
    router: RouterPlan | None = None
    if servers:
        router = RouterPlan(
            name=router_name(name),
            routing=spec.routing.model_copy(update={"policy": effective}),
            backends=tuple(s.name for s in servers),
            tokenizer=Source(spec.model.source),
        )
    return Plan(
        deployment=name,
        generation=meta.generation,
        policy=policy,
        effective_policy=effective,
        compression_jobs=jobs,
        servers=servers,
        router=router,
        variants=variants,
        notes=notes,
    )
