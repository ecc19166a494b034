"""Bring a deployment's children to a desired set: create what is missing, patch what drifted, delete the rest.

Generic over kinds: an object's drift is its `stratus.dev/spec-hash` annotation against the one last seen
(the index's `ChildInfo`), so an unchanged child costs no API call.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stratus_operator.indexes import ChildInfo
from stratus_operator.kube import CHILD_RESOURCES, Conflict, Kube, NotFound
from stratus_operator.names import SPEC_HASH_ANNOTATION

# Immutable specs: a changed Job gets a new name instead; a claim is never patched.
CREATE_ONLY = frozenset({"Job", "PersistentVolumeClaim"})


@dataclass
class Applied:
    """What one apply changed, as `Kind/name` lists."""

    created: list[str] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.created or self.patched or self.deleted)

    def __str__(self) -> str:
        parts = {"created": self.created, "patched": self.patched, "deleted": self.deleted}
        return "; ".join(f"{verb} {', '.join(names)}" for verb, names in parts.items() if names)


def _hash(obj: Mapping[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION, ""))


async def apply_children(kube: Kube, namespace: str, desired: Sequence[dict[str, Any]],
                         children: Mapping[tuple[str, str], ChildInfo], *,
                         keep: Collection[tuple[str, str]] = ()) -> Applied:
    """Make the children in `namespace` the `desired` objects (each stamped with its spec hash).

    `children` are the existing ones by (kind, name); `keep` names (kind, name) pairs that are neither created
    when missing nor deleted when not desired (a finished compression Job and its spec: its result is known).
    """
    applied = Applied()
    wanted: set[tuple[str, str]] = set()
    for obj in desired:
        kind, name = obj["kind"], obj["metadata"]["name"]
        wanted.add((kind, name))
        resource = CHILD_RESOURCES[(obj["apiVersion"], kind)]
        have = children.get((kind, name))
        if have is None:
            if (kind, name) in keep:
                continue
            try:
                await kube.create(resource, namespace, obj)
                applied.created.append(f"{kind}/{name}")
                continue
            except Conflict:
                # The index lags behind our own creates: compare with the live object instead.
                live = await kube.get(resource, namespace, name)
                have = ChildInfo(obj["apiVersion"], kind, name, _hash(live))
        if have.spec_hash != _hash(obj) and kind not in CREATE_ONLY:
            try:
                await kube.patch(resource, namespace, name, obj)
                applied.patched.append(f"{kind}/{name}")
            except NotFound:
                await kube.create(resource, namespace, obj)
                applied.created.append(f"{kind}/{name}")
    for (kind, name), info in children.items():
        if (kind, name) in wanted or (kind, name) in keep:
            continue
        stale = CHILD_RESOURCES.get((info.api_version, kind))
        if stale is None:
            continue
        await kube.delete(stale, namespace, name)
        applied.deleted.append(f"{kind}/{name}")
    return applied
