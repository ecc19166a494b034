"""The OpenAPI schemas an API server holds: built-in kinds from kubernetes-validate, custom kinds from their CRD.

A `Node` is one place in a schema: which fields exist there, and how lists and maps merge (list type and keys,
the strategic-merge-patch strategy and merge key). Validation, pruning, strategic merge and server-side apply
all walk objects with it, so they agree on the shape of every kind.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing

# The API version the built-in schemas are taken from (a release kind and the managed clouds run).
K8S_VERSION = "1.33.0"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@functools.cache
def _schema_dir() -> Path:
    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"


@functools.cache
def _definitions_doc() -> dict[str, Any]:
    return json.loads((_schema_dir() / "_definitions.json").read_text())  # type: ignore[no-any-return]


def definitions() -> dict[str, Any]:
    return _definitions_doc()["$defs"]  # type: ignore[no-any-return]


def _file_name(api_version: str, kind: str) -> str:
    # kubernetes-validate's naming: rbac.authorization.k8s.io/v1 -> rbac-v1
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{group_version}.json"


@functools.cache
def _top(api_version: str, kind: str) -> dict[str, Any] | None:
    path = _schema_dir() / _file_name(api_version, kind)
    return json.loads(path.read_text()) if path.exists() else None


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    top = _top(api_version, kind)
    if top is None:
        return None
    defs = _definitions_doc()
    registry: referencing.Registry[Any] = referencing.Registry().with_resources([
        (defs["$id"], referencing.Resource.from_contents(defs)),
        (top.get("$id", "urn:top"), referencing.Resource.from_contents(top)),
    ])
    return jsonschema.Draft202012Validator(top, registry=registry)


def builtin_errors(obj: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """jsonschema's findings for a built-in object (types, required fields); unknown fields are pruned first."""
    validator = _validator(str(obj.get("apiVersion")), str(obj.get("kind")))
    if validator is not None:
        yield from validator.iter_errors(obj)


def has_builtin_schema(api_version: str, kind: str) -> bool:
    return _top(api_version, kind) is not None


class Node:
    """One place in a schema, with `$ref`s resolved."""

    __slots__ = ("raw",)
    raw: dict[str, Any]

    def __init__(self, raw: dict[str, Any]) -> None:
        seen = 0
        while "$ref" in raw and seen < 64:
            ref = raw["$ref"]
            raw = definitions()[ref.rsplit("/", 1)[-1]]
            seen += 1
        if "allOf" in raw and len(raw["allOf"]) == 1:
            raw = {**{k: v for k, v in raw.items() if k != "allOf"}, **Node(raw["allOf"][0]).raw}
        self.raw = raw

    @classmethod
    def builtin(cls, api_version: str, kind: str) -> Node | None:
        top = _top(api_version, kind)
        return cls(top) if top is not None else None

    @classmethod
    def definition(cls, name: str) -> Node:
        return cls(definitions()[name])

    @property
    def types(self) -> set[str]:
        t = self.raw.get("type")
        out = {t} if isinstance(t, str) else set(t or [])
        if "properties" in self.raw or isinstance(self.raw.get("additionalProperties"), dict):
            out.add("object")
        return out - {"null"}

    @property
    def takes_objects(self) -> bool:
        """Whether an object may stand here (an untyped node, or one typed object)."""
        return not self.types or "object" in self.types or self.preserves_unknown

    @property
    def properties(self) -> dict[str, Any]:
        return self.raw.get("properties") or {}

    @property
    def is_struct(self) -> bool:
        return bool(self.properties)

    @property
    def is_map(self) -> bool:
        return isinstance(self.raw.get("additionalProperties"), dict) and not self.properties

    @property
    def preserves_unknown(self) -> bool:
        if self.raw.get("x-kubernetes-preserve-unknown-fields"):
            return True
        # A free-form object (RawExtension, a CRD field typed only "object") keeps whatever it is given, and so
        # does an untyped node (JSON, JSONSchemaPropsOrBool: any value).
        free = not self.properties and "additionalProperties" not in self.raw
        return free and ("object" in self.types or (not self.types and "items" not in self.raw))

    def field(self, name: str) -> Node | None:
        """The schema of a field of this object; None when the field is unknown here."""
        if name in self.properties:
            return Node(self.properties[name])
        extra = self.raw.get("additionalProperties")
        if isinstance(extra, dict):
            return Node(extra)
        if self.preserves_unknown:
            return ANY
        return None

    @property
    def items(self) -> Node:
        items = self.raw.get("items")
        return Node(items) if isinstance(items, dict) else ANY

    @property
    def list_type(self) -> str:
        return str(self.raw.get("x-kubernetes-list-type", "atomic"))

    @property
    def list_keys(self) -> list[str]:
        return list(self.raw.get("x-kubernetes-list-map-keys") or [])

    @property
    def map_type(self) -> str:
        default = "granular"
        return str(self.raw.get("x-kubernetes-map-type", default))

    @property
    def patch_strategy(self) -> set[str]:
        return set(filter(None, str(self.raw.get("x-kubernetes-patch-strategy", "")).split(",")))

    @property
    def patch_merge_key(self) -> str | None:
        key = self.raw.get("x-kubernetes-patch-merge-key")
        return str(key) if key else None


