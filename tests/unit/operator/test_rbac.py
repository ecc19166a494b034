"""The RBAC rules against the code: every rendered kind and every kopf registration is granted."""

from __future__ import annotations

import pytest
from samples import all_accepted, sample

from stratus_operator.kube import CHILD_RESOURCES, CHILDREN, DISCOVERY_ONLY, NAMESPACE_PATTERNS_ONLY, RESOURCES
from stratus_operator.placement import ClusterView
from stratus_operator.planner import plan
from stratus_operator.rbac import (
    NAMED_NAMESPACES_RULES,
    NAMESPACE_PATTERNS_RULES,
    REQUIRED_RULES,
    cluster_role,
    rules_for,
)
from stratus_operator.render import RenderOptions, render_plan
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.unit


def _rule_allows(group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in REQUIRED_RULES)


def test_rbac_covers_every_rendered_kind() -> None:
    m = sample(uid="u")
    m["spec"]["cloud"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2}  # an HPA and a PDB
    d = LLMDeployment.from_manifest(m)
    objects = render_plan(plan(d, ClusterView.local(), all_accepted(d)), d, RenderOptions())
    kinds = {(o["apiVersion"], o["kind"]) for o in objects}
    assert kinds == set(CHILD_RESOURCES) == {(r.api_version, r.kind) for r in CHILDREN}
    for api_version, kind in kinds:
        res = CHILD_RESOURCES[(api_version, kind)]
        # Indexed (list, watch), created (or applied: patch), pruned (delete); never read one by one.
        for verb in ("list", "watch", "create", "delete"):
            assert _rule_allows(res.group, res.plural, verb), (kind, verb)
        assert _rule_allows(res.group, res.plural, "patch") is (kind not in ("Job", "PersistentVolumeClaim"))


def test_rbac_covers_every_kopf_registration() -> None:
    import kopf

    import stratus_operator.main  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    watched = set()
    for handlers in (registry._indexing, registry._watching, registry._changing, registry._spawning):
        for handler in handlers.get_all_handlers():
            selector = handler.selector
            assert selector is not None
            watched.add((selector.group or "", str(selector.plural or selector.any_name or "")))
    assert ("stratus.dev", "llmdeployments") in watched and ("", "nodes") in watched
    for group, plural in watched:
        for verb in ("list", "watch"):
            assert _rule_allows(group, plural, verb), (group, plural, verb)
    # kopf patches finalizers and annotations on the custom resource, and posts Events.
    assert _rule_allows("stratus.dev", "llmdeployments", "patch")
    assert _rule_allows("stratus.dev", "llmdeployments/status", "patch")
    assert _rule_allows("", "events", "create")


def test_rbac_is_derived_from_the_client_registry() -> None:
    assert len(REQUIRED_RULES) == len(RESOURCES) - len(NAMESPACE_PATTERNS_ONLY)
    assert len(NAMESPACE_PATTERNS_RULES) == len(RESOURCES)
    # kopf watches CRDs (a 403 at every start without it) and needs nothing of the verbs nobody calls.
    assert _rule_allows("apiextensions.k8s.io", "customresourcedefinitions", "watch")
    for group, resource, verb in (("", "events", "patch"), ("batch", "jobs", "patch"), ("", "pods", "get"),
                                  ("", "nodes", "get"), ("stratus.dev", "llmdeployments/status", "get"),
                                  ("", "namespaces", "list"), ("", "secrets", "list")):
        assert not _rule_allows(group, resource, verb), (group, resource, verb)
    assert cluster_role()["rules"] == REQUIRED_RULES
    assert sorted(REQUIRED_RULES, key=lambda r: (r["apiGroups"][0], r["resources"][0])) == REQUIRED_RULES


def test_exact_names_drop_only_what_kopfs_discovery_calls() -> None:
    """Exact names turn discovery off (handle_startup_operator): no namespaces, no CRDs, everything else kept."""
    assert len(NAMED_NAMESPACES_RULES) == len(RESOURCES) - len(DISCOVERY_ONLY)
    resources = {(g, r) for rule in NAMED_NAMESPACES_RULES for g in rule["apiGroups"] for r in rule["resources"]}
    assert ("", "namespaces") not in resources
    assert ("apiextensions.k8s.io", "customresourcedefinitions") not in resources
    assert [r for r in REQUIRED_RULES if r not in NAMED_NAMESPACES_RULES] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}]
    assert rules_for(()) == REQUIRED_RULES
    assert rules_for(("team-a", "team-b")) == NAMED_NAMESPACES_RULES
    for patterns in (("team-*",), ("team-a", "!team-b")):
        assert rules_for(patterns) == NAMESPACE_PATTERNS_RULES
