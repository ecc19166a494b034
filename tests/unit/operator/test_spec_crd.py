"""One source of truth: the spec model, the generated CRD (committed and fresh) and the samples agree."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from stratus_operator.crd import CRD_PATH, build_crd, main, render_crd_yaml
from stratus_operator.spec import CloudTier, LLMDeployment, LLMDeploymentSpec
from stratus_workers.router.config import Policy

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = sorted((ROOT / "deploy" / "samples").glob("*.yaml"))


def openapi() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def validate_with_crd(manifest: dict[str, Any]) -> None:
    # OpenAPI v3.0 (as Kubernetes uses it) reads like JSON Schema draft 4: boolean exclusiveMinimum.
    jsonschema.Draft4Validator(openapi()).validate(manifest)


def test_committed_crd_is_fresh() -> None:
    assert (ROOT / CRD_PATH).read_text() == render_crd_yaml(), "run `make manifests`"


def test_check_mode(tmp_path: Path) -> None:
    out = tmp_path / "crd.yaml"
    assert main(["--out", str(out)]) == 0
    assert main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "# edited\n")
    assert main(["--out", str(out), "--check"]) == 1


def test_crd_shape() -> None:
    crd = build_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "llmdeployments.stratus.dev"
    assert spec["group"] == "stratus.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "LLMDeployment" and spec["names"]["shortNames"] == ["llmd"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    assert [(c["name"], c["jsonPath"]) for c in version["additionalPrinterColumns"]] == [
        ("Phase", ".status.phase"), ("Policy", ".spec.routing.policy"), ("Edge", ".status.edge.summary"),
        ("Cloud", ".status.cloud.summary"), ("Age", ".metadata.creationTimestamp")]


def _walk(node: dict[str, Any], path: str = "") -> list[str]:
    """Structural-schema violations: every node typed (or int-or-string), no refs or unions."""
    problems = []
    for bad in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"):
        if bad in node:
            problems.append(f"{path}: {bad}")
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    for name, child in node.get("properties", {}).items():
        problems += _walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        problems += _walk(node["items"], f"{path}[]")
    return problems


def test_schema_is_structural() -> None:
    assert _walk(openapi()) == []


def test_defaults_and_ranges_come_from_the_model() -> None:
    props = openapi()["properties"]["spec"]["properties"]
    cloud = props["cloud"]["properties"]
    assert cloud["replicas"]["default"] == CloudTier.model_fields["replicas"].default == 1
    assert cloud["dtype"]["enum"] == ["auto", "float32", "bfloat16"]
    assert props["routing"]["properties"]["policy"]["enum"] == list(get_args(Policy))
    variant = props["edge"]["properties"]["variants"]["items"]["properties"]
    # The compression recipe is the workers' own type, embedded: its enums and ranges appear here too.
    quant = variant["compression"]["properties"]["quantization"]["properties"]["method"]
    assert "int8-weight" in quant["enum"]
    assert variant["gate"]["properties"]["maxPerplexityIncrease"]["minimum"] == 0.0
    assert props["edge"]["properties"]["variants"]["x-kubernetes-list-type"] == "map"
    rules = [r["rule"] for r in props["cloud"]["x-kubernetes-validations"]]
    assert "self.gpusPerPod == 0 || self.tensorParallel <= self.gpusPerPod" in rules


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_validate_against_model_and_crd(sample: Path) -> None:
    for doc in yaml.safe_load_all(sample.read_text()):
        if not doc or doc.get("kind") != "LLMDeployment":
            continue
        LLMDeployment.from_manifest(doc)
        validate_with_crd(doc)


def _sample() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(("path", "value", "crd_rejects"), [
    (("spec", "cloud", "replicas"), -1, True),
    (("spec", "cloud", "dtype"), "float8", True),
    (("spec", "routing", "policy"), "random", True),
    (("spec", "edge", "variants", 0, "name"), "Int_8", True),
    (("spec", "edge", "variants", 0, "gate", "maxPerplexityIncrease"), -0.5, True),
    (("spec", "edge", "variants", 0, "compression", "quantization", "method"), "int3", True),
    (("spec", "cloud", "resources"), {"requests": {"cpu": "lots"}}, True),
    (("spec", "model", "source"), "", True),
    (("spec", "storage"), {"objectStore": {"url": "http://not-s3"}}, True),
])
def test_nonsense_is_rejected_by_model_and_crd(path: tuple[Any, ...], value: Any, crd_rejects: bool) -> None:
    doc = _sample()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValidationError):
        LLMDeployment.from_manifest(doc)
    if crd_rejects:
        with pytest.raises(jsonschema.ValidationError):
            validate_with_crd(doc)


@pytest.mark.parametrize(("change", "message"), [
    ({"cloud": {"gpusPerPod": 1, "tensorParallel": 2}}, "tensorParallel cannot exceed gpusPerPod"),
    ({"routing": {"policy": "edge-only"}, "edge": {"variants": []}}, "edge-only needs at least one edge variant"),
    ({"cloud": {"replicas": 0}}, "need cloud replicas"),
    ({"cloud": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}}, "minReplicas must not exceed maxReplicas"),
    ({"storage": {"pvc": {}, "objectStore": {"url": "s3://bucket-a/x"}}}, "set pvc or objectStore, not both"),
    ({"cloud": {"tolerations": [{"operator": "Exists", "value": "x"}]}}, "operator Exists takes no value"),
    ({"edge": {"variants": [{"name": "g", "device": "cuda", "compression": {"quantization": {"method": "gguf"}}}]}},
     "a gguf variant is served by llama.cpp on the CPU"),
])
def test_cel_rules_are_mirrored_by_the_model(change: dict[str, Any], message: str) -> None:
    """Each CEL rule in the CRD has a pydantic twin with the same message (the local runner has no API server)."""
    doc = _sample()
    for key, value in change.items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ValidationError, match=message):
        LLMDeploymentSpec.model_validate(doc["spec"])
    crd_text = render_crd_yaml()
    assert message in crd_text


def test_unknown_fields_are_rejected_by_the_model() -> None:
    doc = _sample()
    doc["spec"]["cloud"]["replica"] = 2
    with pytest.raises(ValidationError, match="replica"):
        LLMDeployment.from_manifest(doc)


def test_defaults_fill_a_minimal_spec() -> None:
    d = LLMDeployment.from_manifest({"metadata": {"name": "m"}, "spec": {"model": {"source": "bundled://smollm2-135m-instruct"}}})
    assert d.spec.cloud.replicas == 1 and d.spec.routing.policy == "cascade" and d.spec.edge.variants == []
    assert d.metadata.namespace == "default"
    dumped = d.spec.model_dump(by_alias=True, mode="json")
    assert dumped["cloud"]["serving"]["maxBatchSize"] == 8
    again = LLMDeploymentSpec.model_validate(copy.deepcopy(dumped))
    assert again == d.spec


def test_from_body_reads_what_kopf_hands_over() -> None:
    body = {**_sample(), "metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 7,
                                      "resourceVersion": "12"}, "status": {"phase": "Ready"}}
    d = LLMDeployment.from_body(body)
    assert (d.metadata.name, d.metadata.namespace, d.metadata.uid, d.metadata.generation) == ("m", "ns", "u", 7)
    assert d.status is None  # the operator's own status is not an input
    assert LLMDeployment.from_body({**body, "metadata": {"name": "m"}}).metadata.namespace == "default"
    with pytest.raises(ValidationError, match=r"spec\.model\n  Field required"):
        LLMDeployment.from_body({"metadata": {"name": "m"}, "spec": "not an object"})


def test_an_unknown_bundled_model_is_named() -> None:
    doc = _sample()
    doc["spec"]["model"]["source"] = "bundled://gpt-5"
    with pytest.raises(ValidationError, match="unknown bundled model 'gpt-5'; bundled models: smollm2-135m-instruct"):
        LLMDeployment.from_manifest(doc)


def test_edge_defaults_fill_variants_that_set_none() -> None:
    doc = _sample()
    del doc["spec"]["edge"]["variants"][0]["nodeSelector"]
    tolerations = [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]
    d = LLMDeployment.from_manifest(doc).with_edge_defaults(node_selector={"node-role/edge": "yes"},
                                                            tolerations=tolerations)
    variant = d.spec.edge.variants[0]
    assert variant.node_selector == {"node-role/edge": "yes"} and variant.tolerations[0].key == "edge"
    # A variant's own selector wins over the cluster default.
    own = LLMDeployment.from_manifest(_sample()).with_edge_defaults(node_selector={"x": "y"}, tolerations=())
    assert own.spec.edge.variants[0].node_selector == {"stratus.dev/edge": "true"}
    plain = LLMDeployment.from_manifest(_sample())
    assert plain.with_edge_defaults(node_selector={}, tolerations=()) is plain
