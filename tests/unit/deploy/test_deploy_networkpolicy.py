"""The chart's NetworkPolicy selects the pods the operator actually renders: servers closed, router let in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import DEPLOY_DIR, Manifest, Render

from stratus_operator.placement import ClusterView
from stratus_operator.planner import CompressionResult, plan
from stratus_operator.render import RenderOptions, render_plan
from stratus_operator.spec import LLMDeployment
from stratus_workers.compress.spec import CompressionSummary

pytestmark = pytest.mark.unit


SAMPLE_NAMESPACE = "team-a"


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and In/NotIn/Exists/DoesNotExist expressions) against pod labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {
            "In": present and value in expr.get("values", []),
            "NotIn": not present or value not in expr.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expr["operator"]]
        if not ok:
            return False
    return True


def _rendered_pods(sample: Path) -> dict[str, Manifest]:
    """component label -> pod template, for the sample planned on one machine with its variants accepted."""
    manifest = yaml.safe_load(sample.read_text())
    manifest["metadata"].update(namespace=SAMPLE_NAMESPACE, uid="0000-test")
    deployment = LLMDeployment.from_manifest(manifest)
    results = {v.name: CompressionResult(CompressionSummary(name=v.name, status="accepted", size_bytes=150 * 2**20))
               for v in deployment.spec.edge.variants}
    p = plan(deployment, ClusterView.local(), results)
    pods: dict[str, Manifest] = {}
    for obj in render_plan(p, deployment, RenderOptions()):
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]
            pods[template["metadata"]["labels"]["app.kubernetes.io/component"]] = template
    return pods


@pytest.fixture(scope="module")
def model_server_policy(render: Render) -> Manifest:
    objects = render({"networkPolicy": {"namespaces": [SAMPLE_NAMESPACE]}})
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == SAMPLE_NAMESPACE]
    return policy


def test_servers_take_grpc_only_from_the_router(model_server_policy: Manifest) -> None:
    pods = _rendered_pods(DEPLOY_DIR / "samples" / "smollm2.yaml")
    assert {"cloud-server", "edge-server", "router"} <= set(pods)
    policy = model_server_policy["spec"]
    grpc_rule, http_rule = policy["ingress"]
    for component in ("cloud-server", "edge-server"):
        labels = pods[component]["metadata"]["labels"]
        assert matches(policy["podSelector"], labels), f"the policy does not cover {component} pods"
        ports = {p["name"] for c in pods[component]["spec"]["containers"] for p in c.get("ports", [])}
        # Named ports in the policy must exist on the pod, or the rule silently allows nothing.
        assert {p["port"] for p in grpc_rule["ports"] + http_rule["ports"]} <= ports
    router_labels = pods["router"]["metadata"]["labels"]
    assert not matches(policy["podSelector"], router_labels), "the router itself must stay reachable by clients"
    (peer,) = grpc_rule["from"]
    assert matches(peer["podSelector"], router_labels)
    for component in ("cloud-server", "edge-server"):
        assert not matches(peer["podSelector"], pods[component]["metadata"]["labels"])
    assert "from" not in http_rule  # probes and Prometheus reach /healthz, /readyz, /metrics


def test_deploy_policy_is_the_chart_s(model_server_policy: Manifest) -> None:
    deployed = {d["metadata"]["name"]: d for d in
                yaml.safe_load_all((DEPLOY_DIR / "networkpolicy" / "networkpolicy.yaml").read_text())}
    assert deployed["stratus-model-servers"]["spec"] == model_server_policy["spec"]


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "c", "operator": "In", "values": ["x", "y"]}]}, {"c": "y"}, True),
        ({"matchExpressions": [{"key": "c", "operator": "In", "values": ["x"]}]}, {}, False),
        ({"matchExpressions": [{"key": "c", "operator": "NotIn", "values": ["x"]}]}, {}, True),
        ({"matchExpressions": [{"key": "c", "operator": "DoesNotExist"}]}, {"c": "x"}, False),
    ],
)
def test_selector_matching(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert matches(selector, labels) is expected


def _rendered(options: RenderOptions) -> list[Manifest]:
    manifest = yaml.safe_load((DEPLOY_DIR / "samples" / "smollm2.yaml").read_text())
    manifest["metadata"].update(namespace=SAMPLE_NAMESPACE, uid="0000-test")
    deployment = LLMDeployment.from_manifest(manifest)
    results = {v.name: CompressionResult(CompressionSummary(name=v.name, status="accepted", size_bytes=150 * 2**20))
               for v in deployment.spec.edge.variants}
    return render_plan(plan(deployment, ClusterView.local(), results), deployment, options)


def test_each_deployment_gets_a_policy_where_only_its_router_reaches_its_servers() -> None:
    objects = _rendered(RenderOptions())
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["name"] == "smollm2-servers" and policy["metadata"]["namespace"] == SAMPLE_NAMESPACE
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "0000-test"
    spec = policy["spec"]
    pods = {o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]["template"]
            for o in objects if o["kind"] == "Deployment"}
    grpc_rule, http_rule = spec["ingress"]
    (peer,) = grpc_rule["from"]
    for component in ("cloud-server", "edge-server"):
        assert matches(spec["podSelector"], pods[component]["metadata"]["labels"]), component
        assert not matches(peer["podSelector"], pods[component]["metadata"]["labels"])
        ports = {p["name"] for c in pods[component]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["port"] for p in grpc_rule["ports"] + http_rule["ports"]} <= ports
    assert not matches(spec["podSelector"], pods["router"]["metadata"]["labels"])
    assert matches(peer["podSelector"], pods["router"]["metadata"]["labels"])
    # Another deployment's router (same namespace) is not this one's.
    other = {**pods["router"]["metadata"]["labels"], "app.kubernetes.io/instance": "other"}
    assert not matches(peer["podSelector"], other)
    assert "from" not in http_rule
    # The router gets a policy of its own only when its callers are narrowed; none at all when switched off.
    peers = ({"namespaceSelector": {"matchLabels": {"team": "apps"}}},)
    router = [o for o in _rendered(RenderOptions(router_ingress_from=peers)) if o["kind"] == "NetworkPolicy"
              and o["metadata"]["name"] == "smollm2-router"]
    assert router and router[0]["spec"]["ingress"][0]["from"] == [dict(peers[0])]
    assert matches(router[0]["spec"]["podSelector"], pods["router"]["metadata"]["labels"])
    assert not [o for o in _rendered(RenderOptions(network_policies=False)) if o["kind"] == "NetworkPolicy"]
