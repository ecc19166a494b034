"""The finalizer: clean artifacts from storage the deployment does not own; children go by owner reference."""

from __future__ import annotations

import logging
from typing import Any

import kopf
from pydantic import ValidationError

from stratus_operator.kube import JOBS, Conflict, KubeError, NotFound
from stratus_operator.render import render_cleanup
from stratus_operator.runtime import Runtime
from stratus_operator.spec import LLMDeployment

# Attempts at starting the cleanup Job before the finalizer lets go anyway (leaving the artifacts behind, said
# in an Event and the log): a deletion must not hang on storage the operator cannot reach.
CLEANUP_ATTEMPTS = 5
CLEANUP_RETRY_SECONDS = 10.0


def _namespace_gone(exc: KubeError) -> bool:
    """A 404 (the namespace is gone) or the 403 a terminating namespace answers every create with."""
    return isinstance(exc, NotFound) or (exc.status == 403 and "being terminated" in exc.message)


async def delete(rt: Runtime, body: Any, logger: logging.Logger | kopf.Logger, retry: int = 0) -> None:
    meta = body.get("metadata") or {}
    ns, name = meta.get("namespace") or "default", meta.get("name") or ""
    rt.set_phase((ns, name), None)
    rt.tls_checked.pop((ns, name), None)
    rt.applied.pop((ns, name), None)
    try:
        dep = LLMDeployment.from_body(body)
    except ValidationError:
        logger.info("invalid spec: no artifacts were ever written, nothing to clean")
        return
    cleanup = render_cleanup(dep, rt.options)
    for job in cleanup:
        try:
            await rt.kube.create(JOBS, ns, job)
        except Conflict:
            pass  # a cleanup Job from an earlier attempt is still there
        except KubeError as exc:
            where = f"artifacts of {ns}/{name} not cleaned ({exc.status} {exc.reason}: {exc.message})"
            if _namespace_gone(exc):
                # Nothing can be created in the namespace any more; holding the finalizer would hold the
                # namespace's deletion forever.
                _left_behind(body, logger, f"{where}: the namespace is being deleted")
                return
            if retry + 1 >= CLEANUP_ATTEMPTS:
                _left_behind(body, logger, f"{where}: gave up after {CLEANUP_ATTEMPTS} attempts")
                return
            raise kopf.TemporaryError(f"{where}; retrying", delay=CLEANUP_RETRY_SECONDS) from exc
    message = (f"artifact cleanup Job {cleanup[0]['metadata']['name']} started" if cleanup
               else "artifacts live on the deployment's own PVC, removed with it")
    kopf.info(body, reason="Finalizing", message=message)
    logger.info(message)


def _left_behind(body: Any, logger: logging.Logger | kopf.Logger, message: str) -> None:
    logger.warning(message)
    kopf.warn(body, reason="CleanupSkipped", message=message[:1024])
