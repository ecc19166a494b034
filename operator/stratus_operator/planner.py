"""The pure planner: (LLMDeployment, cluster view, compression results) -> the desired topology, no I/O.

Both executors use it: the kopf handlers render the plan into Kubernetes objects (`render`), and the
local runner (`stratus up`) turns the same plan into processes on loopback ports.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from stratus_operator.placement import (
    ClusterView,
    NodeView,
    Placement,
    Resources,
    Taint,
    edge_demand,
    format_bytes,
    place,
)
from stratus_operator.spec import (
    CONDITION_TYPES,
    Autoscaling,
    Condition,
    ConditionType,
    Dtype,
    LLMDeployment,
    LLMDeploymentStatus,
    Phase,
    ResourceRequirements,
    RouterStatus,
    TierStatus,
    Toleration,
    VariantState,
    VariantStatus,
)
from stratus_workers.compress.spec import CompressionJobSpec
from stratus_workers.router.config import Backend, RouterConfig

if TYPE_CHECKING:
    from stratus_operator.render import RenderOptions

__all__ = [
    "ClusterView",
    "CompressionJobPlan",
    "CompressionResult",
    "NodeView",
    "Placement",
    "Plan",
    "ResultParseError",
    "RouterFlags",
    "RouterPlan",
    "ServeFlags",
    "ServerPlan",
    "Taint",
    "assess",
    "build_status",
    "child_name",
    "plan",
    "render",
]

Tier = Literal["edge", "cloud"]
GRPC_PORT = 50051
HTTP_PORT = 8080
ARTIFACTS_DIR = "/artifacts"
CONFIG_DIR = "/etc/stratus"
TERMINATION_LOG = "/dev/termination-log"
GPU_RESOURCE = "nvidia.com/gpu"


def stable_hash(value: Any, length: int = 10) -> str:
    """A short hash of JSON-able data, stable across processes (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def child_name(deployment: str, *parts: str) -> str:
    """`<deployment>-<parts>` as a DNS label (<= 63 chars), shortened with a hash when too long."""
    name = "-".join((deployment, *parts))
    if len(name) <= 63:
        return name
    digest = stable_hash(name, 8)
    return f"{name[:63 - 9].rstrip('-')}-{digest}"


# ---------------------------------------------------------------------------------------------------------
# Compression results
# ---------------------------------------------------------------------------------------------------------


class ResultParseError(ValueError):
    """A compression Job's output holds no summary the planner can read."""


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in data and data[key] is not None:
            return data[key]
    return None


def _opt_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class CompressionResult:
    """One variant's compression outcome: the figures from its summary, or why the Job failed."""

    name: str
    status: Literal["accepted", "rejected", "failed"]
    reasons: tuple[str, ...] = ()
    size_bytes: int | None = None
    perplexity: float | None = None
    perplexity_increase: float | None = None
    tokens_per_second: float | None = None
    agreement: float | None = None
    # The CompressionJobPlan.spec_hash this result came from; None trusts it for the current recipe.
    spec_hash: str | None = None
    # For a failed Job: the Job's own reason (e.g. BackoffLimitExceeded, DeadlineExceeded).
    failure_reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    @classmethod
    def from_summary(cls, text: str, *, name: str | None = None, spec_hash: str | None = None) -> CompressionResult:
        """Parse the compress worker's one-line JSON summary (the last JSON object line of `text`).

        Tolerates camelCase or snake_case keys and an `accepted` boolean instead of `status`.
        Raises ResultParseError saying what was wrong.
        """
        data: dict[str, Any] | None = None
        for line in reversed(text.strip().splitlines()):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                candidate = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(candidate, dict):
                data = candidate
                break
        if data is None:
            tail = text.strip()[-200:]
            raise ResultParseError(f"no JSON summary line in the compression output (tail: {tail!r})")
        status_raw = _first(data, "status", "state")
        if status_raw is None and isinstance(data.get("accepted"), bool):
            status_raw = "accepted" if data["accepted"] else "rejected"
        status = str(status_raw).lower() if status_raw is not None else ""
        if status not in ("accepted", "rejected", "failed"):
            raise ResultParseError(f"compression summary has no status accepted/rejected: {json.dumps(data)[:300]}")
        reasons_raw = _first(data, "reasons", "reason") or ()
        reasons = (reasons_raw,) if isinstance(reasons_raw, str) else tuple(str(r) for r in reasons_raw)
        size = _first(data, "size_bytes", "sizeBytes", "bytes", "size")
        return cls(
            name=str(_first(data, "name", "variant") or name or ""),
            status=status,  # type: ignore[arg-type]
            reasons=reasons,
            size_bytes=int(size) if isinstance(size, int | float) and not isinstance(size, bool) else None,
            perplexity=_opt_float(_first(data, "perplexity", "ppl")),
            perplexity_increase=_opt_float(_first(data, "perplexity_increase", "perplexityIncrease", "ppl_increase")),
            tokens_per_second=_opt_float(_first(data, "tokens_per_second", "tokensPerSecond", "tokens_per_s")),
            agreement=_opt_float(_first(data, "agreement", "greedy_agreement")),
            spec_hash=spec_hash,
        )

    @classmethod
    def failed(cls, name: str, reason: str, message: str = "", *, spec_hash: str | None = None) -> CompressionResult:
        """A Job that failed without a gate verdict, with the Job's own reason."""
        text = f"{reason}: {message}" if message else reason
        return cls(name=name, status="failed", reasons=(text,), spec_hash=spec_hash, failure_reason=reason)


# ---------------------------------------------------------------------------------------------------------
# Plan parts
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeFlags:
    """The flags of `python -m stratus_workers.serve`; `replace()` host/port for loopback use."""

    model: str
    name: str
    tier: Tier
    dtype: Dtype
    device: Literal["auto", "cpu", "cuda"]
    max_batch_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    host: str = "0.0.0.0"
    port: int = GRPC_PORT
    http_port: int = HTTP_PORT
    # GPUs one server spans; the server starts its other ranks itself (no torchrun needed).
    tensor_parallel: int = 1

    def args(self) -> list[str]:
        args = [
            "--model", self.model, "--name", self.name, "--tier", self.tier,
            "--host", self.host, "--port", str(self.port), "--http-port", str(self.http_port),
            "--dtype", self.dtype, "--device", self.device,
            "--max-batch-size", str(self.max_batch_size),
            "--max-prompt-tokens", str(self.max_prompt_tokens),
            "--max-new-tokens", str(self.max_new_tokens),
        ]
        if self.tensor_parallel > 1:
            args += ["--tensor-parallel", str(self.tensor_parallel)]
        return args

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", "stratus_workers.serve", *self.args()]


@dataclass(frozen=True)
class RouterFlags:
    """The flags of `python -m stratus_workers.router`."""

    config: str = f"{CONFIG_DIR}/router.json"
    host: str = "0.0.0.0"
    port: int = GRPC_PORT
    http_port: int = HTTP_PORT

    def args(self) -> list[str]:
        return ["--config", self.config, "--host", self.host, "--port", str(self.port),
                "--http-port", str(self.http_port)]

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", "stratus_workers.router", *self.args()]


@dataclass(frozen=True)
class CompressionJobPlan:
    """One compression Job: its input, where its artifact goes and what came of it so far."""

    variant: str
    name: str
    spec: CompressionJobSpec
    spec_hash: str
    artifact_path: str
    result: CompressionResult | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def state(self) -> Literal["pending", "accepted", "rejected", "failed"]:
        return "pending" if self.result is None else self.result.status

    def args(self, spec_path: str = f"{CONFIG_DIR}/spec.json", termination_log: str = TERMINATION_LOG) -> list[str]:
        return ["--spec", spec_path, "--out", self.artifact_path, "--termination-log", termination_log]

    def command(self, python: str = "python", **kwargs: str) -> list[str]:
        return [python, "-m", "stratus_workers.compress", *self.args(**kwargs)]

    def spec_json(self) -> str:
        return self.spec.model_dump_json(by_alias=True, indent=2)


@dataclass(frozen=True)
class ServerPlan:
    """One model-server Deployment (and its Service)."""

    name: str
    tier: Tier
    variant: str | None
    model: str
    replicas: int
    flags: ServeFlags
    resources: ResourceRequirements
    node_selector: Mapping[str, str]
    tolerations: tuple[Toleration, ...]
    placement: Placement
    autoscaling: Autoscaling | None = None
    namespace: str = "default"

    @property
    def address(self) -> str:
        """host:port of its gRPC endpoint, by in-cluster DNS."""
        return f"{self.name}.{self.namespace}.svc:{self.flags.port}"


@dataclass(frozen=True)
class RouterPlan:
    """The router Deployment, its config and Service."""

    name: str
    config: RouterConfig
    flags: RouterFlags = RouterFlags()
    replicas: int = 1
    namespace: str = "default"

    @property
    def address(self) -> str:
        return f"{self.name}.{self.namespace}.svc:{self.flags.port}"

    @property
    def http_address(self) -> str:
        return f"{self.name}.{self.namespace}.svc:{self.flags.http_port}"

    def config_json(self) -> str:
        return self.config.model_dump_json(by_alias=True, indent=2)


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


@dataclass(frozen=True)
class Plan:
    """The desired topology of one LLMDeployment."""

    deployment: str
    namespace: str
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


def _tier_replicas(replicas: int, autoscaling: Autoscaling | None) -> int:
    return autoscaling.min_replicas if autoscaling is not None else replicas


def _with_gpu(resources: ResourceRequirements, gpus: int, gpu_resource: str) -> ResourceRequirements:
    if gpus <= 0:
        return resources
    limits = dict(resources.limits)
    requests = dict(resources.requests)
    limits.setdefault(gpu_resource, str(gpus))
    requests.setdefault(gpu_resource, limits[gpu_resource])
    return ResourceRequirements(requests=requests, limits=limits)


def _with_requests(resources: ResourceRequirements, demand: Resources) -> ResourceRequirements:
    requests = dict(resources.requests)
    requests.setdefault("cpu", f"{demand.cpu_milli}m")
    requests.setdefault("memory", f"{demand.memory // (1024 * 1024)}Mi")
    return ResourceRequirements(requests=requests, limits=dict(resources.limits))


def _fit_autoscaling(autoscaling: Autoscaling | None, placement: Placement) -> Autoscaling | None:
    # The HPA may not scale past the replicas placement found room for.
    if autoscaling is None or placement.placed_replicas >= autoscaling.max_replicas:
        return autoscaling
    top = max(placement.placed_replicas, 1)
    return autoscaling.model_copy(update={"max_replicas": top, "min_replicas": min(autoscaling.min_replicas, top)})


def plan(
    deployment: LLMDeployment,
    cluster: ClusterView,
    results: Mapping[str, CompressionResult],
    *,
    gpu_resource: str = GPU_RESOURCE,
) -> Plan:
    """The desired children of `deployment` given the nodes in `cluster` and the compression `results`.

    `results` maps variant names to outcomes; a result whose spec_hash differs from the current job's
    (the recipe changed since) is ignored. Edge servers start only for accepted variants, placed by
    their measured size; routing falls back to the cloud where no edge server runs.
    """
    spec = deployment.spec
    meta = deployment.metadata
    name, namespace = meta.name, meta.namespace
    policy = spec.routing.policy
    notes: list[str] = []

    jobs: list[CompressionJobPlan] = []
    variants: list[VariantPlan] = []
    servers: list[ServerPlan] = []
    reserved: dict[str, Resources] = {}

    want_cloud = policy != "edge-only"
    want_edge = policy != "cloud-only"

    if want_cloud:
        cloud = spec.cloud
        replicas = _tier_replicas(cloud.replicas, cloud.autoscaling)
        server_name = child_name(name, "cloud")
        servers.append(ServerPlan(
            name=server_name,
            tier="cloud",
            variant=None,
            model=spec.model.source,
            replicas=replicas,
            flags=ServeFlags(
                model=spec.model.source, name=server_name, tier="cloud", dtype=cloud.dtype, device=cloud.device,
                max_batch_size=cloud.serving.max_batch_size, max_prompt_tokens=cloud.serving.max_prompt_tokens,
                max_new_tokens=cloud.serving.max_new_tokens, tensor_parallel=cloud.tensor_parallel,
            ),
            # A tensor-parallel server needs one GPU per rank in its one pod.
            resources=_with_gpu(cloud.resources, max(cloud.gpus_per_pod, cloud.tensor_parallel), gpu_resource),
            node_selector=dict(cloud.node_selector),
            tolerations=tuple(cloud.tolerations),
            # The cloud tier is left to the scheduler: GPU nodes are sized for the full model.
            placement=Placement(replicas, (), f"scheduler: {cloud.gpus_per_pod} GPU per pod")
            if not cluster.is_local else place(cluster, what="cloud", demand=Resources(), replicas=replicas,
                                               node_selector={}, tolerations=()),
            autoscaling=cloud.autoscaling,
            namespace=namespace,
        ))

    for variant in spec.edge.variants if want_edge else []:
        job_spec = CompressionJobSpec(
            name=variant.name,
            model_source=spec.model.source,
            compression=variant.compression,
            evaluation=variant.evaluation,
            gate=variant.gate,
        )
        spec_hash = stable_hash(job_spec.model_dump(mode="json", by_alias=True), 8)
        result = results.get(variant.name)
        if result is not None and result.spec_hash is not None and result.spec_hash != spec_hash:
            result = None  # a result for an older recipe
        job = CompressionJobPlan(
            variant=variant.name,
            name=child_name(name, "compress", variant.name, spec_hash),
            spec=job_spec,
            spec_hash=spec_hash,
            artifact_path=f"{ARTIFACTS_DIR}/{variant.name}",
            result=result,
        )
        jobs.append(job)
        recipe = variant.compression.summary
        wanted = _tier_replicas(variant.replicas, variant.autoscaling)
        if result is None:
            variants.append(VariantPlan(variant.name, "Compressing", recipe, job, None, None, wanted))
            continue
        if result.status == "failed":
            variants.append(VariantPlan(variant.name, "Failed", recipe, job, None, None, wanted))
            continue
        if result.status == "rejected":
            notes.append(f"variant {variant.name} rejected by its gate: {'; '.join(result.reasons) or 'no reason'}")
            variants.append(VariantPlan(variant.name, "Rejected", recipe, job, None, None, wanted))
            continue
        replicas = wanted
        place_replicas = variant.autoscaling.max_replicas if variant.autoscaling is not None else replicas
        demand = edge_demand(variant.resources, result.size_bytes or 0, gpu_resource)
        placement = place(
            cluster,
            what=f"edge variant {variant.name}"
                 + (f" ({format_bytes(result.size_bytes)} model)" if result.size_bytes else ""),
            demand=demand,
            replicas=place_replicas,
            node_selector=variant.node_selector,
            tolerations=variant.tolerations,
            reserved=reserved,
        )
        for node in placement.assignments:
            reserved[node] = reserved.get(node, Resources()) + demand
        server_name = child_name(name, "edge", variant.name)
        server = None
        if placement.placed_replicas > 0:
            server = server_name
            if variant.autoscaling is None:
                replicas = min(replicas, placement.placed_replicas)
            servers.append(ServerPlan(
                name=server_name,
                tier="edge",
                variant=variant.name,
                model=job.artifact_path,
                replicas=replicas,
                flags=ServeFlags(
                    model=job.artifact_path, name=server_name, tier="edge", dtype=variant.dtype,
                    device=variant.device, max_batch_size=variant.serving.max_batch_size,
                    max_prompt_tokens=variant.serving.max_prompt_tokens,
                    max_new_tokens=variant.serving.max_new_tokens,
                ),
                resources=_with_requests(variant.resources, demand) if not cluster.is_local else variant.resources,
                node_selector=dict(variant.node_selector),
                tolerations=tuple(variant.tolerations),
                placement=placement,
                autoscaling=_fit_autoscaling(variant.autoscaling, placement),
                namespace=namespace,
            ))
        else:
            notes.append(placement.reason)
        variants.append(VariantPlan(variant.name, "Accepted", recipe, job, placement, server, wanted))

    edge_servers = [s for s in servers if s.tier == "edge"]
    effective = policy
    if policy not in ("cloud-only", "edge-only") and not edge_servers:
        effective = "cloud-only"  # cascade and speculative need an edge server; the cloud serves alone
    backends = [Backend(name=s.name, address=s.address, tier=s.tier) for s in servers]
    router: RouterPlan | None = None
    if servers:
        routing = spec.routing.model_copy(update={"policy": effective})
        router = RouterPlan(
            name=child_name(name, "router"),
            # The router counts prompt tokens (cascade's maxEdgePromptTokens) and drafts (speculative)
            # with the model's tokenizer; render maps the source to a path in the router's pod.
            config=RouterConfig(routing=routing, backends=backends, tokenizer=spec.model.source),
            namespace=namespace,
        )
    return Plan(
        deployment=name,
        namespace=namespace,
        generation=meta.generation,
        policy=policy,
        effective_policy=effective,
        compression_jobs=jobs,
        servers=servers,
        router=router,
        variants=variants,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------
# Assessment: plan + observed readiness -> phase and conditions
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionState:
    """A condition without its timestamps."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Assessment:
    """Phase and conditions derived from the plan and what is running."""

    phase: Phase
    conditions: list[ConditionState]
    cloud: tuple[int, int]
    edge: tuple[int, int]
    router_ready: bool
    message: str


def _reason(text: str, fallback: str) -> str:
    """A condition reason (CamelCase word) from a Job's reason, which the Job controller may phrase freely."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "", text.title() if " " in text else text)
    return cleaned if cleaned[:1].isalpha() else fallback


def _ready(server: ServerPlan, ready: Mapping[str, int]) -> bool:
    return ready.get(server.name, 0) >= max(server.replicas, 1 if server.replicas else 0)


def assess(p: Plan, ready: Mapping[str, int], *, invalid: str | None = None) -> Assessment:
    """Phase and conditions from the plan and `ready` (ready replicas by Deployment name, router included)."""
    if invalid is not None:
        unknown = [ConditionState(t, "False" if t == "Ready" else "Unknown", "InvalidSpec", invalid)
                   for t in CONDITION_TYPES]
        return Assessment("Failed", unknown, (0, 0), (0, 0), False, invalid)

    conditions: list[ConditionState] = []
    # Compressed
    failed = p.failed_jobs
    pending = p.pending_jobs
    rejected = [v for v in p.variants if v.state == "Rejected"]
    if failed:
        first = failed[0].result
        assert first is not None
        conditions.append(ConditionState(
            "Compressed", "False", _reason(first.failure_reason, "JobFailed"),
            "; ".join(f"{j.variant}: {'; '.join(j.result.reasons) if j.result else ''}" for j in failed)))
    elif pending:
        conditions.append(ConditionState("Compressed", "False", "Compressing",
                                         f"waiting for {', '.join(j.name for j in pending)}"))
    elif not p.compression_jobs:
        conditions.append(ConditionState("Compressed", "True", "NoVariants", "no edge variants to compress"))
    elif rejected:
        conditions.append(ConditionState("Compressed", "True", "GateRejected", "; ".join(
            f"{v.name}: {'; '.join(v.job.result.reasons) if v.job and v.job.result else 'rejected'}"
            for v in rejected)))
    else:
        conditions.append(ConditionState("Compressed", "True", "Accepted",
                                         f"{len(p.compression_jobs)} variant(s) passed their gates"))

    # CloudReady
    cloud = p.cloud
    cloud_counts = (0, 0)
    if cloud is None:
        conditions.append(ConditionState("CloudReady", "True", "NotRequested", f"policy {p.policy}"))
        cloud_ok = True
    else:
        cloud_counts = (ready.get(cloud.name, 0), cloud.replicas)
        cloud_ok = _ready(cloud, ready)
        conditions.append(ConditionState(
            "CloudReady", "True" if cloud_ok else "False", "Ready" if cloud_ok else "Progressing",
            f"{cloud_counts[0]}/{cloud_counts[1]} cloud pods ready"))

    # EdgeReady
    edge_servers = p.edge
    edge_ready_n = sum(min(ready.get(s.name, 0), s.replicas) for s in edge_servers)
    edge_desired = sum(s.replicas for s in edge_servers)
    edge_running_ok = all(_ready(s, ready) for s in edge_servers)
    unplaced = [v for v in p.variants if v.state == "Accepted" and v.placement is not None
                and not v.placement.complete]
    degraded = bool(rejected or unplaced)
    if p.policy == "cloud-only" or not p.variants:
        conditions.append(ConditionState("EdgeReady", "True", "NotRequested",
                                         "no edge variants" if not p.variants else "policy cloud-only"))
    elif failed:
        conditions.append(ConditionState("EdgeReady", "False", "CompressionFailed",
                                         ", ".join(j.variant for j in failed)))
    elif pending:
        conditions.append(ConditionState("EdgeReady", "False", "Compressing", "edge servers start after their gate"))
    elif unplaced:
        conditions.append(ConditionState("EdgeReady", "False", "NoFittingNode",
                                         "; ".join(v.placement.reason for v in unplaced if v.placement)))
    elif not edge_servers:
        conditions.append(ConditionState("EdgeReady", "False", "GateRejected",
                                         "every variant was rejected; requests go to the cloud"))
    elif not edge_running_ok:
        conditions.append(ConditionState("EdgeReady", "False", "Progressing",
                                         f"{edge_ready_n}/{edge_desired} edge pods ready"))
    elif rejected:
        conditions.append(ConditionState("EdgeReady", "False", "GateRejected",
                                         ", ".join(v.name for v in rejected) + " rejected"))
    else:
        conditions.append(ConditionState("EdgeReady", "True", "Ready",
                                         f"{edge_ready_n}/{edge_desired} edge pods ready"))

    # RouterReady
    router_ok = p.router is not None and ready.get(p.router.name, 0) >= p.router.replicas
    if p.router is None:
        conditions.append(ConditionState("RouterReady", "False", "NoBackends", "nothing to route to yet"))
    else:
        conditions.append(ConditionState("RouterReady", "True" if router_ok else "False",
                                         "Ready" if router_ok else "Progressing",
                                         f"backends: {', '.join(b.name for b in p.router.config.backends)}"))

    # Desired is what the user asked for, whatever became of it: 0/1 says "not serving yet" plainly.
    edge_counts = (edge_ready_n, sum(v.wanted_replicas for v in p.variants))
    all_running = cloud_ok and edge_running_ok and router_ok
    phase: Phase
    if failed or (p.policy == "edge-only" and not pending and not edge_servers):
        phase = "Failed"
    elif pending:
        phase = "Compressing"
    elif not all_running:
        phase = "Deploying"
    elif degraded:
        phase = "Degraded"
    else:
        phase = "Ready"
    serving = phase in ("Ready", "Degraded")
    message = {
        "Ready": f"serving with policy {p.effective_policy}",
        "Degraded": f"serving with policy {p.effective_policy}: " + "; ".join(p.notes),
        "Compressing": f"compressing {len(pending)} variant(s)",
        "Deploying": "waiting for server pods",
        "Failed": next((c.message for c in conditions if c.type == "Compressed" and c.status == "False"),
                       "no edge variant can serve the edge-only policy"),
        "Pending": "",
    }[phase]
    conditions.append(ConditionState(
        "Ready", "True" if serving else "False",
        {"Ready": "Ready", "Degraded": "Degraded"}.get(phase, phase), message))
    return Assessment(phase, conditions, cloud_counts, edge_counts, router_ok, message)


def build_status(
    p: Plan,
    ready: Mapping[str, int],
    *,
    previous: LLMDeploymentStatus | None,
    now: str,
    invalid: str | None = None,
) -> LLMDeploymentStatus:
    """The full `.status`; a condition keeps its lastTransitionTime while its status stays the same."""
    a = assess(p, ready, invalid=invalid)
    before = {c.type: c for c in (previous.conditions if previous else [])}
    conditions = []
    for c in a.conditions:
        old = before.get(c.type)
        since = old.last_transition_time if old is not None and old.status == c.status else now
        conditions.append(Condition(type=c.type, status=c.status, reason=c.reason, message=c.message[:32768],
                                    last_transition_time=since, observed_generation=p.generation))
    variants = []
    for v in p.variants:
        result = v.job.result if v.job else None
        server = next((s for s in p.edge if s.variant == v.name), None)
        variants.append(VariantStatus(
            name=v.name,
            state=v.state,
            recipe=v.recipe,
            job=v.job.name if v.job else "",
            size_bytes=result.size_bytes if result else None,
            perplexity=result.perplexity if result else None,
            perplexity_increase=result.perplexity_increase if result else None,
            tokens_per_second=result.tokens_per_second if result else None,
            agreement=result.agreement if result else None,
            reasons=list(result.reasons) if result else [],
            placed=server is not None,
            nodes=list(v.placement.nodes) if v.placement else [],
            placement=v.placement.reason if v.placement else "",
            ready_replicas=ready.get(server.name, 0) if server else 0,
            replicas=server.replicas if server else 0,
        ))
    return LLMDeploymentStatus(
        phase=a.phase,
        observed_generation=p.generation,
        effective_policy=p.effective_policy,
        conditions=conditions,
        variants=variants,
        cloud=TierStatus(ready_replicas=a.cloud[0], desired_replicas=a.cloud[1], summary=f"{a.cloud[0]}/{a.cloud[1]}"),
        edge=TierStatus(ready_replicas=a.edge[0], desired_replicas=a.edge[1], summary=f"{a.edge[0]}/{a.edge[1]}"),
        router=RouterStatus(
            endpoint=p.router.address if p.router else "",
            http_endpoint=p.router.http_address if p.router else "",
            ready=a.router_ready,
            backends=[b.name for b in p.router.config.backends] if p.router else [],
        ),
        message=a.message[:4096],
    )


def with_edge_defaults(deployment: LLMDeployment, *, node_selector: Mapping[str, str],
                       tolerations: Sequence[Mapping[str, Any]]) -> LLMDeployment:
    """The cluster's edge defaults (operator config) for variants that set no nodeSelector or tolerations."""
    if not node_selector and not tolerations:
        return deployment
    variants = []
    for v in deployment.spec.edge.variants:
        update: dict[str, Any] = {}
        if not v.node_selector and node_selector:
            update["node_selector"] = dict(node_selector)
        if not v.tolerations and tolerations:
            update["tolerations"] = [Toleration.model_validate(t) for t in tolerations]
        variants.append(v.model_copy(update=update) if update else v)
    edge = deployment.spec.edge.model_copy(update={"variants": variants})
    spec = deployment.spec.model_copy(update={"edge": edge})
    return deployment.model_copy(update={"spec": spec})


def status_without_times(status: LLMDeploymentStatus) -> dict[str, Any]:
    """The status as JSON with transition times dropped, to tell whether anything really changed."""
    data = status.model_dump(mode="json", by_alias=True)
    for c in data.get("conditions", []):
        c.pop("lastTransitionTime", None)
    return data


def render(p: Plan, deployment: LLMDeployment, options: RenderOptions | None = None) -> list[dict[str, Any]]:
    """The Kubernetes objects for `p`; see stratus_operator.render for the details and options."""
    from stratus_operator.render import RenderOptions, render_plan

    # Imported here: render builds on this module's types.
    return render_plan(p, deployment, options if options is not None else RenderOptions())
