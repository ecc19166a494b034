"""Stage 3: phase, conditions and the `.status` of an LLMDeployment from its plan and what is running."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from stratus_operator.planner.topology import Plan, ServerPlan
from stratus_operator.spec import (
    CONDITION_TYPES,
    Condition,
    ConditionType,
    LLMDeploymentStatus,
    Phase,
    RouterStatus,
    TierStatus,
    VariantStatus,
)


@dataclass(frozen=True)
class Endpoints:
    """Where clients reach the router (gRPC and HTTP host:port); empty where nobody outside dials it."""

    grpc: str = ""
    http: str = ""


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


def assess(p: Plan, ready: Mapping[str, int], *, invalid: str | None = None,
           storage_problem: str | None = None, storage_change: str | None = None) -> Assessment:
    """Phase and conditions from the plan and `ready` (ready replicas by Deployment name, router included).

    `storage_problem` says why the compression Jobs cannot run yet (an artifacts claim that is not bound);
    `storage_change` what `spec.storage` asks of the existing claim that it will not do (told, never ignored).
    """
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
    elif pending and storage_problem:
        conditions.append(ConditionState("Compressed", "False", "ArtifactsClaimPending", storage_problem))
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
    if storage_change:
        # Whatever compression's state, a storage change the claim will not take is said where storage is.
        c = conditions[-1]
        conditions[-1] = ConditionState(c.type, c.status, "ArtifactsClaimUnchanged", f"{c.message}; {storage_change}")

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
                                         f"backends: {', '.join(p.router.backends)}"))

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
        "Compressing": storage_problem or f"compressing {len(pending)} variant(s)",
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
    endpoints: Endpoints = Endpoints(),
    storage_problem: str | None = None,
    storage_change: str | None = None,
) -> LLMDeploymentStatus:
    """The full `.status`; a condition keeps its lastTransitionTime while its status stays the same.

    `endpoints` are where clients reach the router: the executor's binding of its name (the plan has none).
    """
    a = assess(p, ready, invalid=invalid, storage_problem=storage_problem, storage_change=storage_change)
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
            runtime=v.runtime,
            job=v.job.name if v.job else "",
            size_bytes=result.summary.size_bytes if result else None,
            perplexity=result.summary.perplexity if result else None,
            perplexity_increase=result.summary.perplexity_increase if result else None,
            tokens_per_second=result.summary.tokens_per_second if result else None,
            agreement=result.summary.agreement if result else None,
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
        url=f"http://{endpoints.http}" if p.router and endpoints.http else "",
        conditions=conditions,
        variants=variants,
        cloud=TierStatus(ready_replicas=a.cloud[0], desired_replicas=a.cloud[1], summary=f"{a.cloud[0]}/{a.cloud[1]}",
                         topology=server_topology(p.cloud) if p.cloud else ""),
        edge=TierStatus(ready_replicas=a.edge[0], desired_replicas=a.edge[1], summary=f"{a.edge[0]}/{a.edge[1]}"),
        router=RouterStatus(
            endpoint=endpoints.grpc if p.router else "",
            http_endpoint=endpoints.http if p.router else "",
            ready=a.router_ready,
            backends=list(p.router.backends) if p.router else [],
        ),
        message=a.message[:4096],
    )


def server_topology(server: ServerPlan) -> str:
    """How one server spans its pod's GPUs, in words (the tier's `topology` in status)."""
    if server.pipeline_parallel > 1 and server.tensor_parallel > 1:
        ranks = server.pipeline_parallel * server.tensor_parallel
        return (f"pipeline parallel {server.pipeline_parallel} x tensor parallel {server.tensor_parallel}: one pod "
                f"per replica, {ranks} rank processes ({server.pipeline_parallel} stages of contiguous layer ranges, "
                f"each a tensor-parallel group of {server.tensor_parallel}), one GPU each")
    if server.pipeline_parallel > 1:
        return (f"pipeline parallel {server.pipeline_parallel}: one pod per replica, {server.pipeline_parallel} "
                f"stage processes (contiguous layer ranges), one GPU each")
    if server.tensor_parallel > 1:
        return (f"tensor parallel {server.tensor_parallel}: one pod per replica, {server.tensor_parallel} rank "
                f"processes, one GPU each")
    return "one process per replica"


def status_without_times(status: LLMDeploymentStatus) -> dict[str, Any]:
    """The status as JSON with transition times dropped, to tell whether anything really changed."""
    data = status.model_dump(mode="json", by_alias=True)
    for c in data.get("conditions", []):
        c.pop("lastTransitionTime", None)
    return data
