"""`kubectl kustomize deploy/` installs the same objects as the chart's default render, locked down the same way."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_support import NAMESPACE, Manifest, assert_locked_down, key, pod_templates

pytestmark = pytest.mark.unit

# Labels only Helm puts on objects; kustomize's copies carry the rest.
HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by"}
# Helm creates the release namespace itself (--create-namespace); kustomize ships it, labelled.
KUSTOMIZE_ONLY = {("Namespace", "", NAMESPACE)}


def _strip_helm_labels(labels: dict[str, str] | None) -> None:
    for name in HELM_ONLY_LABELS:
        (labels or {}).pop(name, None)


def normalise(obj: Manifest) -> Manifest:
    out = copy.deepcopy(obj)
    _strip_helm_labels(out["metadata"].get("labels"))
    if "rules" in out:  # RBAC rule order means nothing
        out["rules"].sort(key=lambda rule: (rule["apiGroups"], rule["resources"]))
    template = out.get("spec", {}).get("template")
    if isinstance(template, dict):
        _strip_helm_labels(template.get("metadata", {}).get("labels"))
    return out


@pytest.fixture(scope="module")
def chart_install(chart: Any, default_objects: list[Manifest]) -> dict[tuple[str, str, str], Manifest]:
    """What `helm install` creates with default values: crds/ first, then the templates."""
    crds = [yaml.safe_load(c["data"]) for c in chart.crds]
    return {key(o): normalise(o) for o in [*crds, *default_objects]}


@pytest.fixture(scope="module")
def kustomize_install(kustomize_objects: list[Manifest]) -> dict[tuple[str, str, str], Manifest]:
    return {key(o): normalise(o) for o in kustomize_objects}


def test_same_objects(chart_install: dict[Any, Manifest], kustomize_install: dict[Any, Manifest]) -> None:
    assert set(kustomize_install) - set(chart_install) == KUSTOMIZE_ONLY
    assert set(chart_install) - set(kustomize_install) == set()


def test_same_content(chart_install: dict[Any, Manifest], kustomize_install: dict[Any, Manifest]) -> None:
    for ident, obj in chart_install.items():
        assert kustomize_install[ident] == obj, f"{ident} differs between deploy/ and the chart"


def test_namespace_enforces_restricted_pod_security(kustomize_install: dict[Any, Manifest]) -> None:
    namespace = kustomize_install[("Namespace", "", NAMESPACE)]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_kustomize_object_is_valid_and_locked_down(kustomize_objects: list[Manifest]) -> None:
    for obj in kustomize_objects:
        kubernetes_validate.validate(obj, "1.29.0", strict=True)
    pods = pod_templates(kustomize_objects)
    assert pods
    for name, pod in pods:
        assert_locked_down(name, pod)
