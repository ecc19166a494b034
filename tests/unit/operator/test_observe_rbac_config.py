"""Reading Jobs and Deployments, the RBAC rules against the code, the Config, the CLI registration."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from stratus_operator.cli import build_parser
from stratus_operator.config import Config
from stratus_operator.kube import CHILD_KINDS, RESOURCES
from stratus_operator.observe import job_result, ready_replicas, termination_message
from stratus_operator.planner import ClusterView, CompressionResult, plan, render
from stratus_operator.rbac import REQUIRED_RULES, cluster_role
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
SUMMARY = json.dumps({"name": "int8", "status": "accepted", "reasons": [], "bytes": 1000, "perplexityIncrease": 0.01})


def job(*conditions: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {"spec": {"backoffLimit": 0}, "status": {"conditions": list(conditions), **status}}


COMPLETE = {"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T11:00:00Z"}
FAILED = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too slow",
          "lastTransitionTime": "2026-01-01T11:59:50Z"}


def test_running_job_has_no_result() -> None:
    assert job_result(job(), None, variant="int8", spec_hash="h") is None
    assert job_result(job({"type": "Complete", "status": "False"}), SUMMARY, variant="int8", spec_hash="h") is None


def test_complete_job_with_summary() -> None:
    r = job_result(job(COMPLETE), SUMMARY, variant="int8", spec_hash="h", now=NOW)
    assert r is not None and r.accepted and r.size_bytes == 1000 and r.spec_hash == "h"


def test_missing_message_waits_then_fails() -> None:
    recent = {**COMPLETE, "lastTransitionTime": "2026-01-01T11:59:55Z"}
    assert job_result(job(recent), None, variant="int8", spec_hash="h", now=NOW) is None
    late = job_result(job(COMPLETE), None, variant="int8", spec_hash="h", now=NOW)
    assert late is not None and late.status == "failed" and late.failure_reason == "NoSummary"


def test_failed_job_keeps_its_reason_or_is_a_gate_verdict() -> None:
    r = job_result(job(FAILED), "Traceback...\nMemoryError", variant="int8", spec_hash="h", now=NOW)
    assert r is not None and r.status == "failed" and r.failure_reason == "DeadlineExceeded"
    assert "too slow" in r.reasons[0] and "MemoryError" in r.reasons[0]
    rejected = json.dumps({"name": "int8", "status": "rejected", "reasons": ["ppl +9%"]})
    verdict = job_result(job(FAILED), rejected, variant="int8", spec_hash="h", now=NOW)
    assert verdict is not None and verdict.status == "rejected" and verdict.reasons == ("ppl +9%",)
    crashed = json.dumps({"name": "int8", "status": "failed", "reasons": ["RuntimeError: boom"]})
    r2 = job_result(job(failed=1), crashed, variant="int8", spec_hash="h", now=NOW)
    assert r2 is not None and r2.failure_reason == "BackoffLimitExceeded" and "boom" in r2.reasons[0]


def test_termination_message_from_init_or_main_container() -> None:
    terminated = {"name": "compress", "state": {"terminated": {"exitCode": 0, "message": SUMMARY}}}
    assert termination_message({"status": {"containerStatuses": [terminated]}}) == SUMMARY
    assert termination_message({"status": {"initContainerStatuses": [terminated],
                                           "containerStatuses": [{"name": "upload", "state": {}}]}}) == SUMMARY
    assert termination_message({"status": {"containerStatuses": [{"name": "compress", "state": {"running": {}}}]}}) \
        is None


def test_ready_replicas_waits_for_the_controller_to_see_the_spec() -> None:
    assert ready_replicas({"metadata": {"generation": 2}, "status": {"observedGeneration": 1,
                                                                      "readyReplicas": 3}}) == 0
    assert ready_replicas({"metadata": {"generation": 2}, "status": {"observedGeneration": 2,
                                                                      "readyReplicas": 3}}) == 3
    assert ready_replicas({}) == 0


def _rule_allows(group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in REQUIRED_RULES)


def test_rbac_covers_every_rendered_kind() -> None:
    m = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"]["uid"] = "u"
    m["spec"]["cloud"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2}
    d = LLMDeployment.from_manifest(m)
    objects = render(plan(d, ClusterView.local(), {"int8": CompressionResult("int8", "accepted", size_bytes=1)}), d)
    kinds = {(o["apiVersion"], o["kind"]) for o in objects}
    assert kinds == set(CHILD_KINDS)
    for api_version, kind in kinds:
        res = CHILD_KINDS[(api_version, kind)]
        for verb in ("get", "list", "watch", "create", "delete"):
            assert _rule_allows(res.group, res.plural, verb), (kind, verb)


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
    assert len(REQUIRED_RULES) == len(RESOURCES)
    assert cluster_role()["rules"] == REQUIRED_RULES
    assert sorted(REQUIRED_RULES, key=lambda r: (r["apiGroups"][0], r["resources"][0])) == REQUIRED_RULES


def test_config_from_env() -> None:
    config = Config.from_env({"STRATUS_NAMESPACES": "a, b*", "STRATUS_METRICS_PORT": "0",
                              "STRATUS_RESYNC_SECONDS": "12.5", "STRATUS_IMAGE": "x/y:z", "UNRELATED": "1"})
    assert config.namespaces == ("a", "b*") and config.metrics_port == 0 and config.resync_seconds == 12.5
    assert config.render_options().image == "x/y:z"
    assert Config.from_env({}) == Config()
    with pytest.raises(ValueError, match="STRATUS_HEALTH_PORT"):
        Config.from_env({"STRATUS_HEALTH_PORT": "eighty"})


def test_cli_registers_operator() -> None:
    args = build_parser().parse_args(["operator", "-n", "team-a", "-n", "team-b", "--metrics-port", "0"])
    assert args.command == "operator" and args.namespace == ["team-a", "team-b"] and args.metrics_port == 0
    assert args.func.__module__ == "stratus_operator.cli.operator"


def test_cluster_edge_defaults_and_gpu_resource() -> None:
    from stratus_operator.placement import NodeView, Resources, Taint
    from stratus_operator.planner import with_edge_defaults

    config = Config.from_env({
        "STRATUS_EDGE_NODE_SELECTOR": '{"node-role/edge": "yes"}',
        "STRATUS_EDGE_TOLERATIONS": '[{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]',
        "STRATUS_GPU_RESOURCE_NAME": "amd.com/gpu",
    })
    m = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"]["uid"] = "u"
    del m["spec"]["edge"]["variants"][0]["nodeSelector"]
    d = with_edge_defaults(LLMDeployment.from_manifest(m), node_selector=config.edge_node_selector,
                           tolerations=config.edge_tolerations)
    variant = d.spec.edge.variants[0]
    assert variant.node_selector == {"node-role/edge": "yes"} and variant.tolerations[0].key == "edge"
    # A variant's own selector wins over the cluster default.
    own = with_edge_defaults(LLMDeployment.from_manifest(yaml.safe_load(
        (ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())), node_selector={"x": "y"}, tolerations=())
    assert own.spec.edge.variants[0].node_selector == {"stratus.dev/edge": "true"}

    node = NodeView("e", {"node-role/edge": "yes"}, (Taint("edge", "", "NoSchedule"),), Resources(4000, 2**32))
    p = plan(d, ClusterView((node,)), {"int8": CompressionResult("int8", "accepted", size_bytes=1000)},
             gpu_resource=config.gpu_resource_name)
    assert p.edge and p.edge[0].placement.nodes == ("e",)
    assert p.cloud is not None and p.cloud.resources.limits == {"amd.com/gpu": "1"}
    for bad in ('{"a": 1}', "[1]", "not json"):
        with pytest.raises(ValueError, match="STRATUS_EDGE_NODE_SELECTOR"):
            Config.from_env({"STRATUS_EDGE_NODE_SELECTOR": bad})
    with pytest.raises(ValueError, match="STRATUS_EDGE_TOLERATIONS"):
        Config.from_env({"STRATUS_EDGE_TOLERATIONS": '[{"operator": "Sometimes"}]'})
