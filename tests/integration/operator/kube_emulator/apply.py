"""Server-side apply and managedFields: who owns which field, conflicts, and removal of fields a manager dropped.

Field sets are sets of paths as in `metadata.managedFields[].fieldsV1`: `f:name` for a field or map key,
`k:{"name":"x"}` for an item of a list-map (containers by name, ports by containerPort and protocol), `v:<json>`
for an item of a set-list (finalizers). Atomic lists and maps (tolerations, nodeSelector) are one leaf.

- Every write records its changes for the writer (operation Update) and takes them from other managers.
- An apply (operation Apply) merges the applied configuration into the object; where another manager owns a
  field with a different value it answers 409 unless `force`, which takes the field over; a field the applier
  owned before and no longer sends is removed unless another manager still owns it.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError
from .schema import ANY, Node

Path = tuple[str, ...]
# Fields the API server manages itself: never in a field set.
_SERVER_META = {"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
                "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "generateName"}
# Key fields a list-map item may omit that the API server defaults (the key must match the stored item).
_KEY_DEFAULTS = {"protocol": "TCP"}
_MISSING = object()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_element(item: dict[str, Any], keys: list[str]) -> str:
    values = {k: item.get(k, _KEY_DEFAULTS.get(k)) for k in keys}
    return "k:" + json.dumps({k: v for k, v in values.items() if v is not None}, separators=(",", ":"),
                             sort_keys=True)


def _atomic_map(node: Node) -> bool:
    return node.map_type == "atomic"


def members(value: Any, node: Node, scope: str = "all") -> set[Path]:
    """The field set of an object: every leaf, map key and list item it sets (see the module doc)."""
    out: set[Path] = set()
    if not isinstance(value, dict):
        return out
    for key, child in value.items():
        if key in ("apiVersion", "kind"):
            continue
        if scope == "main" and key == "status":
            continue
        if scope == "status" and key != "status":
            continue
        sub = node.field(key) or ANY
        if key == "metadata" and isinstance(child, dict):
            for mk, mv in child.items():
                if mk not in _SERVER_META:
                    _walk(mv, sub.field(mk) or ANY, ("f:metadata", f"f:{mk}"), out)
            continue
        _walk(child, sub, (f"f:{key}",), out)
    return out


def _walk(value: Any, node: Node, prefix: Path, out: set[Path]) -> None:
    if isinstance(value, dict) and not _atomic_map(node) and value:
        for key, child in value.items():
            _walk(child, node.field(key) or ANY, (*prefix, f"f:{key}"), out)
        return
    if isinstance(value, list) and value and node.list_type in ("map", "set"):
        for item in value:
            if node.list_type == "map" and isinstance(item, dict):
                path = (*prefix, _key_element(item, node.list_keys))
                out.add(path)
                for key, child in item.items():
                    _walk(child, node.items.field(key) or ANY, (*path, f"f:{key}"), out)
            else:
                out.add((*prefix, "v:" + json.dumps(item, separators=(",", ":"), sort_keys=True)))
        return
    out.add(prefix)


def _step(value: Any, element: str, node: Node) -> tuple[Any, Node]:
    kind, _, rest = element.partition(":")
    if kind == "f":
        if not isinstance(value, dict) or rest not in value:
            return _MISSING, ANY
        return value[rest], node.field(rest) or ANY
    if not isinstance(value, list):
        return _MISSING, ANY
    if kind == "k":
        keys = json.loads(rest)
        for item in value:
            if isinstance(item, dict) and all(item.get(k, _KEY_DEFAULTS.get(k)) == v for k, v in keys.items()):
                return item, node.items
        return _MISSING, ANY
    if kind == "v":
        wanted = json.loads(rest)
        return (wanted, node.items) if wanted in value else (_MISSING, ANY)
    return _MISSING, ANY


def get(value: Any, path: Path, node: Node) -> Any:
    for element in path:
        value, node = _step(value, element, node)
        if value is _MISSING:
            return _MISSING
    return value


def remove(obj: dict[str, Any], path: Path, node: Node) -> bool:
    """Remove what `path` names from `obj` in place; False when it is not there."""
    parent: Any = obj
    for element in path[:-1]:
        parent, node = _step(parent, element, node)
        if parent is _MISSING:
            return False
    kind, _, rest = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict) and rest in parent:
        del parent[rest]
        return True
    if kind == "k" and isinstance(parent, list):
        keys = json.loads(rest)
        before = len(parent)
        parent[:] = [i for i in parent if not (isinstance(i, dict) and all(
            i.get(k, _KEY_DEFAULTS.get(k)) == v for k, v in keys.items()))]
        return len(parent) != before
    if kind == "v" and isinstance(parent, list):
        wanted = json.loads(rest)
        if wanted in parent:
            parent.remove(wanted)
            return True
    return False


def _prune_empty(obj: Any, path: Path, node: Node, owned: set[Path]) -> None:
    """After a removal, drop parents left empty that nobody owns as such (a nodeSelector with no keys)."""
    for cut in range(len(path) - 1, 0, -1):
        parent_path = path[:cut]
        value = get(obj, parent_path, node)
        if value in ({}, []) and parent_path not in owned and parent_path[-1].startswith("f:"):
            remove(obj, parent_path, node)
        else:
            break


def merge(live: Any, config: Any, node: Node) -> Any:
    """The applied configuration merged into the live object, by the schema's list and map types."""
    if isinstance(config, dict) and isinstance(live, dict) and not _atomic_map(node):
        out = dict(live)
        for key, value in config.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(live.get(key), value, node.field(key) or ANY)
        return out
    if isinstance(config, list) and isinstance(live, list) and node.list_type == "map":
        keys = node.list_keys
        out_list = [copy.deepcopy(i) for i in live]
        for item in config:
            if not isinstance(item, dict):
                continue
            element = _key_element(item, keys)
            found = next((n for n, i in enumerate(out_list)
                          if isinstance(i, dict) and _key_element(i, keys) == element), None)
            if found is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[found] = merge(out_list[found], item, node.items)
        return out_list
    if isinstance(config, list) and isinstance(live, list) and node.list_type == "set":
        return live + [copy.deepcopy(i) for i in config if i not in live]
    return copy.deepcopy(config)


