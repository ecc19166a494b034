"""Pure readers of observed Kubernetes objects: a Job's compression result, a Deployment's readiness."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from stratus_operator.names import COMPRESS_CONTAINER
from stratus_operator.planner.jobs import CompressionResult, ResultParseError

# The pods and Jobs watches are separate streams: a Job may be seen finished before its pod's
# termination message. For this long after the Job finished, a missing message means "not yet".
MESSAGE_GRACE_SECONDS = 30.0


def termination_message(pod: Mapping[str, Any], container: str = COMPRESS_CONTAINER) -> str | None:
    """The termination message of `container` in a pod (init or regular), if it has terminated."""
    status = pod.get("status") or {}
    for statuses in (status.get("containerStatuses") or [], status.get("initContainerStatuses") or []):
        for cs in statuses:
            if cs.get("name") != container:
                continue
            terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if terminated:
                return str(terminated.get("message") or "")
    return None


def job_finished(job: Mapping[str, Any]) -> tuple[bool, bool, str, str]:
    """(complete, failed, reason, message) of a Job from its status conditions and counters."""
    status = job.get("status") or {}
    conditions = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    for c in conditions:
        if c.get("type") == "Failed":
            return False, True, str(c.get("reason") or "JobFailed"), str(c.get("message") or "")
    for c in conditions:
        if c.get("type") == "Complete":
            return True, False, str(c.get("reason") or "Complete"), str(c.get("message") or "")
    if (status.get("succeeded") or 0) > 0:
        return True, False, "Complete", ""
    backoff = (job.get("spec") or {}).get("backoffLimit", 6)
    if (status.get("failed") or 0) > backoff:
        return False, True, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return False, False, "", ""


def _finished_at(job: Mapping[str, Any]) -> datetime.datetime | None:
    status = job.get("status") or {}
    stamps = [status.get("completionTime")] + [c.get("lastTransitionTime") for c in status.get("conditions") or []
                                               if c.get("type") in ("Complete", "Failed")]
    for stamp in stamps:
        if stamp:
            try:
                return datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
            except ValueError:
                continue
    return None


def job_result(
    job: Mapping[str, Any], message: str | None, *, variant: str, spec_hash: str,
    now: datetime.datetime | None = None,
) -> CompressionResult | None:
    """The compression outcome of a finished Job, or None while it runs.

    A failed Job whose summary says `rejected` is a gate verdict; any other failure carries the Job's own
    reason (BackoffLimitExceeded, DeadlineExceeded, ...) and the tail of the termination message.
    """
    complete, failed, reason, job_message = job_finished(job)
    if not complete and not failed:
        return None
    if not message and now is not None:
        finished = _finished_at(job)
        if finished is not None and (now - finished).total_seconds() < MESSAGE_GRACE_SECONDS:
            return None  # the pod's termination message is probably still on its way
    parsed: CompressionResult | None = None
    parse_error = ""
    if message:
        try:
            parsed = CompressionResult.from_output(message, name=variant, spec_hash=spec_hash)
        except ResultParseError as exc:
            parse_error = str(exc)
    if complete:
        if parsed is not None and parsed.status != "failed":
            return parsed
        return CompressionResult.failed(
            variant, "NoSummary",
            parse_error or "the Job completed without a JSON summary in its termination message",
            spec_hash=spec_hash)
    if parsed is not None and parsed.status == "rejected":
        return parsed
    detail = "; ".join(x for x in (job_message, (message or "").strip()[-500:]) if x)
    return CompressionResult.failed(variant, reason, detail, spec_hash=spec_hash)


def ready_replicas(deployment: Mapping[str, Any]) -> int:
    """Ready pods of a Deployment's latest template: counted once the controller has seen its latest spec, and
    without the pods of older templates still running (a stuck roll-out is not Ready on its old pods)."""
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return 0
    ready = int(status.get("readyReplicas") or 0)
    if "updatedReplicas" not in status:
        return ready  # a controller that does not report it (as an older test double)
    # Pods not of the latest template may all be the ready ones: count only what must be new.
    old = max(0, int(status.get("replicas") or 0) - int(status.get("updatedReplicas") or 0))
    return max(0, ready - old)
