"""The finalizer: clean artifacts from storage the deployment does not own; children go by owner reference."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import kopf
from pydantic import ValidationError

from stratus_operator.kube import JOBS, Conflict
from stratus_operator.render import render_cleanup
from stratus_operator.runtime import Runtime
from stratus_operator.spec import LLMDeployment


async def delete(rt: Runtime, body: Any, logger: logging.Logger | kopf.Logger) -> None:
    meta = body.get("metadata") or {}
    ns, name = meta.get("namespace") or "default", meta.get("name") or ""
    rt.set_phase((ns, name), None)
    rt.tls_checked.pop((ns, name), None)
    try:
        dep = LLMDeployment.from_body(body)
    except ValidationError:
        logger.info("invalid spec: no artifacts were ever written, nothing to clean")
        return
    cleanup = render_cleanup(dep, rt.options)
    for job in cleanup:
        # Conflict: a cleanup Job from an earlier attempt is still there.
        with contextlib.suppress(Conflict):
            await rt.kube.create(JOBS, ns, job)
    message = (f"artifact cleanup Job {cleanup[0]['metadata']['name']} started" if cleanup
               else "artifacts live on the deployment's own PVC, removed with it")
    kopf.info(body, reason="Finalizing", message=message)
    logger.info(message)
