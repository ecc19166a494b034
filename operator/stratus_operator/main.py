"""Every kopf registration of the operator, and nothing else: bodies live in stratus_operator.handlers."""

from __future__ import annotations

from typing import Any

import kopf

from stratus_operator.config import Config
from stratus_operator.handlers import (
    handle_delete_llmdeployment,
    handle_event_child,
    handle_index_children,
    handle_index_cluster,
    handle_login_operator,
    handle_probe_operator,
    handle_reconcile_llmdeployment,
    handle_startup_operator,
)
from stratus_operator.placement import NodeView
from stratus_operator.render import MANAGED_BY, MANAGED_BY_LABEL
from stratus_operator.runtime import ChildInfo, Observed, runtime_of
from stratus_operator.spec import GROUP, PLURAL, VERSION

# Read at import: the resync interval is part of a registration.
_CONFIG = Config.from_env()
OURS = {MANAGED_BY_LABEL: MANAGED_BY}
LLMD = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
async def startup(**kwargs: Any) -> None:
    await handle_startup_operator.startup(**kwargs)


@kopf.on.cleanup()
async def cleanup(**kwargs: Any) -> None:
    await handle_startup_operator.cleanup(**kwargs)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return handle_login_operator.login(**kwargs)


@kopf.on.probe(id="deployments")
def probe(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    return handle_probe_operator.probe(memo)


# --- indexes: what reconciles read instead of listing the API ------------------------------------------
# Async on purpose: kopf runs sync handlers in a thread pool, a needless hop for thousands of events.


@kopf.index("v1", "nodes")
async def stratus_nodes(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> dict[str, NodeView]:
    return handle_index_cluster.index_node(body, name, runtime_of(memo).config.gpu_resource_name)


@kopf.index("v1", "pods")
async def stratus_pods(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> dict[tuple[str, ...], Any]:
    return handle_index_cluster.index_pod(body, namespace, runtime_of(memo).config.gpu_resource_name)


@kopf.index("batch", "v1", "jobs", labels=OURS)
async def stratus_jobs(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], ChildInfo]:
    return handle_index_children.index_child(body, namespace, api_version="batch/v1", kind="Job")


@kopf.index("apps", "v1", "deployments", labels=OURS)
async def stratus_deployments(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], ChildInfo]:
    return handle_index_children.index_child(body, namespace, api_version="apps/v1", kind="Deployment")


@kopf.index("v1", "services", labels=OURS)
async def stratus_services(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], ChildInfo]:
    return handle_index_children.index_child(body, namespace, api_version="v1", kind="Service")


@kopf.index("v1", "configmaps", labels=OURS)
async def stratus_configmaps(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], ChildInfo]:
    return handle_index_children.index_child(body, namespace, api_version="v1", kind="ConfigMap")


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=OURS)
async def stratus_hpas(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], ChildInfo]:
    return handle_index_children.index_child(body, namespace, api_version="autoscaling/v2",
                                             kind="HorizontalPodAutoscaler")


@kopf.index("v1", "persistentvolumeclaims", labels=OURS)
async def stratus_pvcs(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], ChildInfo]:
    return handle_index_children.index_child(body, namespace, api_version="v1", kind="PersistentVolumeClaim")


# --- LLMDeployment ------------------------------------------------------------------------------------


@kopf.on.resume(*LLMD, id="reconcile")
@kopf.on.create(*LLMD, id="reconcile")
@kopf.on.update(*LLMD, id="reconcile")
async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    await handle_reconcile_llmdeployment.reconcile_body(runtime_of(memo), body, Observed.from_kwargs(kwargs), logger)


@kopf.timer(*LLMD, interval=_CONFIG.resync_seconds, initial_delay=_CONFIG.resync_seconds, idle=None)
async def resync(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    await handle_reconcile_llmdeployment.reconcile_body(runtime_of(memo), body, Observed.from_kwargs(kwargs), logger)


@kopf.on.delete(*LLMD)
async def delete(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    await handle_delete_llmdeployment.delete(runtime_of(memo), body, logger)


# --- children: their status advances the owner's ------------------------------------------------------


@kopf.on.event("batch", "v1", "jobs", labels=OURS)
async def job_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    await handle_event_child.on_child_event(runtime_of(memo), kind="Job", event_type=type, body=body,
                                            observed=Observed.from_kwargs(kwargs), logger=logger)


@kopf.on.event("apps", "v1", "deployments", labels=OURS)
async def deployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                           **kwargs: Any) -> None:
    await handle_event_child.on_child_event(runtime_of(memo), kind="Deployment", event_type=type, body=body,
                                            observed=Observed.from_kwargs(kwargs), logger=logger)


@kopf.on.event("v1", "pods", labels=OURS)
async def pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    await handle_event_child.on_child_event(runtime_of(memo), kind="Pod", event_type=type, body=body,
                                            observed=Observed.from_kwargs(kwargs), logger=logger)
