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
from stratus_operator.indexes import NODES_INDEX, PODS_INDEX, ChildInfo, Observed, child_index
from stratus_operator.kube import CONFIGMAPS, DEPLOYMENTS, HPAS, JOBS, NETWORK_POLICIES, PDBS, PVCS, SERVICES
from stratus_operator.names import OURS
from stratus_operator.placement import NodeView
from stratus_operator.runtime import runtime_of
from stratus_operator.spec import GROUP, PLURAL, VERSION

# Read once, at import: the resync interval is part of a registration; startup keeps it in memo.
CONFIG = Config.from_env()
LLMD = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
async def startup(**kwargs: Any) -> None:
    await handle_startup_operator.startup(config=CONFIG, **kwargs)


@kopf.on.cleanup()
async def cleanup(**kwargs: Any) -> None:
    await handle_startup_operator.cleanup(**kwargs)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return handle_login_operator.login(**kwargs)


@kopf.on.probe(id="deployments")
async def probe(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    return await handle_probe_operator.probe(memo)


# --- indexes: what reconciles read instead of listing the API (named in stratus_operator.indexes) --------
# Async on purpose: kopf runs sync handlers in a thread pool, a needless hop for thousands of events.
Children = dict[tuple[str, str], ChildInfo]


@kopf.index("v1", "nodes", id=NODES_INDEX)
async def index_nodes(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> dict[str, NodeView]:
    return handle_index_cluster.index_node(body, name, runtime_of(memo).config.gpu_resource_name)


@kopf.index("v1", "pods", id=PODS_INDEX)
async def index_pods(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> dict[tuple[str, ...], Any]:
    return handle_index_cluster.index_pod(body, namespace, runtime_of(memo).config.gpu_resource_name)


@kopf.index("batch", "v1", "jobs", labels=OURS, id=child_index(JOBS))
async def index_jobs(body: kopf.Body, namespace: str | None, **_: Any) -> Children:
    return handle_index_children.index_child(body, namespace, JOBS)


@kopf.index("apps", "v1", "deployments", labels=OURS, id=child_index(DEPLOYMENTS))
async def index_deployments(body: kopf.Body, namespace: str | None, **_: Any) -> Children:
    return handle_index_children.index_child(body, namespace, DEPLOYMENTS)


@kopf.index("v1", "services", labels=OURS, id=child_index(SERVICES))
async def index_services(body: kopf.Body, namespace: str | None, **_: Any) -> Children:
    return handle_index_children.index_child(body, namespace, SERVICES)


@kopf.index("v1", "configmaps", labels=OURS, id=child_index(CONFIGMAPS))
async def index_configmaps(body: kopf.Body, namespace: str | None, **_: Any) -> Children:
    return handle_index_children.index_child(body, namespace, CONFIGMAPS)


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=OURS, id=child_index(HPAS))
async def index_hpas(body: kopf.Body, namespace: str | None, **_: Any) -> Children:
    return handle_index_children.index_child(body, namespace, HPAS)


@kopf.index("v1", "persistentvolumeclaims", labels=OURS, id=child_index(PVCS))
async def index_pvcs(body: kopf.Body, namespace: str | None, **_: Any) -> Children:
    return handle_index_children.index_child(body, namespace, PVCS)


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=OURS, id=child_index(PDBS))
async def index_pdbs(body: kopf.Body, namespace: str | None, **_: Any) -> Children:
    return handle_index_children.index_child(body, namespace, PDBS)


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels=OURS, id=child_index(NETWORK_POLICIES))
async def index_network_policies(body: kopf.Body, namespace: str | None, **_: Any) -> Children:
    return handle_index_children.index_child(body, namespace, NETWORK_POLICIES)


# --- LLMDeployment ------------------------------------------------------------------------------------


@kopf.on.resume(*LLMD, id="reconcile")
@kopf.on.create(*LLMD, id="reconcile")
@kopf.on.update(*LLMD, id="reconcile")
async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    await handle_reconcile_llmdeployment.reconcile_body(runtime_of(memo), body, Observed.from_kwargs(kwargs), logger)


@kopf.timer(*LLMD, interval=CONFIG.resync_seconds, initial_delay=CONFIG.resync_seconds, idle=None)
async def resync(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    await handle_reconcile_llmdeployment.reconcile_body(runtime_of(memo), body, Observed.from_kwargs(kwargs), logger)


@kopf.on.delete(*LLMD)
async def delete(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, retry: int, **_: Any) -> None:
    await handle_delete_llmdeployment.delete(runtime_of(memo), body, logger, retry)


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
