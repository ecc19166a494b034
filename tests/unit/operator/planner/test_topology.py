"""The topology stage: servers, router and placement by measured size, as logical references only."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from samples import GI, accepted, result, sample

from stratus_operator.placement import ClusterView, NodeView, Resources, Taint
from stratus_operator.planner import Artifact, Plan, Source, plan
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.unit

EDGE = {"stratus.dev/edge": "true"}


def manifest(**changes: Any) -> dict[str, Any]:
    m = sample(uid="uid-1", namespace="prod", generation=3)
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


def test_before_compression_cloud_and_router_run_cloud_only() -> None:
    p = plan(dep(), cluster(edge_node("e1")), {})
    assert p.phase == "Compressing" and p.generation == 3 and p.deployment == "smollm2"
    job = p.compression_jobs[0]
    assert job.state == "pending" and not job.done
    assert [s.name for s in p.servers] == ["smollm2-cloud"]
    assert p.cloud is not None and p.cloud.model == Source("bundled://smollm2-135m-instruct")
    assert p.router is not None and p.router.routing.policy == "cloud-only"
    assert p.router.backends == ("smollm2-cloud",)


def test_accepted_variant_is_placed_by_measured_size_and_routed() -> None:
    p = plan(dep(), cluster(edge_node("small", 0.5), edge_node("big", 4)), {"int8": accepted()})
    assert p.phase == "Deploying" and p.effective_policy == "cascade"
    edge = p.edge[0]
    job = p.job("int8")
    assert edge.name == "smollm2-edge-int8" and edge.variant == "int8"
    assert edge.model == Artifact("int8", job.spec_hash)  # which artifact, not where it lies
    assert edge.placement.nodes == ("big",)
    assert edge.resources.requests == {"cpu": "500m", "memory": "727Mi"}
    assert (edge.dtype, edge.device, edge.serving.max_batch_size) == ("auto", "cpu", 4)
    cloud = p.cloud
    assert cloud is not None
    assert cloud.resources.limits == {"nvidia.com/gpu": "1"} and cloud.dtype == "bfloat16"
    assert p.router is not None
    assert p.router.routing.policy == "cascade"
    assert p.router.routing.cascade == dep().spec.routing.cascade  # passed through whole
    assert p.router.backends == ("smollm2-cloud", "smollm2-edge-int8")
    assert [p.server(b).tier for b in p.router.backends] == ["cloud", "edge"]
    assert p.router.tokenizer == Source("bundled://smollm2-135m-instruct")


def test_the_plan_holds_no_cluster_addresses_or_pod_paths() -> None:
    """Everything an executor must bind is a logical reference; nothing in the plan says svc, :50051 or /artifacts."""
    p = plan(dep(), cluster(edge_node("e", 4)), {"int8": accepted()})

    def strings(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return [s for f in dataclasses.fields(value) for s in strings(getattr(value, f.name))]
        if isinstance(value, dict):
            return [s for k, v in value.items() for s in strings(k) + strings(v)]
        if isinstance(value, list | tuple):
            return [s for v in value for s in strings(v)]
        return []

    text = strings(p)
    assert "smollm2-edge-int8" in text
    assert not [s for s in text if ".svc" in s or "50051" in s or s.startswith(("/artifacts", "/etc/stratus"))]


def test_rejected_variant_degrades_to_cloud() -> None:
    p = plan(dep(), cluster(edge_node("e1")), {"int8": result(status="rejected", reasons=["perplexity +9% > +5%"])})
    assert p.edge == [] and p.effective_policy == "cloud-only"
    assert p.variants[0].state == "Rejected" and "+9%" in p.notes[0]


def test_result_for_an_older_recipe_is_ignored() -> None:
    stale = result(size_bytes=1, spec_hash="0000dead")
    p = plan(dep(), cluster(edge_node("e1")), {"int8": stale})
    assert p.compression_jobs[0].state == "pending" and p.edge == []
    fresh = result(size_bytes=1, spec_hash=p.compression_jobs[0].spec_hash)
    assert plan(dep(), cluster(edge_node("e1")), {"int8": fresh}).edge


def test_no_edge_nodes_means_no_edge_server_and_a_reason() -> None:
    p = plan(dep(), cluster(NodeView("gpu", {"gpu": "h100"}, (), Resources(64000, 512 * GI, 8))),
             {"int8": accepted()})
    assert p.edge == [] and p.effective_policy == "cloud-only"
    v = p.variants[0]
    assert v.state == "Accepted" and v.placement is not None and not v.placement.placed
    assert "lacks label stratus.dev/edge=true (gpu)" in v.placement.reason


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


def test_edge_only_and_cloud_only_policies() -> None:
    edge_only = plan(dep(spec__routing__policy="edge-only"), cluster(edge_node("e")), {"int8": accepted()})
    assert edge_only.cloud is None and len(edge_only.edge) == 1
    assert edge_only.router is not None and edge_only.router.routing.policy == "edge-only"

    rejected = result(status="rejected", reasons=["no"])
    nothing = plan(dep(spec__routing__policy="edge-only"), cluster(edge_node("e")), {"int8": rejected})
    assert nothing.router is None

    cloud_only = plan(dep(spec__routing__policy="cloud-only"), cluster(edge_node("e")), {})
    assert cloud_only.compression_jobs == [] and cloud_only.edge == []


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


def test_gpu_resource_name_and_tensor_parallel_reach_the_cloud_server() -> None:
    m = manifest()
    m["spec"]["cloud"].update({"gpusPerPod": 2, "tensorParallel": 2})
    p = plan(LLMDeployment.from_manifest(m), ClusterView.local(), {}, gpu_resource="amd.com/gpu")
    assert p.cloud is not None and p.cloud.resources.limits == {"amd.com/gpu": "2"}
    assert p.cloud.tensor_parallel == 2


def test_speculative_needs_an_edge_server_like_cascade() -> None:
    p = plan(dep(spec__routing__policy="speculative"), cluster(edge_node("e")), {})
    assert p.effective_policy == "cloud-only" and p.cloud is not None
    p = plan(dep(spec__routing__policy="speculative"), cluster(edge_node("e")), {"int8": accepted()})
    assert p.effective_policy == "speculative" and p.edge


def test_empty_plan_runs_nothing() -> None:
    p = Plan.empty("broken", 4)
    assert (p.servers, p.router, p.compression_jobs, p.generation) == ([], None, [], 4)


@pytest.mark.parametrize(("resources", "gpus"), [
    ({}, "1"),  # gpusPerPod
    ({"requests": {"nvidia.com/gpu": "2"}}, "2"),  # the request alone once gave request 2 != limit 1
    ({"limits": {"nvidia.com/gpu": "3"}}, "3"),
])
def test_cloud_gpu_request_always_equals_its_limit(resources: dict[str, Any], gpus: str) -> None:
    p = plan(dep(spec__cloud__resources=resources), ClusterView.local(), {})
    assert p.cloud is not None
    assert p.cloud.resources.requests["nvidia.com/gpu"] == p.cloud.resources.limits["nvidia.com/gpu"] == gpus


def test_an_edge_gpu_request_gets_its_limit() -> None:
    jetson = NodeView("jetson", EDGE, (), Resources(4000, 8 * GI, 1))
    p = plan(dep(spec__edge__variants__0__resources={"requests": {"nvidia.com/gpu": 1}}), cluster(jetson),
             {"int8": accepted()})
    edge = p.edge[0]
    assert edge.resources.requests["nvidia.com/gpu"] == edge.resources.limits["nvidia.com/gpu"] == "1"
    assert edge.placement.nodes == ("jetson",)


def test_cloud_pods_request_cpu_and_memory_by_default() -> None:
    # BestEffort pods are evicted first and give an HPA on CPU nothing to divide by.
    p = plan(dep(), ClusterView.local(), {})
    assert p.cloud is not None
    requests = p.cloud.resources.requests
    assert requests["cpu"] == "1000m"
    # SmolLM2-135M held in fp32 (540 MB) x 1.25 plus the 512 MiB runtime, in MiB.
    assert requests["memory"] == f"{-(-(135_000_000 * 4 * 1.25 + 512 * 2**20) // 2**20):.0f}Mi"
    unknown = plan(dep(spec__model__source="s3://bucket/big-model"), ClusterView.local(), {})
    assert unknown.cloud is not None and unknown.cloud.resources.requests["memory"] == "4096Mi"
    # The user's own values win; a limit alone stays alone (the API server makes it the request too).
    mine = plan(dep(spec__cloud__resources={"requests": {"cpu": "4"}, "limits": {"memory": "1Gi"}}),
                ClusterView.local(), {})
    assert mine.cloud is not None
    assert mine.cloud.resources.requests == {"cpu": "4", "nvidia.com/gpu": "1"}
    assert mine.cloud.resources.limits == {"memory": "1Gi", "nvidia.com/gpu": "1"}


def test_gpus_per_pod_zero_requests_no_gpu() -> None:
    # tensorParallel defaults to 1: it once made a CPU cloud tier ask for one GPU anyway.
    p = plan(dep(spec__cloud__gpusPerPod=0), ClusterView.local(), {})
    assert p.cloud is not None and "nvidia.com/gpu" not in {**p.cloud.resources.requests, **p.cloud.resources.limits}


@pytest.mark.parametrize(("tokens", "extra"), [(None, 0), (-1, 0), (0, 0), (100_000, 100_000 * 46_080)])
def test_a_prefix_cache_sized_in_the_manifest_is_counted_in_the_edge_pods_memory(
    tokens: int | None, extra: int
) -> None:
    """A torch variant's server fills the prefix cache the manifest sizes (its pool grows to it on a CPU): placement
    counts it; the automatic size (-1, unset) and none (0) add nothing."""
    serving = {} if tokens is None else {"prefixCacheTokens": tokens}
    variant = {**manifest()["spec"]["edge"]["variants"][0], "serving": serving}
    kv = 46_080  # SmolLM2-135M on a CPU: 30 layers x 2 x 192 fp32 values a token
    p = plan(dep(spec__edge__variants=[variant]), cluster(edge_node("e1", 16)),
             {"int8": result("int8", size_bytes=180_000_000, perplexity=13.2, kv_bytes_per_token=kv)})
    mib = int(p.edge[0].resources.requests["memory"].removesuffix("Mi"))
    assert mib == 727 + -(-extra // 2**20)

def test_edge_servers_stay_on_their_nodes_while_they_fit() -> None:
    roomy = edge_node("e1", 8)
    p = plan(dep(), cluster(roomy, edge_node("e2", 7)), {"int8": accepted()})
    assert p.edge[0].placement.nodes == ("e1",)
    # Someone else's pod fills part of e1: the fresh choice would be e2, the running server stays on e1.
    busy = dataclasses.replace(roomy, requested=Resources(0, 5 * GI, 0))
    assert plan(dep(), cluster(busy, edge_node("e2", 7)), {"int8": accepted()}).edge[0].placement.nodes == ("e2",)
    kept = plan(dep(), cluster(busy, edge_node("e2", 7)), {"int8": accepted()}, current={"int8": ["e1"]})
    assert kept.edge[0].placement.nodes == ("e1",)


def test_the_variants_format_picks_its_runtime() -> None:
    """A gguf quantization is served by llama.cpp: the plan and the status say so; other recipes stay torch."""
    from stratus_operator.planner import build_status

    gguf = {"name": "gguf", "compression": {"quantization": {"method": "gguf", "ggufType": "q8_0"}},
            "nodeSelector": EDGE}
    d = dep(spec__edge__variants=[manifest()["spec"]["edge"]["variants"][0], gguf])
    kv = 23_040  # SmolLM2-135M: 30 layers x 2 x 192 f16 values a token
    gguf_result = result("gguf", size_bytes=180_000_000, perplexity=13.2, kv_bytes_per_token=kv)
    int8_result = result("int8", size_bytes=180_000_000, perplexity=13.2, kv_bytes_per_token=2 * kv)
    p = plan(d, cluster(edge_node("e1", 8)), {"int8": int8_result, "gguf": gguf_result})
    assert {v.name: v.runtime for v in p.variants} == {"int8": "torch", "gguf": "llamacpp"}
    assert {s.variant: s.runtime for s in p.edge} == {"int8": "torch", "gguf": "llamacpp"}
    # A llama.cpp server allocates its whole cache at start (default serving limits: 8 + 4 rows of 2,560
    # tokens): its pod asks for that on top of the model; a torch server's cache grows with use.
    memory = {s.variant: s.resources.requests["memory"] for s in p.edge}
    cache_mib = kv * (8 + 4) * (2048 + 512) / 2**20
    assert memory["int8"] == "727Mi" and int(memory["gguf"].removesuffix("Mi")) == pytest.approx(727 + cache_mib, abs=1)
    assert p.cloud is not None and p.cloud.runtime == "torch"
    status = build_status(p, {}, previous=None, now="2026-01-01T00:00:00Z")
    assert [(v.name, v.runtime) for v in status.variants] == [("int8", "torch"), ("gguf", "llamacpp")]