def render(path: Path) -> str:
    """A path as the API server prints it in conflicts: `.spec.template.spec.containers[name="server"].image`."""
    out = ""
    for element in path:
        kind, _, rest = element.partition(":")
        if kind == "f":
            out += f".{rest}"
        elif kind == "k":
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(rest).items()) + "]"
        else:
            out += f"[{rest}]"
    return out


def to_fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    leaves = set(paths)
    for path in leaves:
        node = tree
        for element in path:
            node = node.setdefault(element, {})
    # A member that also has members under it (a list-map item) carries "." for itself.

    def mark(node: dict[str, Any], prefix: Path) -> None:
        for key, sub in node.items():
            if key == ".":
                continue
            here = (*prefix, key)
            if sub and here in leaves:
                sub["."] = {}
            mark(sub, here)

    mark(tree, ())
    return tree


def from_fields_v1(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, sub in (tree or {}).items():
        if key == ".":
            out.add(prefix)
            continue
        here = (*prefix, key)
        if not sub:
            out.add(here)
        else:
            out |= from_fields_v1(sub, here)
    return out


@dataclass
class Entry:
    manager: str
    operation: str  # Apply or Update
    api_version: str
    subresource: str
    fields: set[Path] = field(default_factory=set)
    time: str = field(default_factory=_now)

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.manager, self.operation, self.subresource)

    def dump(self) -> dict[str, Any]:
        out = {"manager": self.manager, "operation": self.operation, "apiVersion": self.api_version,
               "time": self.time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(self.fields)}
        if self.subresource:
            out["subresource"] = self.subresource
        return out


def read_entries(obj: dict[str, Any] | None) -> list[Entry]:
    out = []
    for raw in ((obj or {}).get("metadata") or {}).get("managedFields") or []:
        out.append(Entry(raw.get("manager", ""), raw.get("operation", "Update"), raw.get("apiVersion", ""),
                         raw.get("subresource", ""), from_fields_v1(raw.get("fieldsV1") or {}),
                         raw.get("time", _now())))
    return out