ANY = Node({"x-kubernetes-preserve-unknown-fields": True})


def crd_node(schema: dict[str, Any]) -> Node:
    """A CRD's openAPIV3Schema as a Node whose metadata is the built-in ObjectMeta (as the API server types it)."""
    raw = copy.deepcopy(schema)
    raw.setdefault("properties", {})["metadata"] = {"$ref": f"#/$defs/{OBJECT_META}"}
    for name in ("apiVersion", "kind"):
        raw["properties"].setdefault(name, {"type": "string"})
    return Node(raw)


def crd_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as JSON Schema: int-or-string admits both, nullable admits null, metadata is not checked here."""

    def convert(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-validations")}
        if out.get("x-kubernetes-int-or-string"):
            out["type"] = ["integer", "string"]
        if out.get("nullable") and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "properties" in out:
            out["properties"] = {k: convert(v) for k, v in out["properties"].items()}
        if isinstance(out.get("additionalProperties"), dict):
            out["additionalProperties"] = convert(out["additionalProperties"])
        if "items" in out:
            out["items"] = convert(out["items"])
        return out

    converted = convert(schema)
    props = dict(converted.get("properties") or {})
    props["metadata"] = {"type": "object"}
    converted["properties"] = props
    return converted  # type: ignore[no-any-return]


def unknown_fields(value: Any, node: Node, path: str = "") -> Iterator[str]:
    """Dotted paths of fields the schema does not know (what strict field validation names)."""
    if isinstance(value, dict):
        if (node.preserves_unknown and not node.properties) or not node.takes_objects:
            return  # a value of the wrong type is the schema's finding, not unknown fields
        for name, child in value.items():
            sub = node.field(name)
            where = f"{path}.{name}" if path else name
            if sub is None:
                yield where
            else:
                yield from unknown_fields(child, sub, where)
    elif isinstance(value, list) and "array" in node.types:
        items = node.items
        for i, child in enumerate(value):
            yield from unknown_fields(child, items, f"{path}[{i}]")


def prune(value: Any, node: Node) -> Any:
    """The value without the fields its schema does not know (the API server drops them)."""
    if isinstance(value, dict):
        if (node.preserves_unknown and not node.properties) or not node.takes_objects:
            return value
        out = {}
        for name, child in value.items():
            sub = node.field(name)
            if sub is not None:
                out[name] = prune(child, sub)
        return out
    if isinstance(value, list) and "array" in node.types:
        return [prune(v, node.items) for v in value]
    return value
