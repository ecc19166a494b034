"""Child names are DNS labels, stable and distinct; hashes are stable; the CRD's name limit is the real one."""

from __future__ import annotations

import re
from typing import Any

import pytest
from bad_manifests import crd_errors
from pydantic import ValidationError
from samples import all_accepted, sample

from stratus_operator.names import (
    DNS_LABEL_MAX,
    MAX_DEPLOYMENT_NAME_LENGTH,
    PORTS,
    VARIANT_NAME_MAX,
    child_name,
    cloud_name,
    edge_name,
    job_name,
    router_name,
    stable_hash,
)
from stratus_operator.placement import ClusterView, NodeView, Resources
from stratus_operator.planner import plan
from stratus_operator.render import RenderOptions, render_cleanup, render_plan
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.unit

LABEL = re.compile(r"^[a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?$")


def test_child_names_are_dns_labels() -> None:
    assert child_name("a", "edge", "b") == "a-edge-b" == edge_name("a", "b")
    long = child_name("x" * 60, "compress", "variant-name", "deadbeef")
    assert len(long) <= 63 and long[-9] == "-"
    assert long != job_name("x" * 60, "variant-namf", "deadbeef")
    assert long == job_name("x" * 60, "variant-name", "deadbeef")


def test_stable_hash_ignores_key_order() -> None:
    assert stable_hash({"a": 1, "b": [2, 3]}) == stable_hash({"b": [2, 3], "a": 1})
    assert stable_hash({"a": 1}, 16) != stable_hash({"a": 2}, 16) and len(stable_hash("x", 16)) == 16


def test_ports_by_role() -> None:
    assert dict(PORTS) == {"grpc": 50051, "http": 8080}


def _children_at_the_limit(name: str) -> list[dict[str, Any]]:
    variant = "v" * VARIANT_NAME_MAX
    m = sample(uid="u", namespace="n" * 63)
    m["metadata"]["name"] = name
    m["spec"]["edge"]["variants"][0]["name"] = variant
    m["spec"]["edge"]["variants"][0]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2}
    m["spec"]["storage"] = {"pvc": {"claimName": "shared"}}
    d = LLMDeployment.from_manifest(m)
    nodes = ClusterView((NodeView("edge", {"stratus.dev/edge": "true"}, (), Resources(8000, 64 * 2**30, 0)),))
    return render_plan(plan(d, nodes, all_accepted(d)), d, RenderOptions()) + render_cleanup(d, RenderOptions())


def test_the_name_limit_keeps_every_child_name_and_label_valid_and_services_unshortened() -> None:
    name = "a" * MAX_DEPLOYMENT_NAME_LENGTH
    objects = _children_at_the_limit(name)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "Job", "ConfigMap", "HorizontalPodAutoscaler"}
    for obj in objects:
        meta = obj["metadata"]
        assert LABEL.match(meta["name"]) and len(meta["name"]) <= DNS_LABEL_MAX, meta["name"]
        for value in meta["labels"].values():
            assert LABEL.match(value) and len(value) <= DNS_LABEL_MAX, value
    services = sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Service")
    # The names the router dials and the docs give: never shortened by a hash at the limit.
    assert services == sorted([cloud_name(name), edge_name(name, "v" * VARIANT_NAME_MAX), router_name(name)])
    assert services == sorted([f"{name}-cloud", f"{name}-edge-{'v' * VARIANT_NAME_MAX}", f"{name}-router"])
    # One more character and the longest Service name would need the hash: the limit is exactly the room left.
    assert len(f"{name}a-edge-{'v' * VARIANT_NAME_MAX}") == DNS_LABEL_MAX + 1


@pytest.mark.parametrize(("name", "ok"), [
    ("smollm2", True), ("a" * MAX_DEPLOYMENT_NAME_LENGTH, True), ("a" * (MAX_DEPLOYMENT_NAME_LENGTH + 1), False),
    ("smollm2.v2", False), ("135m-smol", False), ("Smol", False), ("smol-", False), ("a", True),
])
def test_the_crd_rule_and_the_model_agree_with_the_limit(name: str, ok: bool) -> None:
    manifest = sample()
    manifest["metadata"]["name"] = name
    errors = crd_errors(manifest)
    assert (errors == []) is ok, errors
    if not ok:
        assert any(f"at most {MAX_DEPLOYMENT_NAME_LENGTH} characters" in e for e in errors), errors
        with pytest.raises(ValidationError, match=f"at most {MAX_DEPLOYMENT_NAME_LENGTH} characters"):
            LLMDeployment.from_manifest(manifest)
    else:
        LLMDeployment.from_manifest(manifest)