def write_entries(obj: dict[str, Any], entries: list[Entry]) -> None:
    kept = [e for e in entries if e.fields]
    meta = obj.setdefault("metadata", {})
    if kept:
        meta["managedFields"] = [e.dump() for e in kept]
    else:
        meta.pop("managedFields", None)


def _leafy(path: Path, value: Any) -> bool:
    # List items are owned for their existence; their values are compared field by field below them.
    return not path[-1].startswith(("k:", "v:"))


def record_update(old: dict[str, Any] | None, new: dict[str, Any], node: Node, manager: str, api_version: str,
                  subresource: str = "", scope: str = "all") -> None:
    """After a non-apply write: the writer owns what it changed; others lose what changed or went."""
    entries = read_entries(old)
    new_set = members(new, node, scope)
    old_set = members(old, node, scope) if old is not None else set()
    changed = {p for p in new_set if p not in old_set or (
        _leafy(p, None) and get(new, p, node) != get(old, p, node))}
    gone = old_set - new_set
    for entry in entries:
        entry.fields -= changed | gone
        # A removed list item or map takes the fields under it along.
        entry.fields = {p for p in entry.fields if not any(p[:len(g)] == g for g in gone)}
    if changed:
        mine = next((e for e in entries if e.ident == (manager, "Update", subresource)), None)
        if mine is None:
            mine = Entry(manager, "Update", api_version, subresource)
            entries.append(mine)
        mine.fields |= changed
        mine.time = _now()
        mine.api_version = api_version
    write_entries(new, entries)


def apply(live: dict[str, Any] | None, config: dict[str, Any], node: Node, manager: str, api_version: str, *,
          force: bool, scope: str = "all", subresource: str = "") -> dict[str, Any]:
    """The object after `manager` applies `config` to `live` (None: it is created); 409 on conflicts."""
    entries = read_entries(live)
    base: dict[str, Any] = copy.deepcopy(live) if live is not None else {}
    config_set = members(config, node, scope)
    conflicts: dict[str, list[Path]] = {}
    for entry in entries:
        if entry.manager == manager:
            continue
        for path in sorted(entry.fields & config_set):
            if not _leafy(path, None):
                continue
            have, want = get(base, path, node), get(config, path, node)
            if have is not _MISSING and have != want:
                conflicts.setdefault(entry.manager, []).append(path)
    if conflicts and not force:
        total = sum(len(v) for v in conflicts.values())
        lines = []
        for who, paths in conflicts.items():
            lines.append(f'conflict with "{who}"' + (f" using {api_version}" if api_version else "") + ": "
                         + ", ".join(render(p) for p in paths))
        raise ApiError(409, "Conflict", f"Apply failed with {total} conflict{'s' if total > 1 else ''}: "
                                        + "; ".join(lines),
                       {"causes": [{"reason": "FieldManagerConflict", "message": f'conflict with "{who}"',
                                    "field": render(p)} for who, ps in conflicts.items() for p in ps]})
    for entry in entries:
        if entry.manager != manager:
            entry.fields -= {p for ps in conflicts.values() for p in ps}
    applied_config = {k: v for k, v in config.items() if k not in ("apiVersion", "kind")}
    if scope == "main":
        applied_config.pop("status", None)
    meta_config = dict(applied_config.get("metadata") or {})
    for key in _SERVER_META:
        meta_config.pop(key, None)
    if "metadata" in applied_config:
        applied_config["metadata"] = meta_config
    result: dict[str, Any] = merge(base, applied_config, node)
    mine = next((e for e in entries if e.ident == (manager, "Apply", subresource)), None)
    previous = mine.fields if mine is not None else set()
    others = set().union(*(e.fields for e in entries if e.ident != (manager, "Apply", subresource)))
    for path in sorted(previous - config_set, key=len):
        if path in others or any(o[:len(path)] == path for o in others):
            continue
        if remove(result, path, node):
            _prune_empty(result, path, node, others | config_set)
    if mine is None:
        mine = Entry(manager, "Apply", api_version, subresource)
        entries.append(mine)
    mine.fields = config_set
    mine.time = _now()
    mine.api_version = api_version
    write_entries(result, entries)
    return result
