"""The chart's CRD is a byte-for-byte copy of the generated deploy/crds one, valid, and installed once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_support import CRD_COPY, REPO, Manifest

pytestmark = pytest.mark.unit


def test_chart_crd_is_a_copy_of_the_generated_one(crd_source: Path) -> None:
    assert CRD_COPY.is_file(), f"{CRD_COPY.relative_to(REPO)} is missing; `make manifests` copies it"
    assert CRD_COPY.read_bytes() == crd_source.read_bytes(), (
        f"{CRD_COPY.relative_to(REPO)} differs from {crd_source.relative_to(REPO)}; run `make manifests`")


def test_chart_ships_exactly_that_crd(chart: Any, crd_source: Path) -> None:
    crds = chart.crds
    assert [c["filename"] for c in crds] == [f"{chart.name}/crds/{crd_source.name}"]
    assert yaml.safe_load(crds[0]["data"]) == yaml.safe_load(crd_source.read_text())


def test_crd_names_the_spec_model_s_kind(crd_source: Path) -> None:
    spec = pytest.importorskip("stratus_operator.spec")
    crd = yaml.safe_load(crd_source.read_text())
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == f"{spec.PLURAL}.{spec.GROUP}"
    assert (crd["spec"]["group"], names["kind"], names["plural"]) == (spec.GROUP, spec.KIND, spec.PLURAL)
    assert tuple(names.get("shortNames", ())) == spec.SHORT_NAMES
    assert [v["name"] for v in crd["spec"]["versions"]] == [spec.VERSION]
    assert crd["spec"]["scope"] == "Namespaced"


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.utils.latest_version()])
def test_crd_is_a_valid_custom_resource_definition(crd_source: Path, version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load(crd_source.read_text()), version, strict=True)


def test_templates_do_not_install_the_crd_a_second_time(default_objects: list[Manifest]) -> None:
    assert [o for o in default_objects if o["kind"] == "CustomResourceDefinition"] == []
