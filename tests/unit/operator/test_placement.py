"""Placement: label, taint and capacity matching across many nodes, reasons when nothing fits."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratus_operator.placement import (
    ClusterView,
    NodeView,
    Resources,
    Taint,
    edge_demand,
    node_view,
    parse_quantity,
    place,
    tolerates,
)
from stratus_operator.spec import ResourceRequirements, Toleration

pytestmark = pytest.mark.unit

GI = 2**30
MI = 2**20
EDGE = {"stratus.dev/edge": "true"}


def node(name: str, *, labels: dict[str, str] | None = None, mem_gi: float = 4, cpu: int = 4, gpu: int = 0,
         used_gi: float = 0, taints: tuple[Taint, ...] = (), ready: bool = True, cordoned: bool = False) -> NodeView:
    return NodeView(name=name, labels=labels if labels is not None else dict(EDGE), taints=taints,
                    allocatable=Resources(cpu * 1000, int(mem_gi * GI), gpu),
                    requested=Resources(0, int(used_gi * GI), 0), ready=ready, unschedulable=cordoned)


@pytest.mark.parametrize(("text", "value"), [
    ("500m", Decimal("0.5")), ("2", Decimal(2)), (3, Decimal(3)), ("1Gi", Decimal(GI)), ("1.5Gi", Decimal(GI) * 3 / 2),
    ("128974848", Decimal(128974848)), ("129e6", Decimal(129_000_000)), ("123M", Decimal(123_000_000)),
    ("100Ki", Decimal(102400)), ("0.1", Decimal("0.1")),
])
def test_parse_quantity(text: str | int, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("bad", ["", "Gi", "1Qi", "one", "1..2"])
def test_parse_quantity_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(bad)


@pytest.mark.parametrize(("toleration", "taint", "expected"), [
    (Toleration(key="a", value="x"), Taint("a", "x"), True),
    (Toleration(key="a", value="y"), Taint("a", "x"), False),
    (Toleration(key="a", operator="Exists"), Taint("a", "anything"), True),
    (Toleration(operator="Exists"), Taint("z", "q", "NoExecute"), True),
    (Toleration(key="a", value="x", effect="NoExecute"), Taint("a", "x", "NoSchedule"), False),
    (Toleration(key="a", value="x", effect="NoSchedule"), Taint("a", "x", "NoSchedule"), True),
    (Toleration(key="b", operator="Exists"), Taint("a", "x"), False),
])
def test_toleration_matching(toleration: Toleration, taint: Taint, expected: bool) -> None:
    assert tolerates(toleration, taint) is expected


def test_many_nodes_mixed_labels_taints_capacity() -> None:
    nodes = [
        node("cloud-gpu", labels={"gpu": "a100"}, mem_gi=128, gpu=8),
        node("edge-small", mem_gi=0.5),
        node("edge-busy", mem_gi=4, used_gi=3.8),
        node("edge-tainted", mem_gi=16, taints=(Taint("dedicated", "camera"),)),
        node("edge-exec-taint", mem_gi=16, taints=(Taint("x", "", "NoExecute"),)),
        node("edge-notready", mem_gi=16, ready=False),
        node("edge-cordoned", mem_gi=16, cordoned=True),
        node("edge-a", mem_gi=2),
        node("edge-b", mem_gi=3),
        node("edge-prefer", mem_gi=8, taints=(Taint("soft", "", "PreferNoSchedule"),)),
        node("wrong-zone", labels={"stratus.dev/edge": "false"}, mem_gi=64),
    ]
    demand = Resources(500, 1 * GI, 0)
    result = place(ClusterView(tuple(nodes)), what="v", demand=demand, replicas=4, node_selector=EDGE,
                   tolerations=())
    assert result.complete
    # Spread by free memory: b (3Gi) then a (2Gi) ...; the PreferNoSchedule node only when nothing else fits.
    assert result.assignments == ("edge-b", "edge-a", "edge-b", "edge-a")
    assert set(result.nodes) == {"edge-a", "edge-b"}

    # With a toleration the big tainted node wins (most free memory) for every replica.
    tolerant = place(ClusterView(tuple(nodes)), what="v", demand=demand, replicas=3, node_selector=EDGE,
                     tolerations=(Toleration(key="dedicated", operator="Exists"),))
    assert tolerant.assignments == ("edge-tainted",) * 3

    # Asking for more than fits places what fits and says why the rest did not.
    greedy = place(ClusterView(tuple(nodes)), what="v", demand=demand, replicas=20, node_selector=EDGE,
                   tolerations=())
    assert greedy.placed_replicas == 3 + 2 + 8  # edge-b 3, edge-a 2, edge-prefer 8
    assert not greedy.complete
    assert "only 13 of 20 replicas" in greedy.reason
    assert "not ready (edge-notready)" in greedy.reason and "cordoned (edge-cordoned)" in greedy.reason
    assert "untolerated taint dedicated=camera:NoSchedule" in greedy.reason
    assert "lacks label stratus.dev/edge=true (cloud-gpu, wrong-zone)" in greedy.reason


def test_prefer_no_schedule_is_last_resort() -> None:
    nodes = (node("soft", mem_gi=16, taints=(Taint("s", "", "PreferNoSchedule"),)), node("plain", mem_gi=2))
    result = place(ClusterView(nodes), what="v", demand=Resources(100, GI), replicas=3, node_selector=EDGE,
                   tolerations=())
    assert result.assignments == ("plain", "plain", "soft")


def test_no_edge_nodes() -> None:
    cluster = ClusterView((node("gpu-1", labels={"gpu": "h100"}, mem_gi=80, gpu=4),))
    result = place(cluster, what="edge variant int8", demand=Resources(500, GI), replicas=1, node_selector=EDGE,
                   tolerations=())
    assert not result.placed and result.assignments == ()
    assert result.reason == ("no node fits edge variant int8, which needs cpu 500m, memory 1Gi per pod: "
                             "1 node lacks label stratus.dev/edge=true (gpu-1)")


def test_empty_cluster() -> None:
    result = place(ClusterView(()), what="x", demand=Resources(1, 1), replicas=2, node_selector={}, tolerations=())
    assert not result.placed and "no nodes" in result.reason


def test_variant_bigger_than_any_node() -> None:
    cluster = ClusterView((node("e1", mem_gi=2), node("e2", mem_gi=3, used_gi=1.5), node("e3", mem_gi=1)))
    demand = edge_demand(ResourceRequirements(), size_bytes=5 * GI)
    result = place(cluster, what="edge variant huge", demand=demand, replicas=1, node_selector=EDGE, tolerations=())
    assert not result.placed
    assert "no node fits edge variant huge" in result.reason
    assert "3 matching nodes without room (largest free: cpu 4000m, memory 2Gi on e1)" in result.reason


def test_reserved_capacity_is_respected_between_placements() -> None:
    cluster = ClusterView((node("only", mem_gi=2),))
    first = place(cluster, what="a", demand=Resources(500, GI), replicas=1, node_selector=EDGE, tolerations=())
    assert first.assignments == ("only",)
    second = place(cluster, what="b", demand=Resources(500, int(1.5 * GI)), replicas=1, node_selector=EDGE,
                   tolerations=(), reserved={"only": Resources(500, GI)})
    assert not second.placed


def test_placement_keeps_current_nodes_while_they_fit() -> None:
    demand = Resources(500, 727 * MI)
    before = ClusterView((node("edge-1", mem_gi=8), node("edge-2", mem_gi=7)))
    first = place(before, what="v", demand=demand, replicas=1, node_selector=EDGE, tolerations=())
    assert first.nodes == ("edge-1",)
    # A 5 Gi camera pod lands on edge-1: edge-2 now has more room, but the server stays where it runs.
    after = ClusterView((node("edge-1", mem_gi=8, used_gi=5), node("edge-2", mem_gi=7)))
    assert place(after, what="v", demand=demand, replicas=1, node_selector=EDGE, tolerations=()).nodes == ("edge-2",)
    kept = place(after, what="v", demand=demand, replicas=1, node_selector=EDGE, tolerations=(), current=first.nodes)
    assert kept.nodes == ("edge-1",)
    # It moves when the node no longer fits it, is no longer eligible, or is gone; more replicas spread as before.
    full = ClusterView((node("edge-1", mem_gi=8, used_gi=7.5), node("edge-2", mem_gi=7)))
    assert place(full, what="v", demand=demand, replicas=1, node_selector=EDGE, tolerations=(),
                 current=("edge-1",)).nodes == ("edge-2",)
    cordoned = ClusterView((node("edge-1", cordoned=True), node("edge-2", mem_gi=7)))
    assert place(cordoned, what="v", demand=demand, replicas=1, node_selector=EDGE, tolerations=(),
                 current=("edge-1",)).nodes == ("edge-2",)
    more = place(after, what="v", demand=demand, replicas=2, node_selector=EDGE, tolerations=(), current=("edge-1",))
    assert sorted(more.assignments) == ["edge-1", "edge-2"]
    fewer = place(after, what="v", demand=demand, replicas=1, node_selector=EDGE, tolerations=(),
                  current=("edge-1", "edge-2"))
    assert fewer.assignments == ("edge-1",)


def test_gpu_demand_needs_gpu_nodes() -> None:
    cluster = ClusterView((node("cpu", mem_gi=64), node("gpu", mem_gi=8, gpu=1)))
    result = place(cluster, what="g", demand=Resources(100, GI, 1), replicas=2, node_selector=EDGE, tolerations=())
    assert result.assignments == ("gpu",) and "1 of 2" in result.reason


def test_local_view_fits_everything() -> None:
    result = place(ClusterView.local(), what="x", demand=Resources(10**9, 10**15, 99), replicas=3,
                   node_selector={"no": "such"}, tolerations=())
    assert result.complete and result.nodes == ("localhost",)


def test_edge_demand_follows_measured_size_unless_explicit() -> None:
    derived = edge_demand(ResourceRequirements(), size_bytes=180_000_000)
    assert derived == Resources(500, 727 * MI, 0)
    explicit = edge_demand(ResourceRequirements(requests={"cpu": "2", "memory": "3Gi"},
                                                limits={"nvidia.com/gpu": "1"}), size_bytes=10**12)
    assert explicit == Resources(2000, 3 * GI, 1)


def _node_obj(name: str, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": f"host-{name}"}},
            "spec": extra.get("spec", {}),
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "2"},
                       "conditions": extra.get("conditions", [{"type": "Ready", "status": "True"}])}}


def _pod(node_name: str | None, *, phase: str = "Running", mem: str = "1Gi", cpu: str = "500m",
         labels: dict[str, str] | None = None, init_mem: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"resources": {"requests": {"memory": mem, "cpu": cpu}}},
                                           {"resources": {"requests": {"memory": "512Mi"}}}]}
    if node_name:
        spec["nodeName"] = node_name
    if init_mem:
        spec["initContainers"] = [{"resources": {"requests": {"memory": init_mem}}}]
    return {"metadata": {"labels": labels or {}}, "spec": spec, "status": {"phase": phase}}


def test_cluster_view_from_objects_counts_requests() -> None:
    nodes = [_node_obj("n1"), _node_obj("n2", spec={"unschedulable": True, "taints": [
        {"key": "k", "value": "v", "effect": "NoExecute"}]}, conditions=[{"type": "Ready", "status": "False"}])]
    mine = {"app.kubernetes.io/instance": "me", "app.kubernetes.io/managed-by": "stratus-operator"}
    pods = [
        _pod("n1"),                                  # 1.5Gi, 500m
        _pod("n1", init_mem="4Gi"),                  # init container dominates: 4Gi
        _pod("n1", phase="Succeeded"),               # finished: holds nothing
        _pod(None),                                  # unscheduled
        _pod("n1", labels=mine),                     # our own: ignored
    ]
    view = ClusterView.from_objects(nodes, pods, ignore_pod_labels=mine)
    n1, n2 = view.nodes
    assert n1.allocatable == Resources(4000, 8 * GI, 2)
    assert n1.requested == Resources(1000, int(1.5 * GI) + 4 * GI, 0)
    assert n1.hostname == "host-n1"
    assert not n2.ready and n2.unschedulable and n2.taints == (Taint("k", "v", "NoExecute"),)


def test_node_view_defaults_to_ready_without_conditions() -> None:
    assert node_view({"metadata": {"name": "x"}}).ready


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 8), st.integers(0, 4000)),
                   min_size=0, max_size=12),
    replicas=st.integers(0, 12),
    demand_mi=st.integers(64, 4096),
    tolerate=st.booleans(),
)
def test_placement_invariants(specs: list[tuple[bool, bool, int, int]], replicas: int, demand_mi: int,
                              tolerate: bool) -> None:
    nodes = tuple(
        NodeView(name=f"n{i}", labels=EDGE if labelled else {}, taints=(Taint("t", "x"),) if tainted else (),
                 allocatable=Resources(4000, mem_gi * GI, 0), requested=Resources(0, used_mi * MI, 0))
        for i, (labelled, tainted, mem_gi, used_mi) in enumerate(specs)
    )
    demand = Resources(250, demand_mi * MI, 0)
    tolerations = (Toleration(key="t", operator="Exists"),) if tolerate else ()
    result = place(ClusterView(nodes), what="v", demand=demand, replicas=replicas, node_selector=EDGE,
                   tolerations=tolerations)
    by_name = {n.name: n for n in nodes}
    assert result.placed_replicas <= replicas
    for name in set(result.assignments):
        n = by_name[name]
        assert n.labels == EDGE
        assert not n.taints or tolerate
        assert demand.scaled(result.assignments.count(name)).fits_in(n.free)
    if result.placed_replicas < replicas:
        # Greedy is maximal: no eligible node has room for one more pod.
        for n in nodes:
            if n.labels == EDGE and (not n.taints or tolerate):
                assert not demand.fits_in(n.free - demand.scaled(result.assignments.count(n.name)))
        assert result.reason
