"""The chart's and deploy/'s RBAC grant exactly stratus_operator.rbac.REQUIRED_RULES: no more, no less."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from chart_support import DEPLOY_DIR, NAMESPACE, Manifest, Render

pytestmark = pytest.mark.unit

rbac = pytest.importorskip("stratus_operator.rbac", reason="the operator's RBAC rules are not written yet")
kube = pytest.importorskip("stratus_operator.kube")

Grant = tuple[str, str, str]


def grants(rules: list[dict[str, Any]]) -> set[Grant]:
    """(apiGroup, resource, verb) triples: what a rule list allows, whatever its grouping."""
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def _normalised(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(({k: sorted(v) for k, v in rule.items()} for rule in rules),
                  key=lambda r: (r["apiGroups"], r["resources"]))


def _cluster_scoped() -> set[str]:
    return {r.plural for r in kube.RESOURCES if not r.namespaced}


def _required() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = rbac.REQUIRED_RULES
    assert rules, "REQUIRED_RULES is empty"
    return rules


def _only(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def test_cluster_role_is_exactly_the_required_rules(default_objects: list[Manifest]) -> None:
    (role,) = _only(default_objects, "ClusterRole")
    assert _normalised(role["rules"]) == _normalised(_required())
    (binding,) = _only(default_objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "stratus-operator", "namespace": NAMESPACE}]
    assert not _only(default_objects, "Role")


def test_namespaced_mode_splits_the_same_rules_and_adds_namespaces(render: Render) -> None:
    watched = ["team-a", "team-b"]
    objects = render({"watchNamespaces": watched})
    roles = _only(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == watched
    cluster_scoped = _cluster_scoped()
    namespaced_mode: list[dict[str, Any]] = rbac.NAMESPACED_MODE_RULES
    for role in roles:
        assert grants(role["rules"]) == {g for g in grants(namespaced_mode) if g[1] not in cluster_scoped}
    (cluster_role,) = _only(objects, "ClusterRole")
    assert grants(cluster_role["rules"]) == {g for g in grants(namespaced_mode) if g[1] in cluster_scoped}
    # kopf lists and watches namespaces only in this mode; cluster-wide, nothing grants them.
    assert {("", "namespaces", "list"), ("", "namespaces", "watch")} <= grants(cluster_role["rules"])
    assert not {g for g in grants(_required()) if g[1] == "namespaces"}
    bindings = _only(objects, "RoleBinding")
    assert sorted((b["metadata"]["namespace"], b["roleRef"]["kind"]) for b in bindings) == [
        ("team-a", "Role"), ("team-b", "Role")]
    # Every grant is given somewhere, and nothing else is.
    union = set().union(*(grants(r["rules"]) for r in [*roles, cluster_role]))
    assert union == grants(namespaced_mode)


def test_the_charts_rules_template_is_generated_from_the_operator() -> None:
    from chart_support import CHART_DIR

    assert (CHART_DIR / "templates" / "_rules.tpl").read_text() == rbac.render_rules_tpl(), "run `make manifests`"


def test_deploy_cluster_role_is_exactly_the_required_rules() -> None:
    objects = list(yaml.safe_load_all((DEPLOY_DIR / "operator" / "rbac.yaml").read_text()))
    (role,) = _only(objects, "ClusterRole")
    assert _normalised(role["rules"]) == _normalised(_required())


def test_nothing_is_granted_by_wildcard() -> None:
    for grant in grants(_required()):
        assert "*" not in grant, grant
