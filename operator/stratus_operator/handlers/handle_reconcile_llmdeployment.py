"""Reconcile one LLMDeployment: plan, create/patch/prune children, write `.status`, post Events."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from stratus_operator.apply import apply_children
from stratus_operator.handlers.tls_secret import ensure_tls
from stratus_operator.indexes import ChildInfo, Observed
from stratus_operator.kube import JOBS, LLMDEPLOYMENTS, LLMDEPLOYMENTS_STATUS, PVCS, KubeError, NotFound
from stratus_operator.observe import job_result
from stratus_operator.planner import (
    CompressionResult,
    Plan,
    build_status,
    plan,
    plan_jobs,
    status_without_times,
)
from stratus_operator.render import (
    SecretRefs,
    artifacts_claim,
    claim_change,
    claim_problem,
    render_plan,
    router_endpoints,
)
from stratus_operator.runtime import DURATION, ERRORS, RECONCILES, Runtime
from stratus_operator.spec import LLMDeployment, LLMDeploymentStatus
from stratus_workers.compress.spec import CompressionSummary

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _previous_status(body: Mapping[str, Any]) -> LLMDeploymentStatus | None:
    raw = body.get("status") or {}
    if not raw:
        return None
    try:
        return LLMDeploymentStatus.model_validate({k: v for k, v in raw.items() if k != "kopf"})
    except ValidationError:
        return None  # written by an older operator: start afresh


def _result_from_status(previous: LLMDeploymentStatus | None, variant: str, job: str,
                        spec_hash: str) -> CompressionResult | None:
    """A result recorded in status for the same Job, so a deleted Job is not run again."""
    if previous is None:
        return None
    for v in previous.variants:
        if v.name == variant and v.job == job and v.state in ("Accepted", "Rejected", "Failed"):
            status = {"Accepted": "accepted", "Rejected": "rejected", "Failed": "failed"}[v.state]
            summary = CompressionSummary(
                name=variant, status=status,  # type: ignore[arg-type]
                reasons=list(v.reasons), size_bytes=v.size_bytes, perplexity=v.perplexity,
                perplexity_increase=v.perplexity_increase, tokens_per_second=v.tokens_per_second,
                agreement=v.agreement,
            )
            failure = v.reasons[0].split(":", 1)[0] if v.state == "Failed" and v.reasons else ""
            return CompressionResult(summary, spec_hash, failure)
    return None


def gather_results(dep: LLMDeployment, observed: Observed, children: Mapping[tuple[str, str], ChildInfo],
                   previous: LLMDeploymentStatus | None) -> tuple[dict[str, CompressionResult], list[str]]:
    """Compression results of the current recipes (from the Jobs and their pods, else from status), and the
    failed Jobs to run again: those that failed before the latest spec change (a new generation)."""
    generation = dep.metadata.generation
    results: dict[str, CompressionResult] = {}
    retry: list[str] = []
    for job in plan_jobs(dep):
        info = children.get(("Job", job.name))
        result: CompressionResult | None = None
        if info is not None and info.job is not None:
            message = observed.job_message(dep.metadata.namespace, job.name)
            result = job_result(info.job, message, variant=job.variant, spec_hash=job.spec_hash,
                                now=datetime.datetime.now(datetime.UTC))
            created_at = info.job.get("generation")
            if result is not None and result.status == "failed" and isinstance(created_at, int) \
                    and created_at < generation:
                retry.append(job.name)
                result = None
        if result is None and info is None:
            result = _result_from_status(previous, job.variant, job.name, job.spec_hash)
            if result is not None and result.status == "failed" and previous is not None \
                    and previous.observed_generation < generation:
                result = None  # the failed Job is gone and the spec changed since: run it again
        if result is not None:
            results[job.variant] = result
    return results, retry


async def _apply(rt: Runtime, dep: LLMDeployment, p: Plan, children: Mapping[tuple[str, str], ChildInfo],
                 logger: logging.Logger | kopf.Logger, secrets: SecretRefs) -> None:
    """Render the plan and apply it; a finished compression Job (and its spec) is kept, never run again."""
    finished = {(kind, j.name) for j in p.compression_jobs if j.done for kind in ("Job", "ConfigMap")}
    key = (dep.metadata.namespace, dep.metadata.name)
    applied = await apply_children(rt.kube, dep.metadata.namespace, render_plan(p, dep, rt.options, secrets),
                                   children, keep=finished, state=rt.applied.setdefault(key, {}))
    if applied:
        logger.info(f"applied: {applied}")


def _post_events(body: Mapping[str, Any], before: LLMDeploymentStatus | None, after: LLMDeploymentStatus) -> None:
    """One Kubernetes Event per transition: phase, and each condition that changed status or reason."""
    ref: Any = {"apiVersion": body.get("apiVersion", "stratus.dev/v1alpha1"), "kind": body.get("kind", "LLMDeployment"),
           "metadata": body.get("metadata", {})}
    old = {c.type: c for c in (before.conditions if before else [])}
    # The first status is one Event (the phase); after that, each condition change is one.
    for c in after.conditions if before is not None else []:
        prev = old.get(c.type)
        if prev is not None and prev.status == c.status and prev.reason == c.reason:
            continue
        kind = kopf.info if c.status == "True" or c.reason in ("Compressing", "Progressing") else kopf.warn
        kind(ref, reason=c.reason, message=f"{c.type}={c.status}: {c.message}"[:1024])
    if before is None or before.phase != after.phase:
        emit = kopf.warn if after.phase in ("Failed", "Degraded") else kopf.info
        emit(ref, reason=after.phase, message=f"phase {before.phase if before else '-'} -> {after.phase}: "
                                              f"{after.message}"[:1024])


async def reconcile(rt: Runtime, body: Mapping[str, Any], observed: Observed,
                    logger: logging.Logger | kopf.Logger) -> LLMDeploymentStatus | None:
    """One full pass for one LLMDeployment; returns the status written (None when deleting)."""
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    name, ns = meta["name"], meta.get("namespace") or "default"
    started = time.perf_counter()
    previous = _previous_status(body)
    try:
        raw_generation = meta.get("generation")
        generation = raw_generation if isinstance(raw_generation, int) else 0
        try:
            dep = LLMDeployment.from_body(body)
        except ValidationError as exc:
            # kubectl would have refused this with the CRD installed; say why instead of retrying forever.
            return await _invalid(rt, ns, name, generation, previous, body, invalid_message(exc))
        dep = dep.with_edge_defaults(node_selector=rt.config.edge_node_selector,
                                     tolerations=rt.config.edge_tolerations)
        dep = dep.with_cloud_defaults(node_selector=rt.config.cloud_node_selector,
                                      tolerations=rt.config.cloud_tolerations)
        children = observed.children(ns, name)
        results, retry = gather_results(dep, observed, children, previous)
        if retry:
            children = await _retry_jobs(rt, dep, retry, children, logger)
        # Where edge servers run now (the last status): placement keeps them there while they fit.
        current = {v.name: v.nodes for v in (previous.variants if previous else []) if v.placed}
        p = plan(dep, observed.cluster(ns, name), results, gpu_resource=rt.config.gpu_resource_name,
                 current=current)
        secrets, problem = await ensure_tls(rt, dep, body, logger)
        if problem is not None:
            return await _invalid(rt, ns, name, generation, previous, body, problem)
        await _apply(rt, dep, p, children, logger, secrets)
        ready = {info.name: info.ready for info in children.values() if info.kind == "Deployment"}
        storage_problem = await _storage_problem(rt, dep, p, children)
        own = children.get(("PersistentVolumeClaim", artifacts_claim(dep) or ""))
        storage_change = claim_change(dep, own.claim) if own is not None and own.claim else None
        status = build_status(p, ready, previous=previous, now=_now(), endpoints=router_endpoints(p, ns),
                              storage_problem=storage_problem, storage_change=storage_change)
        await _write_status(rt, ns, name, previous, status, body)
        rt.set_phase((ns, name), status.phase)
        RECONCILES.labels("ok").inc()
        return status
    except KubeError as exc:
        RECONCILES.labels("error").inc()
        ERRORS.labels(type(exc).__name__).inc()
        raise kopf.TemporaryError(f"API call failed: {exc}", delay=2) from exc
    except Exception as exc:
        RECONCILES.labels("error").inc()
        ERRORS.labels(type(exc).__name__).inc()
        raise
    finally:
        DURATION.observe(time.perf_counter() - started)


async def _retry_jobs(rt: Runtime, dep: LLMDeployment, names: list[str],
                      children: Mapping[tuple[str, str], ChildInfo],
                      logger: logging.Logger | kopf.Logger) -> dict[tuple[str, str], ChildInfo]:
    """Delete Jobs that failed before the latest spec change; apply_children creates them afresh."""
    for name in names:
        await rt.kube.delete(JOBS, dep.metadata.namespace, name)
        logger.info(f"compression Job {name} failed at an earlier generation: running it again")
    return {k: v for k, v in children.items() if not (k[0] == "Job" and k[1] in names)}


async def _storage_problem(rt: Runtime, dep: LLMDeployment, p: Plan,
                           children: Mapping[tuple[str, str], ChildInfo]) -> str | None:
    """Why the pending compression Jobs cannot start for their artifacts claim (not bound), or None."""
    claim = artifacts_claim(dep)
    if claim is None or not p.pending_jobs:
        return None
    own = children.get(("PersistentVolumeClaim", claim))
    if own is not None:
        # No phase at all: nothing manages claims here (an API server always writes Pending at creation).
        return claim_problem(dep, own.phase) if own.phase else None
    if dep.spec.storage.pvc is None or not dep.spec.storage.pvc.claim_name:
        return None  # ours, not in the index yet: created by this pass
    try:
        live = await rt.kube.get(PVCS, dep.metadata.namespace, claim)
    except NotFound:
        return claim_problem(dep, None)
    phase = str((live.get("status") or {}).get("phase") or "")
    return claim_problem(dep, phase) if phase else None


def invalid_message(exc: ValidationError) -> str:
    """Each error as `<field path>: <message>` (the path starts at spec), so the status names the field."""
    parts = []
    for e in exc.errors():
        path = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        parts.append(f"{path or 'spec'}: {e['msg']}")
    return "; ".join(parts)[:2000]


async def _invalid(rt: Runtime, ns: str, name: str, generation: int, previous: LLMDeploymentStatus | None,
                   body: Mapping[str, Any], message: str) -> LLMDeploymentStatus:
    status = build_status(Plan.empty(name, generation), {}, previous=previous, now=_now(), invalid=message)
    await _write_status(rt, ns, name, previous, status, body)
    rt.set_phase((ns, name), status.phase)
    RECONCILES.labels("invalid").inc()
    return status


async def _write_status(rt: Runtime, ns: str, name: str, previous: LLMDeploymentStatus | None,
                        status: LLMDeploymentStatus, body: Mapping[str, Any]) -> None:
    if previous is not None and status_without_times(previous) == status_without_times(status):
        return
    try:
        await rt.kube.patch(LLMDEPLOYMENTS_STATUS, ns, name, {"status": status.model_dump(mode="json", by_alias=True)})
    except NotFound:
        return  # deleted meanwhile
    _post_events(body, previous, status)


async def reconcile_by_name(rt: Runtime, namespace: str, name: str, observed: Observed,
                            logger: logging.Logger | kopf.Logger) -> None:
    """Reconcile after a child changed: fetch the owner fresh, then run the usual pass (coalesced)."""

    async def once() -> None:
        try:
            body = await rt.kube.get(LLMDEPLOYMENTS, namespace, name)
        except NotFound:
            return
        try:
            await reconcile(rt, body, observed, logger)
        except kopf.TemporaryError as exc:
            logger.warning(f"reconcile of {namespace}/{name} failed, the resync retries: {exc}")

    await rt.coalescer.run((namespace, name), once)


async def reconcile_body(rt: Runtime, body: Mapping[str, Any], observed: Observed,
                         logger: logging.Logger | kopf.Logger) -> None:
    """Reconcile from a kopf handler of the LLMDeployment itself (errors go back to kopf to retry)."""
    meta = body.get("metadata") or {}
    key = (meta.get("namespace") or "default", meta.get("name") or "")
    errors: list[BaseException] = []
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1
        current: Mapping[str, Any] = body
        if runs > 1:
            # A coalesced rerun must see the latest object, not the body kopf handed to the first pass.
            try:
                current = await rt.kube.get(LLMDEPLOYMENTS, key[0], key[1])
            except NotFound:
                return
        try:
            await reconcile(rt, current, observed, logger)
            errors.clear()
        except kopf.TemporaryError as exc:
            errors.append(exc)

    await rt.coalescer.run(key, once)
    if errors:
        raise errors[-1]
