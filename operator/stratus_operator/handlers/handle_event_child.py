"""A child (Job, Deployment, Job pod) changed: reconcile its LLMDeployment when what it reports changed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from stratus_operator.handlers.handle_reconcile_llmdeployment import reconcile_by_name
from stratus_operator.indexes import Observed
from stratus_operator.names import INSTANCE_LABEL
from stratus_operator.observe import job_finished, ready_replicas, termination_message
from stratus_operator.runtime import Runtime


def signature(kind: str, body: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """What of a child matters to its owner's status; None when it reports nothing yet."""
    if kind == "Deployment":
        status = body.get("status") or {}
        ready = ready_replicas(body)
        if not ready and not status.get("replicas"):
            return None
        return (ready, status.get("replicas"), status.get("observedGeneration"))
    if kind == "Job":
        complete, failed, reason, _ = job_finished(body)
        return (complete, failed, reason) if complete or failed else None
    if kind == "Pod":
        message = termination_message(body)
        return (message,) if message is not None else None
    return None


async def on_child_event(rt: Runtime, *, kind: str, event_type: str | None, body: Mapping[str, Any],
                         observed: Observed, logger: logging.Logger | kopf.Logger) -> None:
    meta = body.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(INSTANCE_LABEL)
    namespace = meta.get("namespace") or "default"
    if not owner:
        return
    uid = meta.get("uid") or f"{kind}/{namespace}/{meta.get('name')}"
    if event_type == "DELETED":
        rt.signatures.pop(uid, None)
    else:
        sig = signature(kind, body)
        known = rt.signatures.get(uid)
        rt.signatures[uid] = sig
        # A new child that reports nothing yet is our own create echoing back: nothing to do.
        if sig == known or (sig is None and known is None):
            return
    await reconcile_by_name(rt, namespace, owner, observed, logger)
