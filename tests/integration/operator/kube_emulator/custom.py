"""Custom resources as the API server treats them once their CRD is created: defaults, pruning, schema, CEL.

The served version's openAPIV3Schema is applied to every write: structural defaults first, unknown fields
dropped (or refused under strict field validation), then the schema (types, enums, bounds, patterns,
required fields), list-map key uniqueness, and each `x-kubernetes-validations` CEL rule (cel-python),
with `self.metadata.name` available to rules at the root as on a real server. On updates, errors in parts
of the object that did not change are let through (validation ratcheting, on by default since 1.30).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import celpy
import jsonschema
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from .errors import FieldError, Raw, duplicate, invalid, not_supported, required
from .schema import Node, crd_jsonschema, crd_node

_CEL = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}
_MISSING = object()


def _dotted(parts: tuple[str | int, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _at(value: Any, parts: tuple[str | int, ...]) -> Any:
    for part in parts:
        if isinstance(part, int):
            if not isinstance(value, list) or part >= len(value):
                return _MISSING
            value = value[part]
        else:
            if not isinstance(value, dict) or part not in value:
                return _MISSING
            value = value[part]
    return value


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: nulls of fields that are not nullable are dropped first; then a missing property
    with a default gets it, inside objects that exist."""
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        out = {k: v for k, v in value.items()
               if v is not None or (props.get(k) or {}).get("nullable") or k not in props}
        for name, prop in props.items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = defaults(out[name], prop)
        return out
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: defaults(v, schema["additionalProperties"]) for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [defaults(v, schema["items"]) for v in value]
    return value


def _program(rule: str) -> Any:
    program = _PROGRAMS.get(rule)
    if program is None:
        program = _PROGRAMS[rule] = _CEL.program(_CEL.compile(rule))
    return program


