"""The chart's and deploy/'s RBAC grant exactly stratus_operator.rbac's rules for their mode: no more, no less."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import CHART_DIR, DEPLOY_DIR, NAMESPACE, RELEASE, Manifest, Render, load_all

pytestmark = pytest.mark.unit

rbac = pytest.importorskip("stratus_operator.rbac", reason="the operator's RBAC rules are not written yet")
kube = pytest.importorskip("stratus_operator.kube")
config_module = pytest.importorskip("stratus_operator.config")

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


def test_exact_names_get_roles_and_only_nodes_cluster_wide(render: Render) -> None:
    watched = ["team-a", "team-b"]
    objects = render({"watchNamespaces": watched})
    named: list[dict[str, Any]] = rbac.NAMED_NAMESPACES_RULES
    assert rbac.rules_for(watched) == named
    roles = _only(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == watched
    cluster_scoped = _cluster_scoped()
    for role in roles:
        assert grants(role["rules"]) == {g for g in grants(named) if g[1] not in cluster_scoped}
    (cluster_role,) = _only(objects, "ClusterRole")
    # kopf's discovery is off for exact names: nothing lists or watches namespaces or CRDs, only nodes remain.
    assert grants(cluster_role["rules"]) == {("", "nodes", "list"), ("", "nodes", "watch")}
    bindings = _only(objects, "RoleBinding")
    assert sorted((b["metadata"]["namespace"], b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings) == [
        ("team-a", "Role", "stratus-operator"), ("team-b", "Role", "stratus-operator")]
    (cluster_binding,) = _only(objects, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    for binding in [*bindings, cluster_binding]:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "stratus-operator",
                                        "namespace": NAMESPACE}]
    # Every grant is given somewhere, and nothing else is.
    union = set().union(*(grants(r["rules"]) for r in [*roles, cluster_role]))
    assert union == grants(named)
    dropped = grants(_required()) - union
    assert dropped == {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                       ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
    assert not {g for g in union if g[1] == "namespaces"}


def _schema_free_chart(tmp: Path) -> Any:
    """The chart without values.schema.json, which refuses patterns before a template sees them: Helm then
    evaluates the templates' own decision (as `helm install --skip-schema-validation` would)."""
    import helm_python as helm

    copy = tmp / "stratus"
    shutil.copytree(CHART_DIR, copy)
    (copy / "values.schema.json").unlink()
    return helm.Chart.load(copy)


NAMESPACE_EXAMPLES = [
    [], ["team-a"], ["team-a", "team-b"], ["prod.eu"], ["team-*"], ["team-?"], ["team-[ab]"], ["!kube-system"],
    ["team-a", "team-*"], ["team-a", "!team-b"], ["a*b"],
]


@pytest.mark.parametrize("watched", NAMESPACE_EXAMPLES, ids=lambda w: ",".join(w) or "cluster")
def test_the_chart_decides_the_mode_as_the_operator_does(watched: list[str], render: Render,
                                                         tmp_path: Path) -> None:
    """The chart's exact-names test and Config.named_namespaces_only agree; the operator's view is the
    STRATUS_NAMESPACES the chart hands it, and the chart grants exactly rbac.rules_for() of it."""
    import helm_python as helm

    with _schema_free_chart(tmp_path) as chart:
        def objects(values: dict[str, Any], template: str = "") -> list[Manifest]:
            rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            return [o for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
                    and path.endswith(template) for o in load_all(text)]

        # Without RBAC the chart renders any list; the operator reads it from the Deployment's environment.
        (deployment,) = objects({"watchNamespaces": watched, "rbac": {"create": False}}, "/deployment.yaml")
        env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        config = config_module.Config.from_env({"STRATUS_NAMESPACES": env["STRATUS_NAMESPACES"]})
        if config.namespaces and not config.named_namespaces_only:
            with pytest.raises(helm.HelmRenderError, match=r"holds a pattern .*list namespaces by name"):
                objects({"watchNamespaces": watched})
            with pytest.raises(helm.HelmValuesError, match="at '/watchNamespaces/"):
                render({"watchNamespaces": watched})  # the real chart's schema refuses it first
            return
        rendered = objects({"watchNamespaces": watched})
    roles = _only(rendered, "Role")
    assert bool(roles) is config.named_namespaces_only
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(config.namespaces)
    union = set().union(*(grants(r["rules"]) for r in roles + _only(rendered, "ClusterRole")))
    assert union == grants(rbac.rules_for(config.namespaces))


def test_the_charts_rules_template_is_generated_from_the_operator() -> None:
    assert (CHART_DIR / "templates" / "_rules.tpl").read_text() == rbac.render_rules_tpl(), "run `make manifests`"


def test_deploy_cluster_role_is_exactly_the_required_rules() -> None:
    objects = list(yaml.safe_load_all((DEPLOY_DIR / "operator" / "rbac.yaml").read_text()))
    (role,) = _only(objects, "ClusterRole")
    assert _normalised(role["rules"]) == _normalised(_required())


def test_nothing_is_granted_by_wildcard() -> None:
    for grant in grants(_required()):
        assert "*" not in grant, grant
