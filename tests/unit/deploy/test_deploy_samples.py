"""Every deploy/samples/*.yaml is a valid LLMDeployment, and each routing policy has its own sample."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_support import DEPLOY_DIR

pytestmark = pytest.mark.unit

SAMPLES = sorted((DEPLOY_DIR / "samples").glob("*.yaml"))
# The three basic policies each have a sample named after them (speculative has its own).
POLICY_SAMPLES = {"cloud-only": "cloud-only.yaml", "edge-only": "edge-only.yaml", "cascade": "cascade.yaml"}


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.name}: one LLMDeployment per sample file"
    loaded: dict[str, Any] = docs[0]
    return loaded


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_sample_is_a_valid_llmdeployment(sample: Path) -> None:
    spec = pytest.importorskip("stratus_operator.spec", reason="the operator's spec model is not written yet")
    deployment = spec.LLMDeployment.from_manifest(_load(sample))
    assert deployment.metadata.name


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_sample_passes_the_crd_schema(sample: Path, crd_source: Path) -> None:
    """What `kubectl apply` checks (less the CEL rules): the CRD's OpenAPI schema for spec."""
    crd = yaml.safe_load(crd_source.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    manifest = _load(sample)
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    assert manifest["kind"] == crd["spec"]["names"]["kind"]
    # Kubernetes schemas are OpenAPI 3.0: draft-4 semantics (boolean exclusiveMinimum, ...).
    errors = [f"spec.{'.'.join(map(str, e.absolute_path))}: {e.validator} {e.validator_value!r} failed"
              for e in jsonschema.Draft4Validator(schema["properties"]["spec"]).iter_errors(manifest["spec"])]
    assert errors == [], f"{sample.name} fails the CRD schema"


def _router_policies() -> tuple[str, ...]:
    config = pytest.importorskip("stratus_workers.router.config")
    return tuple(typing.get_args(config.Policy))


def test_every_router_policy_has_a_sample() -> None:
    used = {_load(s)["spec"].get("routing", {}).get("policy", "cascade") for s in SAMPLES}
    assert set(_router_policies()) - used == set()
    assert set(POLICY_SAMPLES) <= set(_router_policies())


@pytest.mark.parametrize(("policy", "filename"), POLICY_SAMPLES.items())
def test_policy_samples_have_the_tiers_their_policy_needs(policy: str, filename: str) -> None:
    manifest = _load(DEPLOY_DIR / "samples" / filename)
    assert manifest["spec"]["routing"]["policy"] == policy
    variants = manifest["spec"].get("edge", {}).get("variants", [])
    cloud_replicas = manifest["spec"].get("cloud", {}).get("replicas", 1)
    if policy == "cloud-only":
        assert not variants
    elif policy == "edge-only":
        assert variants and cloud_replicas == 0
    else:
        assert variants and cloud_replicas > 0


def test_main_sample_is_the_cascade_with_an_int8_variant() -> None:
    manifest = _load(DEPLOY_DIR / "samples" / "smollm2.yaml")
    assert manifest["spec"]["routing"]["policy"] == "cascade"
    assert [v["name"] for v in manifest["spec"]["edge"]["variants"]] == ["int8"]


def test_samples_can_share_a_namespace() -> None:
    names = [_load(s)["metadata"]["name"] for s in SAMPLES]
    assert len(names) == len(set(names)), names
    assert all("namespace" not in _load(s)["metadata"] for s in SAMPLES), "samples go where kubectl -n puts them"
