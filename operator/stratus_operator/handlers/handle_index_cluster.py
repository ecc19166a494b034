"""Index bodies for nodes and pods: what placement needs and the compression Jobs' termination messages."""

from __future__ import annotations

from typing import Any

from stratus_operator.indexes import PodHold
from stratus_operator.names import INSTANCE_LABEL, JOB_NAME_LABELS, MANAGED_BY, MANAGED_BY_LABEL
from stratus_operator.observe import termination_message
from stratus_operator.placement import NodeView, node_view, pod_node_requests


def index_node(body: Any, name: str, gpu_resource: str) -> dict[str, NodeView]:
    return {name: node_view(body, gpu_resource=gpu_resource)}


def index_pod(body: Any, namespace: str | None, gpu_resource: str) -> dict[tuple[str, ...], Any]:
    labels = (body.get("metadata") or {}).get("labels") or {}
    out: dict[tuple[str, ...], Any] = {}
    held = pod_node_requests(body, gpu_resource)
    if held is not None:
        ours = labels.get(MANAGED_BY_LABEL) == MANAGED_BY
        out[("node", held[0])] = PodHold(namespace or "", labels.get(INSTANCE_LABEL) if ours else None, held[1])
    job = next((labels[k] for k in JOB_NAME_LABELS if k in labels), None)
    if job and labels.get(MANAGED_BY_LABEL) == MANAGED_BY:
        message = termination_message(body)
        if message is not None:
            out[("job", namespace or "", job)] = message
    return out
