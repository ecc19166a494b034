"""Operator start: kopf settings, the shared Runtime, and the Prometheus endpoint."""

from __future__ import annotations

import logging
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stratus_operator.config import Config
from stratus_operator.kube import Kube
from stratus_operator.runtime import Runtime

log = logging.getLogger(__name__)


def configure(settings: kopf.OperatorSettings, config: Config) -> None:
    """kopf settings: our own finalizer and annotation prefix, no status fields of kopf's own."""
    settings.persistence.finalizer = config.finalizer
    # The CRD's structural schema prunes unknown status fields, so kopf keeps its state in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="stratus.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="stratus.dev", key="last-handled-configuration")
    # Under load the watch may deliver kopf's own patch late; processing the stale body meanwhile would
    # run the create handler a second time (harmless, but double work at 1,000s of objects).
    settings.persistence.consistency_timeout = 30
    settings.posting.reporting_component = "stratus-operator"
    settings.posting.level = logging.INFO
    # Reconnect watches regularly: a silently dropped stream must not starve the operator.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    if config.worker_limit > 0:
        settings.batching.worker_limit = config.worker_limit
    settings.execution.max_workers = 4  # the sync index handlers are trivial
    if config.named_namespaces_only:
        # kopf lists the namespaces, then its namespace watch lists them again and ignores that second list: a
        # namespace created between the two (the operator starting while its namespace is made) was never
        # served, until a restart. Exact names need no discovery: kopf watches each one directly (an API server
        # serves a watch in a namespace that does not exist yet). New CRDs then go unnoticed until a restart;
        # the liveness probe fails while the LLMDeployment API is not served, so the pod restarts into it.
        settings.scanning.disabled = True


async def _serve_metrics(port: int) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def startup(*, config: Config, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """Configure kopf and keep the Runtime in memo; `config` is the one main.py read at import."""
    configure(settings, config)

    def credentials() -> kopf.ConnectionInfo:
        info = getattr(memo, "connection", None)
        if info is None:
            raise RuntimeError("no Kubernetes credentials yet (the login handler has not run)")
        return info  # type: ignore[no-any-return]

    memo.runtime = Runtime.from_config(config, Kube(credentials))
    if config.metrics_port:
        memo.metrics_runner = await _serve_metrics(config.metrics_port)
        log.info("metrics on :%d/metrics", config.metrics_port)


async def cleanup(*, memo: Any, **_: Any) -> None:
    runtime = getattr(memo, "runtime", None)
    if runtime is not None:
        await runtime.kube.close()
    runner = getattr(memo, "metrics_runner", None)
    if runner is not None:
        await runner.cleanup()
