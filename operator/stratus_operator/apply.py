"""Bring a deployment's children to a desired set: server-side apply what is missing or drifted, delete the rest.

Every child but a Job or a PVC is written by server-side apply (field manager `stratus-operator`, force): keys
the desired object no longer holds are removed, and what someone else changed in our fields is put back. A
child costs no API call while nothing changed on either side: the desired object's `stratus.dev/spec-hash`
is the one last applied, and the live object (as the index saw it) is the one that apply left behind.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stratus_operator.indexes import ChildInfo
from stratus_operator.kube import CHILD_RESOURCES, FIELD_MANAGER, Conflict, Kube, NotFound, Resource
from stratus_operator.names import SPEC_HASH_ANNOTATION, stable_hash

# Immutable specs: a changed Job gets a new name instead; a claim is never patched (only its size could be).
CREATE_ONLY = frozenset({"Job", "PersistentVolumeClaim"})
# Top-level keys that are not the object's desired content.
_NOT_CONTENT = frozenset({"apiVersion", "kind", "metadata", "status"})

# (kind, name) -> (the spec hash applied, the live fingerprint the apply answered with, when: time.monotonic()).
AppliedState = MutableMapping[tuple[str, str], tuple[str, str, float]]
# How long the watch (and so the index) may lag behind our own apply: a child applied this recently that the
# index does not show yet is taken as on its way, not as deleted.
INDEX_LAG_SECONDS = 30.0


@dataclass
class Applied:
    """What one apply changed, as `Kind/name` lists."""

    created: list[str] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.created or self.patched or self.deleted)

    def __str__(self) -> str:
        parts = {"created": self.created, "applied": self.patched, "deleted": self.deleted}
        return "; ".join(f"{verb} {', '.join(names)}" for verb, names in parts.items() if names)


def spec_hash(obj: Mapping[str, Any]) -> str:
    """The `stratus.dev/spec-hash` annotation render stamped on an object (empty when absent)."""
    return str(((obj.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION, ""))


def live_fingerprint(obj: Mapping[str, Any]) -> str:
    """A hash of what a live child holds that anyone could change: its content (spec, data, ...) and labels.

    Status, resourceVersion and the annotations controllers keep (a Deployment's revision) are left out, so a
    controller at work is not drift; a `kubectl scale` or `kubectl edit` of the content is.
    """
    meta = obj.get("metadata") or {}
    content = {k: v for k, v in obj.items() if k not in _NOT_CONTENT}
    return stable_hash({"content": content, "labels": meta.get("labels") or {}, "hash": spec_hash(obj)}, 16)


def _union(a: Any, b: Any) -> Any:
    """The union of two managedFields fieldsV1 trees (nested objects whose leaves are `{}`)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a if isinstance(a, dict) else b
    out = dict(a)
    for key, value in b.items():
        out[key] = _union(out.get(key), value)
    return out


def adopt_legacy_fields(live: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The JSON patch that hands the fields an older operator set by create and merge patch (manager
    `stratus-operator`, operation Update) to our apply entry, or None when there are none.

    Without it an apply never removes those fields (another manager owns them), so an upgraded operator
    would keep a stale init container forever; kubectl does the same when it moves to server-side apply.
    """
    meta = live.get("metadata") or {}
    entries: list[dict[str, Any]] = list(meta.get("managedFields") or [])
    legacy = [e for e in entries if e.get("manager") == FIELD_MANAGER and e.get("operation") == "Update"
              and not e.get("subresource")]
    if not legacy:
        return None
    ours = next((e for e in entries if e.get("manager") == FIELD_MANAGER and e.get("operation") == "Apply"), None)
    fields: Any = (ours or {}).get("fieldsV1") or {}
    for entry in legacy:
        fields = _union(fields, entry.get("fieldsV1") or {})
    adopted = {**(ours or {"manager": FIELD_MANAGER, "operation": "Apply", "apiVersion": live.get("apiVersion"),
                              "fieldsType": "FieldsV1"}), "fieldsV1": fields}
    kept = [e for e in entries if e is not ours and e not in legacy]
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")},
            {"op": "replace", "path": "/metadata/managedFields", "value": [*kept, adopted]}]


async def _apply(kube: Kube, resource: Resource, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    try:
        live = await kube.apply(resource, namespace, obj)
    except NotFound:
        # A server without apply-create (a real one creates): create, and own the fields from the next apply.
        try:
            return await kube.create(resource, namespace, obj)
        except Conflict:
            live = await kube.apply(resource, namespace, obj)
    adopt = adopt_legacy_fields(live)
    if adopt is not None:
        # Own what an older operator set, then apply again: now what the desired object lacks goes.
        await kube.json_patch(resource, namespace, obj["metadata"]["name"], adopt)
        live = await kube.apply(resource, namespace, obj)
    return live


async def apply_children(kube: Kube, namespace: str, desired: Sequence[dict[str, Any]],
                         children: Mapping[tuple[str, str], ChildInfo], *,
                         keep: Collection[tuple[str, str]] = (),
                         state: AppliedState | None = None) -> Applied:
    """Make the children in `namespace` the `desired` objects (each stamped with its spec hash).

    `children` are the existing ones by (kind, name), as the indexes saw them; `keep` names (kind, name) pairs
    that are neither created when missing nor deleted when not desired (a finished compression Job and its
    spec: its result is known). `state` remembers, across calls for this deployment, what each apply left
    behind; without it (or for a child it does not know, as after a restart) every child is applied once.
    """
    state = state if state is not None else {}
    applied = Applied()
    wanted: set[tuple[str, str]] = set()
    for obj in desired:
        kind, name = obj["kind"], obj["metadata"]["name"]
        key = (kind, name)
        wanted.add(key)
        resource = CHILD_RESOURCES[(obj["apiVersion"], kind)]
        have = children.get(key)
        if kind in CREATE_ONLY:
            if have is None and key not in keep:
                try:
                    await kube.create(resource, namespace, obj)
                    applied.created.append(f"{kind}/{name}")
                except Conflict:
                    pass  # the index lags behind our own create: it exists, with this spec (the name says so)
            continue
        if have is None and key in keep:
            continue
        last = state.get(key)
        if last is not None and last[0] == spec_hash(obj):
            if have is not None and have.live == last[1]:
                continue  # desired unchanged since our apply, and the live object is what that apply left
            if have is None and time.monotonic() - last[2] < INDEX_LAG_SECONDS:
                continue  # applied a moment ago; the watch has not delivered it yet
        live = await _apply(kube, resource, namespace, obj)
        (applied.created if have is None else applied.patched).append(f"{kind}/{name}")
        state[key] = (spec_hash(obj), live_fingerprint(live), time.monotonic())
    for (kind, name), info in children.items():
        if (kind, name) in wanted or (kind, name) in keep:
            continue
        stale = CHILD_RESOURCES.get((info.api_version, kind))
        if stale is None:
            continue
        await kube.delete(stale, namespace, name)
        state.pop((kind, name), None)
        applied.deleted.append(f"{kind}/{name}")
    return applied
