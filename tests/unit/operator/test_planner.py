"""The pure planner: jobs, servers, router, placement by measured size, phases and conditions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from stratus_operator.placement import Resources
from stratus_operator.planner import (
    ClusterView,
    CompressionResult,
    NodeView,
    ResultParseError,
    Taint,
    assess,
    build_status,
    child_name,
    plan,
)
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
GI = 2**30
EDGE = {"stratus.dev/edge": "true"}
WORKER_SUMMARY = ('{"name":"int8","status":"accepted","reasons":[],"recipe":"quantize:int8-weight",'
                  '"artifact":"/artifacts/int8","bytes":180000000,"sizeRatio":0.27,"perplexity":13.2,'
                  '"fullPerplexity":12.9,"perplexityIncrease":0.0233,"tokensPerSecond":41.5,'
                  '"fullTokensPerSecond":30.1,"agreement":0.94,"seconds":12.0}')


def manifest(**changes: Any) -> dict[str, Any]:
    m: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"].update(uid="uid-1", namespace="prod", generation=3)
    for path, value in changes.items():
        node: Any = m
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k] if not k.isdigit() else node[int(k)]
        node[keys[-1] if not keys[-1].isdigit() else int(keys[-1])] = value
    return m


def dep(**changes: Any) -> LLMDeployment:
    return LLMDeployment.from_manifest(manifest(**changes))


def cluster(*nodes: NodeView) -> ClusterView:
    return ClusterView(nodes)


def edge_node(name: str, mem_gi: float = 4, labels: dict[str, str] | None = None,
              taints: tuple[Taint, ...] = ()) -> NodeView:
    return NodeView(name, labels if labels is not None else EDGE, taints, Resources(4000, int(mem_gi * GI), 0))


def accepted(size: int = 180_000_000, name: str = "int8") -> CompressionResult:
    return CompressionResult(name=name, status="accepted", size_bytes=size, perplexity=13.2,
                             perplexity_increase=0.02, tokens_per_second=40.0, agreement=0.9)


def test_before_compression_cloud_and_router_run_cloud_only() -> None:
    p = plan(dep(), cluster(edge_node("e1")), {})
    assert p.phase == "Compressing"
    assert [j.name for j in p.compression_jobs] == [f"smollm2-compress-int8-{p.compression_jobs[0].spec_hash}"]
    job = p.compression_jobs[0]
    assert job.state == "pending" and not job.done and job.artifact_path == "/artifacts/int8"
    assert job.spec.model_source == "bundled://smollm2-135m-instruct"
    assert job.spec.gate.max_perplexity_increase == 0.05
    assert job.command() == ["python", "-m", "stratus_workers.compress", "--spec", "/etc/stratus/spec.json",
                             "--out", "/artifacts/int8", "--termination-log", "/dev/termination-log"]
    assert [s.name for s in p.servers] == ["smollm2-cloud"]
    assert p.router is not None and p.router.config.routing.policy == "cloud-only"
    assert [b.address for b in p.router.config.backends] == ["smollm2-cloud.prod.svc:50051"]


def test_accepted_variant_is_placed_by_measured_size_and_routed() -> None:
    p = plan(dep(), cluster(edge_node("small", 0.5), edge_node("big", 4)), {"int8": accepted()})
    assert p.phase == "Deploying" and p.effective_policy == "cascade"
    edge = p.edge[0]
    assert edge.name == "smollm2-edge-int8" and edge.variant == "int8" and edge.model == "/artifacts/int8"
    assert edge.placement.nodes == ("big",)
    assert edge.resources.requests == {"cpu": "500m", "memory": "727Mi"}
    assert edge.flags.args() == [
        "--model", "/artifacts/int8", "--name", "smollm2-edge-int8", "--tier", "edge", "--host", "0.0.0.0",
        "--port", "50051", "--http-port", "8080", "--dtype", "auto", "--device", "cpu",
        "--max-batch-size", "4", "--max-prompt-tokens", "512", "--max-new-tokens", "256"]
    cloud = p.cloud
    assert cloud is not None
    assert cloud.flags.command()[:3] == ["python", "-m", "stratus_workers.serve"]
    assert cloud.resources.limits == {"nvidia.com/gpu": "1"} and cloud.flags.dtype == "bfloat16"
    assert p.router is not None
    assert p.router.config.routing.policy == "cascade"
    assert p.router.config.routing.cascade == dep().spec.routing.cascade  # passed through whole
    assert {b.tier: b.address for b in p.router.config.backends} == {
        "cloud": "smollm2-cloud.prod.svc:50051", "edge": "smollm2-edge-int8.prod.svc:50051"}
    assert p.router.flags.command() == ["python", "-m", "stratus_workers.router", "--config",
                                        "/etc/stratus/router.json", "--host", "0.0.0.0", "--port", "50051",
                                        "--http-port", "8080"]


def test_rejected_variant_degrades_to_cloud() -> None:
    rejected = CompressionResult(name="int8", status="rejected", reasons=("perplexity +9% > +5%",))
    p = plan(dep(), cluster(edge_node("e1")), {"int8": rejected})
    assert p.edge == [] and p.effective_policy == "cloud-only"
    a = assess(p, {"smollm2-cloud": 1, "smollm2-router": 1})
    conds = {c.type: c for c in a.conditions}
    assert a.phase == "Degraded"
    assert conds["Compressed"].reason == "GateRejected" and "+9%" in conds["Compressed"].message
    assert conds["EdgeReady"].status == "False" and conds["EdgeReady"].reason == "GateRejected"
    assert conds["Ready"].status == "True" and conds["Ready"].reason == "Degraded"


def test_failed_job_fails_with_its_own_reason() -> None:
    failed = CompressionResult.failed("int8", "DeadlineExceeded", "Job was active longer than specified deadline")
    p = plan(dep(), cluster(edge_node("e1")), {"int8": failed})
    assert p.phase == "Failed"
    a = assess(p, {"smollm2-cloud": 1, "smollm2-router": 1})
    conds = {c.type: c for c in a.conditions}
    assert a.phase == "Failed"
    assert conds["Compressed"].status == "False" and conds["Compressed"].reason == "DeadlineExceeded"
    assert "deadline" in conds["Compressed"].message
    assert conds["Ready"].status == "False" and conds["Ready"].reason == "Failed"


def test_result_for_an_older_recipe_is_ignored() -> None:
    stale = CompressionResult(name="int8", status="accepted", size_bytes=1, spec_hash="0000dead")
    p = plan(dep(), cluster(edge_node("e1")), {"int8": stale})
    assert p.compression_jobs[0].state == "pending" and p.edge == []
    fresh = CompressionResult(name="int8", status="accepted", size_bytes=1,
                              spec_hash=p.compression_jobs[0].spec_hash)
    assert plan(dep(), cluster(edge_node("e1")), {"int8": fresh}).edge


def test_recipe_change_changes_the_job_name() -> None:
    a = plan(dep(), ClusterView.local(), {}).compression_jobs[0]
    m = manifest()
    m["spec"]["edge"]["variants"][0]["compression"]["quantization"]["method"] = "int4-weight"
    b = plan(LLMDeployment.from_manifest(m), ClusterView.local(), {}).compression_jobs[0]
    assert a.name != b.name and a.spec_hash != b.spec_hash
    # Serving settings are not part of the recipe: same Job.
    m2 = manifest()
    m2["spec"]["edge"]["variants"][0]["serving"]["maxBatchSize"] = 9
    assert plan(LLMDeployment.from_manifest(m2), ClusterView.local(), {}).compression_jobs[0].name == a.name


def test_no_edge_nodes_means_no_edge_server_and_a_reason() -> None:
    p = plan(dep(), cluster(NodeView("gpu", {"gpu": "h100"}, (), Resources(64000, 512 * GI, 8))),
             {"int8": accepted()})
    assert p.edge == [] and p.effective_policy == "cloud-only"
    v = p.variants[0]
    assert v.state == "Accepted" and v.placement is not None and not v.placement.placed
    a = assess(p, {"smollm2-cloud": 1, "smollm2-router": 1})
    conds = {c.type: c for c in a.conditions}
    assert conds["EdgeReady"].reason == "NoFittingNode"
    assert "lacks label stratus.dev/edge=true (gpu)" in conds["EdgeReady"].message
    assert a.phase == "Degraded" and a.edge == (0, 1)


def test_variant_bigger_than_any_node() -> None:
    p = plan(dep(), cluster(edge_node("e1", 2), edge_node("e2", 1)), {"int8": accepted(size=3 * GI)})
    assert p.edge == []
    reason = p.variants[0].placement.reason  # type: ignore[union-attr]
    assert "no node fits edge variant int8 (3Gi model), which needs cpu 500m, memory 4.2Gi per pod" in reason
    assert "largest free" in reason


def test_two_variants_share_node_capacity() -> None:
    m = manifest()
    second = copy.deepcopy(m["spec"]["edge"]["variants"][0])
    second["name"] = "int4"
    second["compression"]["quantization"]["method"] = "int4-weight"
    m["spec"]["edge"]["variants"].append(second)
    d = LLMDeployment.from_manifest(m)
    one_gi_node = cluster(edge_node("only", 1.2))  # room for one 727Mi pod, not two
    p = plan(d, one_gi_node, {"int8": accepted(), "int4": accepted(name="int4")})
    assert [s.variant for s in p.edge] == ["int8"]
    assert p.variants[1].placement is not None and not p.variants[1].placement.placed


def test_tolerations_and_replicas() -> None:
    m = manifest()
    v = m["spec"]["edge"]["variants"][0]
    v["replicas"] = 3
    v["tolerations"] = [{"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}]
    nodes = cluster(edge_node("t1", 4, taints=(Taint("dedicated", "edge"),)), edge_node("t2", 0.8),
                    edge_node("t3", 4, taints=(Taint("other", "x"),)))
    p = plan(LLMDeployment.from_manifest(m), nodes, {"int8": accepted()})
    edge = p.edge[0]
    assert edge.replicas == 3 and edge.placement.nodes == ("t1",)
    # Only 2 fit: the server runs 2 and the status says 2 of 3.
    nodes2 = cluster(edge_node("t1", 1.2, taints=(Taint("dedicated", "edge"),)), edge_node("t2", 0.8))
    p2 = plan(LLMDeployment.from_manifest(m), nodes2, {"int8": accepted()})
    assert p2.edge[0].replicas == 2
    assert "only 2 of 3 replicas" in p2.edge[0].placement.reason
    a = assess(p2, {"smollm2-cloud": 1, "smollm2-router": 1, "smollm2-edge-int8": 2})
    assert a.phase == "Degraded" and a.edge == (2, 3)


def test_edge_only_and_cloud_only_policies() -> None:
    edge_only = plan(dep(spec__routing__policy="edge-only"), cluster(edge_node("e")), {"int8": accepted()})
    assert edge_only.cloud is None and len(edge_only.edge) == 1
    assert edge_only.router is not None and edge_only.router.config.routing.policy == "edge-only"
    a = assess(edge_only, {"smollm2-edge-int8": 1, "smollm2-router": 1})
    assert a.phase == "Ready"
    assert {c.type: c.reason for c in a.conditions}["CloudReady"] == "NotRequested"

    rejected = CompressionResult(name="int8", status="rejected", reasons=("no",))
    nothing = plan(dep(spec__routing__policy="edge-only"), cluster(edge_node("e")), {"int8": rejected})
    assert nothing.router is None and assess(nothing, {}).phase == "Failed"

    cloud_only = plan(dep(spec__routing__policy="cloud-only"), cluster(edge_node("e")), {})
    assert cloud_only.compression_jobs == [] and cloud_only.edge == []
    assert assess(cloud_only, {"smollm2-cloud": 1, "smollm2-router": 1}).phase == "Ready"


def test_local_view_places_everything_on_this_machine() -> None:
    p = plan(dep(), ClusterView.local(), {"int8": accepted(size=50 * GI)})
    assert p.edge[0].placement.nodes == ("localhost",)
    assert p.edge[0].resources.requests == {}  # no derived requests for processes
    assert p.effective_policy == "cascade"


def test_autoscaling_keeps_min_replicas_and_caps_by_placement() -> None:
    m = manifest()
    m["spec"]["cloud"]["autoscaling"] = {"minReplicas": 2, "maxReplicas": 5}
    m["spec"]["edge"]["variants"][0]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 6, "metric": "queue-depth"}
    p = plan(LLMDeployment.from_manifest(m), cluster(edge_node("e", 2)), {"int8": accepted()})
    assert p.cloud is not None and p.cloud.replicas == 2 and p.cloud.autoscaling is not None
    edge = p.edge[0]
    assert edge.autoscaling is not None and edge.autoscaling.max_replicas == 2  # room for two pods only
    assert edge.autoscaling.metric == "queue-depth"


def test_ready_when_everything_runs_and_times_are_kept() -> None:
    p = plan(dep(), cluster(edge_node("e")), {"int8": accepted()})
    ready = {"smollm2-cloud": 1, "smollm2-edge-int8": 1, "smollm2-router": 1}
    a = assess(p, ready)
    assert a.phase == "Ready" and all(c.status == "True" for c in a.conditions)
    first = build_status(p, ready, previous=None, now="2026-01-01T00:00:00Z")
    assert first.observed_generation == 3 and first.edge.summary == "1/1" and first.cloud.summary == "1/1"
    assert first.variants[0].nodes == ["e"] and first.variants[0].size_bytes == 180_000_000
    again = build_status(p, ready, previous=first, now="2026-01-01T00:05:00Z")
    assert {c.last_transition_time for c in again.conditions} == {"2026-01-01T00:00:00Z"}
    degraded = build_status(p, {**ready, "smollm2-edge-int8": 0}, previous=first, now="2026-01-01T00:09:00Z")
    times = {c.type: c.last_transition_time for c in degraded.conditions}
    assert times["EdgeReady"] == "2026-01-01T00:09:00Z" and times["CloudReady"] == "2026-01-01T00:00:00Z"
    assert degraded.phase == "Deploying"


def test_invalid_spec_status() -> None:
    p = plan(dep(), ClusterView.local(), {})
    a = assess(p, {}, invalid="spec.cloud.replicas: must be >= 0")
    assert a.phase == "Failed" and {c.reason for c in a.conditions} == {"InvalidSpec"}


@pytest.mark.parametrize("text", [
    WORKER_SUMMARY,
    "2026 log line\n{\"not\": \"it\"\n" + WORKER_SUMMARY + "\n",
    '{"variant":"int8","accepted":true,"size_bytes":180000000,"perplexity_increase":0.0233,'
    '"tokens_per_second":41.5,"perplexity":13.2,"agreement":0.94}',
])
def test_compression_summary_parsing(text: str) -> None:
    r = CompressionResult.from_summary(text, spec_hash="abc")
    assert r.accepted and r.name == "int8" and r.size_bytes == 180_000_000
    assert r.perplexity_increase == pytest.approx(0.0233) and r.tokens_per_second == 41.5
    assert r.spec_hash == "abc"


def test_compression_summary_rejected_and_garbage() -> None:
    r = CompressionResult.from_summary('{"name":"x","status":"rejected","reasons":"too big"}')
    assert r.status == "rejected" and r.reasons == ("too big",)
    with pytest.raises(ResultParseError, match="no JSON summary"):
        CompressionResult.from_summary("Traceback (most recent call last):\n  boom")
    with pytest.raises(ResultParseError, match="no status"):
        CompressionResult.from_summary('{"name": "x", "size_bytes": 3}')


def test_child_names_are_dns_labels() -> None:
    assert child_name("a", "edge", "b") == "a-edge-b"
    long = child_name("x" * 60, "compress", "variant-name", "deadbeef")
    assert len(long) <= 63 and long[-9] == "-"
    assert long != child_name("x" * 60, "compress", "variant-namf", "deadbeef")


def test_free_form_job_reasons_become_condition_reasons() -> None:
    odd = CompressionResult.failed("int8", "pod evicted: node pressure", "")
    a = assess(plan(dep(), ClusterView.local(), {"int8": odd}), {})
    compressed = next(c for c in a.conditions if c.type == "Compressed")
    assert compressed.reason == "PodEvictedNodePressure"
    build_status(plan(dep(), ClusterView.local(), {"int8": odd}), {}, previous=None, now="t")  # validates


def test_speculative_needs_an_edge_server_like_cascade() -> None:
    p = plan(dep(spec__routing__policy="speculative"), cluster(edge_node("e")), {})
    assert p.effective_policy == "cloud-only" and p.cloud is not None
    p = plan(dep(spec__routing__policy="speculative"), cluster(edge_node("e")), {"int8": accepted()})
    assert p.effective_policy == "speculative" and p.edge
