"""Index body for the operator's children: name, spec hash and the little status a reconcile reads."""

from __future__ import annotations

from typing import Any

from stratus_operator.apply import live_fingerprint
from stratus_operator.indexes import ChildInfo
from stratus_operator.kube import Resource
from stratus_operator.names import GENERATION_ANNOTATION, INSTANCE_LABEL, SPEC_HASH_ANNOTATION
from stratus_operator.observe import ready_replicas


def index_child(body: Any, namespace: str | None, resource: Resource) -> dict[tuple[str, str], ChildInfo]:
    # apiVersion and kind come from the registration: list responses of a real API server omit them on items.
    api_version, kind = resource.api_version, resource.kind
    meta = body.get("metadata") or {}
    instance = (meta.get("labels") or {}).get(INSTANCE_LABEL)
    if not instance:
        return {}
    job = None
    if kind == "Job":
        generation = str((meta.get("annotations") or {}).get(GENERATION_ANNOTATION) or "")
        job = {"spec": {"backoffLimit": (body.get("spec") or {}).get("backoffLimit", 6)},
               "status": dict(body.get("status") or {}),
               "generation": int(generation) if generation.isdigit() else None}
    claim = None
    if kind == "PersistentVolumeClaim":
        spec = body.get("spec") or {}
        claim = {"accessMode": str((spec.get("accessModes") or [""])[0]),
                 "size": str(((spec.get("resources") or {}).get("requests") or {}).get("storage") or ""),
                 "storageClassName": str(spec.get("storageClassName") or "")}
    info = ChildInfo(
        api_version=api_version,
        kind=kind,
        name=meta.get("name") or "",
        spec_hash=(meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION, ""),
        live=live_fingerprint(body),
        ready=ready_replicas(body) if kind == "Deployment" else 0,
        phase=str((body.get("status") or {}).get("phase") or "") if kind == "PersistentVolumeClaim" else "",
        job=job,
        claim=claim,
    )
    return {(namespace or "", instance): info}