@dataclass
class CustomKind:
    """One served version of a CRD: how its objects are defaulted, pruned and validated."""

    group: str
    version: str
    plural: str
    kind: str
    schema: dict[str, Any]
    subresources: dict[str, Any] = field(default_factory=dict)
    node: Node = field(init=False)
    validator: Any = field(init=False)

    def __post_init__(self) -> None:
        self.node = crd_node(self.schema)
        self.validator = jsonschema.Draft4Validator(crd_jsonschema(self.schema))

    @classmethod
    def from_crd(cls, crd: dict[str, Any]) -> CustomKind:
        spec = crd["spec"]
        version = next(v for v in spec["versions"] if v.get("served", True) and v.get("storage", True))
        schema = (version.get("schema") or {}).get("openAPIV3Schema") or {
            "type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return cls(spec["group"], version["name"], spec["names"]["plural"], spec["names"]["kind"], schema,
                   dict(version.get("subresources") or {}))

    def default(self, obj: dict[str, Any]) -> dict[str, Any]:
        out = defaults({k: v for k, v in obj.items() if k != "metadata"}, self.schema)
        out["metadata"] = obj.get("metadata")
        return out  # type: ignore[no-any-return]

    def errors(self, obj: dict[str, Any], old: dict[str, Any] | None, *, status_only: bool = False) -> list[FieldError]:
        """Why the API server refuses `obj` (old: the stored object on an update); ratcheted on updates."""
        found = list(self._schema(obj))
        if not found:
            found = list(self._rules(obj, old))
        if status_only:
            found = [e for e in found if e.field == "status" or e.field.startswith("status.")]
        else:
            found = [e for e in found if not (e.field == "status" or e.field.startswith("status."))]
        if old is not None:
            found = [e for e in found if not self._unchanged(e, obj, old)]
        return found

    def _unchanged(self, error: FieldError, obj: dict[str, Any], old: dict[str, Any]) -> bool:
        parts: list[str | int] = []
        for token in re.findall(r"[^.\[\]]+|\[\d+\]", error.field):
            parts.append(int(token[1:-1]) if token.startswith("[") else token)
        if error.type == "Required":
            parts = parts[:-1]  # a missing field: the object that lacks it is what must be unchanged
        old = self.default(old)  # the stored object is read back defaulted too
        new_value, old_value = _at(obj, tuple(parts)), _at(old, tuple(parts))
        return new_value is not _MISSING and new_value == old_value

    def _schema(self, obj: dict[str, Any]) -> Iterator[FieldError]:
        for e in sorted(self.validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            path = _dotted(tuple(e.absolute_path))
            schema = e.schema if isinstance(e.schema, dict) else {}
            where = path or "<root>"
            if e.validator == "required":
                missing = str(e.message).split("'")[1]
                yield required(f"{path}.{missing}" if path else missing)
            elif e.validator == "enum":
                yield not_supported(where, e.instance, [str(v) for v in schema.get("enum", [])])
            elif e.validator == "type":
                got = _json_type(e.instance)
                yield FieldError("TypeInvalid", where, got, f"{where} in body must be of type "
                                                            f"{schema.get('type')}: {json.dumps(got)}")
            elif e.validator in ("maxLength", "maxItems", "maxProperties"):
                limit = schema.get(e.validator)
                noun = {"maxLength": "bytes", "maxItems": "items", "maxProperties": "properties"}[e.validator]
                yield FieldError("TooLong" if e.validator == "maxLength" else "TooMany", where,
                                 detail=f"may not have more than {limit} {noun}")
            elif e.validator == "pattern":
                yield invalid(where, e.instance, f"{where} in body should match '{schema.get('pattern')}'")
            elif e.validator in ("minimum", "maximum"):
                words = "greater than or equal to" if e.validator == "minimum" else "less than or equal to"
                yield invalid(where, e.instance, f"{where} in body should be {words} {schema.get(e.validator)}")
            else:
                value = e.instance if not isinstance(e.instance, dict | list) else Raw('"object"')
                yield invalid(where, value, f"{where} in body {e.message}")

    def _rules(self, obj: dict[str, Any], old: dict[str, Any] | None) -> Iterator[FieldError]:
        root = {k: v for k, v in obj.items()}
        meta = obj.get("metadata") or {}
        # Rules at the root see metadata.name and metadata.generateName only.
        root["metadata"] = {k: meta[k] for k in ("name", "generateName") if k in meta}
        yield from self._walk(root, old, self.schema, ())

    def _walk(self, value: Any, old: Any, schema: dict[str, Any], path: tuple[str | int, ...]) -> Iterator[FieldError]:
        if isinstance(value, dict) and "properties" in schema:
            for name, prop in schema["properties"].items():
                if name in value and name != "metadata":
                    old_child = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                    yield from self._walk(value[name], old_child, prop, (*path, name))
        elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
            for name, child in value.items():
                old_child = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                yield from self._walk(child, old_child, schema["additionalProperties"], (*path, name))
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            if schema.get("x-kubernetes-list-type") == "map":
                keys = schema.get("x-kubernetes-list-map-keys") or []
                seen: set[str] = set()
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        ident = repr(tuple(item.get(k) for k in keys))
                        if ident in seen:
                            yield duplicate(_dotted((*path, i)), Raw("map[" + " ".join(
                                f"{k}:{item.get(k)}" for k in keys) + "]"))
                        seen.add(ident)
            for i, item in enumerate(value):
                yield from self._walk(item, _MISSING, schema["items"], (*path, i))
        for rule in schema.get("x-kubernetes-validations") or []:
            expression = rule["rule"]
            uses_old = "oldSelf" in expression
            if uses_old and (old is _MISSING or old is None):
                continue  # a transition rule runs only on updates
            activation = {"self": json_to_cel(value)}
            if uses_old:
                activation["oldSelf"] = json_to_cel(old)
            try:
                result = _program(expression).evaluate(activation)
            except Exception as exc:
                result = exc
            if isinstance(result, Exception | CELEvalError) or not bool(result):
                where = _dotted(path) + str(rule.get("fieldPath") or "")
                message = rule.get("message") or f"failed rule: {expression}"
                shown = Raw('"object"') if isinstance(value, dict) else Raw('"array"') if isinstance(value, list) \
                    else value
                reason = rule.get("reason", "FieldValueInvalid")
                if reason == "FieldValueForbidden":
                    yield FieldError("Forbidden", where or "<root>", detail=message)
                elif reason == "FieldValueRequired":
                    yield required(where or "<root>", message)
                else:
                    yield invalid(where or "<root>", shown, message)
