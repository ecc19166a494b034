"""Reconcile one LLMDeployment: plan, create/patch/prune children, write `.status`, post Events."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from stratus_operator.kube import (
    CHILD_KINDS,
    JOBS,
    LLMDEPLOYMENTS,
    LLMDEPLOYMENTS_STATUS,
    SECRETS,
    Conflict,
    KubeError,
    NotFound,
)
from stratus_operator.observe import job_result
from stratus_operator.planner import (
    ClusterView,
    CompressionResult,
    Plan,
    build_status,
    plan,
    status_without_times,
    with_edge_defaults,
)
from stratus_operator.render import SPEC_HASH_ANNOTATION, SecretRefs, render_plan, tls_secret_name
from stratus_operator.runtime import DURATION, ERRORS, RECONCILES, ChildInfo, Observed, Runtime
from stratus_operator.spec import LLMDeployment, LLMDeploymentStatus
from stratus_operator.tls import check_secret, dialled_hosts, issue_secret, service_hosts

log = logging.getLogger(__name__)
CREATE_ONLY = {"Job", "PersistentVolumeClaim"}  # immutable specs: a new Job gets a new name instead
OURS_TTL_SECONDS = 3600.0  # how long a good operator-issued Secret is trusted without a GET
USERS_TTL_SECONDS = 300.0  # a user's Secret may be rotated under us: look again this often


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
            return CompressionResult(
                name=variant, status=status,  # type: ignore[arg-type]
                reasons=tuple(v.reasons), size_bytes=v.size_bytes, perplexity=v.perplexity,
                perplexity_increase=v.perplexity_increase, tokens_per_second=v.tokens_per_second,
                agreement=v.agreement, spec_hash=spec_hash,
                failure_reason=(v.reasons[0].split(":", 1)[0] if v.state == "Failed" and v.reasons else ""),
            )
    return None


def gather_results(dep: LLMDeployment, observed: Observed, children: Mapping[tuple[str, str], ChildInfo],
                   previous: LLMDeploymentStatus | None,
                   gpu_resource: str) -> tuple[dict[str, CompressionResult], list[str]]:
    """Compression results of the current recipes (from the Jobs and their pods, else from status), and the
    failed Jobs to run again: those that failed before the latest spec change (a new generation)."""
    skeleton = plan(dep, ClusterView.local(), {}, gpu_resource=gpu_resource)  # only its Jobs are read
    generation = dep.metadata.generation
    results: dict[str, CompressionResult] = {}
    retry: list[str] = []
    for job in skeleton.compression_jobs:
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


async def ensure_tls(rt: Runtime, dep: LLMDeployment, body: Mapping[str, Any],
                     logger: logging.Logger | kopf.Logger) -> tuple[SecretRefs, str | None]:
    """The mTLS Secret pods mount: the user's (checked) or the operator's (issued once, renewed when it no
    longer fits). Returns the refs for rendering and, when the Secret cannot serve, why (naming the field)."""
    name = tls_secret_name(dep)
    if name is None:
        return SecretRefs(), None
    ns = dep.metadata.namespace
    users = dep.spec.security.tls_secret_name is not None
    hosts = dialled_hosts(dep) if users else service_hosts(dep)
    key, ident = (ns, dep.metadata.name), (name, tuple(hosts))
    cached = rt.tls_checked.get(key)
    if cached is not None and cached[0] == ident and cached[1] > time.monotonic():
        return SecretRefs(name, cached[2]), None
    try:
        live: dict[str, Any] | None = await rt.kube.get(SECRETS, ns, name)
    except NotFound:
        live = None
    now = datetime.datetime.now(datetime.UTC)
    verdict = check_secret(live, hosts, now)
    if not verdict.ok and users:
        return SecretRefs(name), f"spec.security.tlsSecretName: Secret {ns}/{name} {verdict.problem}"
    if not verdict.ok:
        owners = [r.get("uid") for r in ((live or {}).get("metadata") or {}).get("ownerReferences") or []]
        if live is not None and dep.metadata.uid not in owners:
            return SecretRefs(name), (f"spec.security: Secret {ns}/{name} exists and is not this deployment's; "
                                      "name it in tlsSecretName or delete it")
        secret = issue_secret(dep, rt.options, live)
        try:
            if live is None:
                await rt.kube.create(SECRETS, ns, secret)
            else:
                await rt.kube.patch(SECRETS, ns, name, {"data": secret["data"]})
        except Conflict:
            return SecretRefs(name), None  # another pass created it meanwhile; the next one adopts it
        why = "issued" if live is None else f"renewed ({verdict.problem})"
        logger.info(f"mTLS certificate {why} in Secret {name}")
        ref: Any = body  # kopf types it as its Body; any mapping with metadata serves
        kopf.info(ref, reason="CertificateIssued", message=f"mTLS certificate {why} in Secret {name}")
        verdict = check_secret(secret, hosts, now)
    ttl = USERS_TTL_SECONDS if users else OURS_TTL_SECONDS
    rt.tls_checked[key] = (ident, time.monotonic() + ttl, verdict.content_hash)
    return SecretRefs(name, verdict.content_hash), None


async def apply_children(rt: Runtime, dep: LLMDeployment, p: Plan, children: Mapping[tuple[str, str], ChildInfo],
                         logger: logging.Logger | kopf.Logger,
                         secrets: SecretRefs | None = None) -> dict[str, list[str]]:
    """Create what is missing, patch what drifted (by spec hash), delete what the plan no longer has."""
    desired = render_plan(p, dep, rt.options, secrets)
    done_jobs = {j.name for j in p.compression_jobs if j.done}
    actions: dict[str, list[str]] = {"created": [], "patched": [], "deleted": []}
    wanted: set[tuple[str, str]] = set()
    ns = dep.metadata.namespace
    for obj in desired:
        kind, name = obj["kind"], obj["metadata"]["name"]
        wanted.add((kind, name))
        resource = CHILD_KINDS[(obj["apiVersion"], kind)]
        have = children.get((kind, name))
        new_hash = obj["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        if have is None:
            if kind in ("Job", "ConfigMap") and name in done_jobs:
                continue  # its result is known: never run a finished compression again
            try:
                await rt.kube.create(resource, ns, obj)
                actions["created"].append(f"{kind}/{name}")
                continue
            except Conflict:
                # The index lags behind our own creates: compare with the live object instead.
                live = await rt.kube.get(resource, ns, name)
                live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION, "")
                have = ChildInfo(obj["apiVersion"], kind, name, live_hash)
        if have.spec_hash != new_hash and kind not in CREATE_ONLY:
            try:
                await rt.kube.patch(resource, ns, name, obj)
                actions["patched"].append(f"{kind}/{name}")
            except NotFound:
                await rt.kube.create(resource, ns, obj)
                actions["created"].append(f"{kind}/{name}")
    for (kind, name), info in children.items():
        if (kind, name) in wanted:
            continue
        if kind in ("Job", "ConfigMap") and name in done_jobs:
            continue
        stale = CHILD_KINDS.get((info.api_version, kind))
        if stale is None:
            continue
        await rt.kube.delete(stale, ns, name)
        actions["deleted"].append(f"{kind}/{name}")
    if any(actions.values()):
        logger.info("applied: " + "; ".join(f"{k} {', '.join(v)}" for k, v in actions.items() if v))
    return actions


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
        generation = int(meta.get("generation") or 0) if isinstance(meta.get("generation"), int) else 0
        try:
            dep = LLMDeployment.from_parts(name=name, namespace=ns, uid=meta.get("uid", ""),
                                           generation=generation, spec=spec_of(body))
        except ValidationError as exc:
            # kubectl would have refused this with the CRD installed; say why instead of retrying forever.
            return await _invalid(rt, ns, name, generation, previous, body, invalid_message(exc))
        dep = with_edge_defaults(dep, node_selector=rt.config.edge_node_selector,
                                 tolerations=rt.config.edge_tolerations)
        children = observed.children(ns, name)
        results, retry = gather_results(dep, observed, children, previous, rt.config.gpu_resource_name)
        if retry:
            children = await _retry_jobs(rt, dep, retry, children, logger)
        p = plan(dep, observed.cluster(ns, name), results, gpu_resource=rt.config.gpu_resource_name)
        secrets, problem = await ensure_tls(rt, dep, body, logger)
        if problem is not None:
            return await _invalid(rt, ns, name, generation, previous, body, problem)
        await apply_children(rt, dep, p, children, logger, secrets)
        ready = {info.name: info.ready for info in children.values() if info.kind == "Deployment"}
        status = build_status(p, ready, previous=previous, now=_now())
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


def invalid_message(exc: ValidationError) -> str:
    """Each error as `<field path>: <message>` (the path starts at spec), so the status names the field."""
    parts = []
    for e in exc.errors():
        path = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        parts.append(f"{path or 'spec'}: {e['msg']}")
    return "; ".join(parts)[:2000]


def spec_of(body: Mapping[str, Any]) -> dict[str, Any]:
    spec = body.get("spec")
    # A spec that is not an object at all (possible only without the CRD) is validated as such.
    return dict(spec) if isinstance(spec, Mapping) else {"": spec} if spec is not None else {}


async def _invalid(rt: Runtime, ns: str, name: str, generation: int, previous: LLMDeploymentStatus | None,
                   body: Mapping[str, Any], message: str) -> LLMDeploymentStatus:
    empty = Plan(name, ns, generation, "", "", [], [], None, [])
    status = build_status(empty, {}, previous=previous, now=_now(), invalid=message)
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
