"""The PATCH bodies an API server takes besides apply: JSON merge (RFC 7386), JSON patch (RFC 6902), strategic merge.

Strategic merge reads the kind's schema: lists with a patch merge key (containers, env, volumes, volumeMounts by
name, ports by containerPort) merge item by item, lists without one are replaced, and the `$patch`,
`$retainKeys`, `$deleteFromPrimitiveList/` and `$setElementOrder/` directives do what kubectl relies on.
Custom resources take no strategic merge (415), as on a real server.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from .errors import ApiError
from .schema import ANY, Node

MERGE = "application/merge-patch+json"
JSON = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"
PATCH_TYPES = (MERGE, JSON, STRATEGIC, APPLY)

_DELETE = object()


def merge_patch(base: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(base: Any, operations: Any) -> Any:
    """RFC 6902; a failed `test` or a bad path is the client's error (422), as the API server answers it."""
    if not isinstance(operations, list):
        raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    try:
        return jsonpatch.apply_patch(base, operations, in_place=False)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                       f"testing value failed: {exc}") from exc
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}") \
            from exc


def _is_directive(item: Any) -> bool:
    return isinstance(item, dict) and set(item) == {"$patch"}


def _clean(value: Any) -> Any:
    """A patch value with its directives removed (what lands in the object when nothing was there)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()
                if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value if not _is_directive(v)]
    return copy.deepcopy(value)


def strategic_merge(base: Any, patch: Any, node: Node) -> Any:
    """Apply a strategic merge patch to `base`, reading merge keys and strategies from `node`."""
    result = _merge_map(base, patch, node)
    return {} if result is _DELETE else result


def _merge_map(base: Any, patch: Any, node: Node) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return _clean(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            out[name] = [x for x in out.get(name) or [] if x not in (value or [])]
            continue
        sub = node.field(key) or ANY
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            out[key] = _merge_list(out.get(key), value, sub)
        elif isinstance(value, dict):
            merged = _merge_map(out.get(key), value, sub)
            if merged is _DELETE:
                out.pop(key, None)
            else:
                out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(base: Any, patch: list[Any], node: Node) -> list[Any]:
    if "merge" not in node.patch_strategy or any(
            isinstance(x, dict) and x.get("$patch") == "replace" for x in patch):
        return [_clean(x) for x in patch if not _is_directive(x)]
    current = list(base) if isinstance(base, list) else []
    key = node.patch_merge_key
    if key is None:  # a list of scalars with strategy merge (finalizers): the union, in order
        return current + [copy.deepcopy(x) for x in patch if x not in current]
    out = [copy.deepcopy(x) for x in current]
    for item in patch:
        if not isinstance(item, dict):
            continue
        found = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            out = [x for x in out if not (isinstance(x, dict) and x.get(key) == item.get(key))]
            continue
        if found is None:
            out.append(_clean(item))
        else:
            merged = _merge_map(out[found], item, node.items)
            if merged is _DELETE:
                del out[found]
            else:
                out[found] = merged
    return out
