"""Malformed LLMDeployments for property tests, and the API server's CRD validation (schema, CEL, strict fields)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import celpy  # type: ignore[import-untyped]
import jsonschema
from hypothesis import strategies as st

from stratus_operator.crd import build_crd

Path = tuple[str | int, ...]


def openapi() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def _as_api_server(node: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API server reads it: `x-kubernetes-int-or-string` admits an integer or a string only."""
    out = dict(node)
    if out.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if "properties" in out:
        out["properties"] = {k: _as_api_server(v) for k, v in out["properties"].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _as_api_server(out["additionalProperties"])
    if "items" in out:
        out["items"] = _as_api_server(out["items"])
    return out


SCHEMA = _as_api_server(openapi())
SPEC_SCHEMA: dict[str, Any] = SCHEMA["properties"]["spec"]
_CEL = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# --- the API server's side -------------------------------------------------------------------------


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural-schema defaulting, as the API server does before validation and CEL."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, prop in schema["properties"].items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_defaults(out[name], prop)
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def _walk(value: Any, schema: dict[str, Any], path: Path) -> Iterator[str]:
    """Strict field validation, list-map key uniqueness and CEL rules (what jsonschema does not know)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, child in value.items():
            if name not in schema["properties"]:
                yield f"{dotted((*path, name))}: unknown field"
            else:
                yield from _walk(child, schema["properties"][name], (*path, name))
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for name, child in value.items():
            yield from _walk(child, schema["additionalProperties"], (*path, name))
    elif isinstance(value, list) and "items" in schema:
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen: set[tuple[Any, ...]] = set()
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    key = tuple(item.get(k) for k in keys)
                    if key in seen:
                        yield f"{dotted((*path, i))}.{keys[0]}: Duplicate value {key[0]!r}"
                    seen.add(key)
        for i, item in enumerate(value):
            yield from _walk(item, schema["items"], (*path, i))
    if isinstance(value, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            program = _PROGRAMS.get(rule["rule"])
            if program is None:
                program = _PROGRAMS[rule["rule"]] = _CEL.program(_CEL.compile(rule["rule"]))
            try:
                result = program.evaluate({"self": celpy.json_to_cel(value)})
            except Exception as exc:  # a rule over a field of the wrong type: the schema says so already
                yield f"{dotted(path)}: rule {rule['rule']!r} could not be evaluated ({type(exc).__name__})"
                continue
            if isinstance(result, celpy.CELEvalError) or not bool(result):
                yield f"{dotted(path)}: {rule['message']}"


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    """Why the API server (with our CRD and kubectl's default strict field validation) refuses `manifest`."""
    obj = apply_defaults(manifest, SCHEMA)
    validator = jsonschema.Draft4Validator(SCHEMA)
    errors = [f"{dotted(tuple(e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    if errors:
        return errors  # like the API server: CEL runs only over an object the schema accepts
    # From the root: its rule holds metadata.name to what the children's names and labels can carry.
    return list(_walk(obj, SCHEMA, ()))


# --- the cases ---------------------------------------------------------------------------------------


def base() -> dict[str, Any]:
    """A valid manifest using every optional section, so that every field path exists to be broken."""
    return {
        "apiVersion": "stratus.dev/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {
            "model": {"source": "bundled://smollm2-135m-instruct"},
            "cloud": {"replicas": 1, "gpusPerPod": 2, "tensorParallel": 2, "dtype": "bfloat16",
                      "serving": {"maxBatchSize": 8, "prefillChunkTokens": 512, "prefixCacheTokens": -1,
                                  "streamMessagesPerSecond": 1000},
                      "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                      "nodeSelector": {"gpu": "true"},
                      "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "autoscaling": {"minReplicas": 1, "maxReplicas": 3}},
            "edge": {"variants": [{
                "name": "int8",
                "compression": {"quantization": {"method": "int8-weight"}},
                "gate": {"maxPerplexityIncrease": 0.05},
                "replicas": 1,
                "tolerations": [{"key": "edge", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
                "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "metric": "queue-depth"},
            }]},
            "routing": {"policy": "cascade", "cascade": {"confidenceThreshold": -1.5}},
            "storage": {"pvc": {"size": "10Gi"}},
            "security": {"mtls": True, "clientTokens": {"secretName": "device-tokens"}},
        },
    }


@dataclass(frozen=True)
class Case:
    """One malformed manifest: what kind of fault, and the field its rejection must name."""

    kind: str
    manifest: dict[str, Any]
    field: str


def _leaves(value: Any, schema: dict[str, Any], path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    yield path, schema
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name in value:
                yield from _leaves(value[name], prop, (*path, name))
    elif isinstance(value, list) and value and "items" in schema:
        yield from _leaves(value[0], schema["items"], (*path, 0))


BASE = apply_defaults(base(), SCHEMA)
NODES: list[tuple[Path, dict[str, Any]]] = list(_leaves(BASE["spec"], SPEC_SCHEMA, ("spec",)))[1:]


def _field(path: Path) -> str:
    return next(str(p) for p in reversed(path) if isinstance(p, str))


def _set(manifest: dict[str, Any], path: Path, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    node: Any = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def _delete(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    node: Any = out
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return out


def _wrong_type_value(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return st.sampled_from([{"a": 1}, [1], True])
    not_numbers = st.text(alphabet="abcxyz-", min_size=1, max_size=8)
    options: dict[str | None, st.SearchStrategy[Any]] = {
        "integer": st.one_of(not_numbers, st.just([1]), st.just({"n": 1}), st.just(1.5)),
        "number": st.one_of(not_numbers, st.just([0.5]), st.just({"x": 1})),
        "string": st.one_of(st.integers(), st.just(["a"]), st.just({"a": "b"}), st.booleans()),
        "boolean": st.one_of(st.sampled_from(["maybe", "sure", "2"]), st.just([True]), st.just({"b": 1})),
        "object": st.one_of(st.integers(), st.text(max_size=5), st.just([{"a": 1}])),
        "array": st.one_of(st.integers(), st.text(max_size=5), st.just({"a": 1})),
    }
    return options[kind]


@st.composite
def wrong_type(draw: st.DrawFn) -> Case:
    path, schema = draw(st.sampled_from(NODES))
    return Case("wrong type", _set(BASE, path, draw(_wrong_type_value(schema))), _field(path))


def _required() -> list[tuple[Path, str]]:
    out = [(("spec", "model"), "model")]
    for path, schema in NODES:
        for name in schema.get("required", []):
            out.append(((*path, name), name))
    return out


REQUIRED = _required()


@st.composite
def missing_field(draw: st.DrawFn) -> Case:
    path, name = draw(st.sampled_from(REQUIRED))
    return Case("missing required field", _delete(BASE, path), name)


RANGED = [(p, s) for p, s in NODES if s.get("type") in ("integer", "number") and ("minimum" in s or "maximum" in s)]


@st.composite
def out_of_range(draw: st.DrawFn) -> Case:
    path, schema = draw(st.sampled_from(RANGED))
    integer = schema["type"] == "integer"
    sides = [side for side in ("minimum", "maximum") if side in schema]
    side = draw(st.sampled_from(sides))
    bound = schema[side]
    exclusive = schema.get("exclusiveMinimum" if side == "minimum" else "exclusiveMaximum", False)
    gap = draw(st.integers(0 if exclusive else 1, 10**6)) if integer else draw(
        st.floats(0.0 if exclusive else 1e-3, 1e6, allow_nan=False))
    if integer and not gap:
        gap = 0
    value = bound - gap if side == "minimum" else bound + gap
    return Case("out of range", _set(BASE, path, int(value) if integer else value), _field(path))


ENUMS = [(p, s) for p, s in NODES if "enum" in s]


@st.composite
def unknown_enum(draw: st.DrawFn) -> Case:
    path, schema = draw(st.sampled_from(ENUMS))
    value = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=16)
                 .filter(lambda v: v not in schema["enum"]))
    return Case("unknown method or enum value", _set(BASE, path, value), _field(path))


PATTERNED = [(p, s) for p, s in NODES if s.get("type") == "string" and ("pattern" in s or "maxLength" in s)]


@st.composite
def bad_string(draw: st.DrawFn) -> Case:
    path, schema = draw(st.sampled_from(PATTERNED))
    choices = []
    if "maxLength" in schema:
        choices.append("a" * (schema["maxLength"] + draw(st.integers(1, 50))))
    if "pattern" in schema:
        import re

        candidates = ["Not_A-Label!", "-lead", "UPPER", "ftp:://x", "a b", "s3:/", ":"]
        choices += [c for c in candidates if not re.search(schema["pattern"], c)]
    if "minLength" in schema and schema["minLength"] > 0:
        choices.append("")
    return Case("bad string (pattern, length)", _set(BASE, path, draw(st.sampled_from(choices))), _field(path))


OBJECTS = [(p, s) for p, s in [(("spec",), SPEC_SCHEMA), *NODES] if "properties" in s]


@st.composite
def unknown_field(draw: st.DrawFn) -> Case:
    path, schema = draw(st.sampled_from(OBJECTS))
    name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyzXYZ", min_size=3, max_size=12)
                .filter(lambda n: n not in schema["properties"]))
    return Case("unknown field", _set(BASE, (*path, name), draw(st.integers(0, 9))), name)


@st.composite
def impossible(draw: st.DrawFn) -> Case:
    """Combinations each field allows alone but not together (the CEL rules and their pydantic twins)."""
    m = copy.deepcopy(BASE)
    spec = m["spec"]
    which = draw(st.sampled_from(["tp", "dup", "edge-only", "no-cloud", "autoscale", "storage", "exists",
                                  "tls-secret", "client-tls"]))
    if which == "tp":
        gpus = draw(st.integers(1, 15))
        spec["cloud"].update(gpusPerPod=gpus, tensorParallel=draw(st.integers(gpus + 1, 16)))
        return Case("impossible combination", m, "tensorParallel")
    if which == "dup":
        copies = draw(st.integers(2, 4))
        spec["edge"]["variants"] = [copy.deepcopy(spec["edge"]["variants"][0]) for _ in range(copies)]
        return Case("impossible combination", m, "name")
    if which == "edge-only":
        spec["routing"]["policy"] = "edge-only"
        spec["edge"]["variants"] = []
        return Case("impossible combination", m, "variants")
    if which == "no-cloud":
        spec["routing"]["policy"] = draw(st.sampled_from(["cascade", "cloud-only", "speculative"]))
        spec["cloud"]["replicas"] = 0
        del spec["cloud"]["autoscaling"]
        return Case("impossible combination", m, "replicas")
    if which == "autoscale":
        low = draw(st.integers(1, 999))
        tier = draw(st.sampled_from(["cloud", "edge"]))
        target = spec["cloud"] if tier == "cloud" else spec["edge"]["variants"][0]
        target["autoscaling"].update(minReplicas=draw(st.integers(low + 1, 1000)), maxReplicas=low)
        return Case("impossible combination", m, "minReplicas")
    if which == "storage":
        spec["storage"] = {"pvc": {}, "objectStore": {"url": "s3://bucket-a/prefix"}}
        return Case("impossible combination", m, "objectStore")
    if which == "exists":
        spec["cloud"]["tolerations"] = [{"key": "k", "operator": "Exists", "value": draw(st.sampled_from("xyz"))}]
        return Case("impossible combination", m, "Exists")
    if which == "tls-secret":
        spec["security"].update(mtls=False, tlsSecretName="corp-certs")
        return Case("impossible combination", m, "tlsSecretName")
    spec["security"].update(mtls=False, clientTls=True)
    return Case("impossible combination", m, "clientTls")


@st.composite
def not_an_object(draw: st.DrawFn) -> Case:
    m = copy.deepcopy(BASE)
    m["spec"] = draw(st.one_of(st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3)))
    return Case("spec not an object", m, "spec")


def every_field_fault() -> Iterator[Case]:
    """Deterministically, one fault per field path and kind: a wrong type everywhere, both bounds of every
    range, a foreign value for every enum, every required field removed, an unknown field in every object."""
    for path, schema in NODES:
        kind = schema.get("type")
        wrong: Any = {"a": 1} if schema.get("x-kubernetes-int-or-string") else {
            "integer": "many", "number": "lots", "string": ["a"], "boolean": "maybe", "object": 7, "array": "x",
        }[kind]
        yield Case("wrong type", _set(BASE, path, wrong), _field(path))
    for path, schema in RANGED:
        integer = schema["type"] == "integer"
        if "minimum" in schema:
            yield Case("out of range", _set(BASE, path, schema["minimum"] - (1 if integer else 0.5)), _field(path))
        if "maximum" in schema:
            yield Case("out of range", _set(BASE, path, schema["maximum"] + (1 if integer else 0.5)), _field(path))
    for path, _ in ENUMS:
        yield Case("unknown method or enum value", _set(BASE, path, "no-such-value"), _field(path))
    for path, name in REQUIRED:
        yield Case("missing required field", _delete(BASE, path), name)
    for path, _ in OBJECTS:
        yield Case("unknown field", _set(BASE, (*path, "bogusField"), 1), "bogusField")


def bad_manifests() -> st.SearchStrategy[Case]:
    return st.one_of(wrong_type(), missing_field(), out_of_range(), unknown_enum(), bad_string(), unknown_field(),
                     impossible(), not_an_object())


def valid_manifests() -> st.SearchStrategy[dict[str, Any]]:
    """Valid variations of the base (names, replicas, policy), for mixing into a batch."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        m = copy.deepcopy(base())
        spec = m["spec"]
        spec["cloud"]["serving"]["maxBatchSize"] = draw(st.integers(1, 1024))
        spec["edge"]["variants"][0]["replicas"] = draw(st.integers(0, 3))
        spec["routing"]["policy"] = draw(st.sampled_from(["cascade", "speculative", "cloud-only"]))
        return m

    return build()
