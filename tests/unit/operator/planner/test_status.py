"""The status stage: phase and conditions from the plan and readiness; times kept while nothing changes."""

from __future__ import annotations

from typing import Any

import pytest
from samples import GI, accepted, result, sample

from stratus_operator.placement import ClusterView, NodeView, Resources, Taint
from stratus_operator.planner import (
    CompressionResult,
    Endpoints,
    Plan,
    assess,
    build_status,
    plan,
    status_without_times,
)
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.unit

EDGE = {"stratus.dev/edge": "true"}
ALL_READY = {"smollm2-cloud": 1, "smollm2-edge-int8": 1, "smollm2-router": 1}


def dep(policy: str | None = None, **variant: Any) -> LLMDeployment:
    m = sample(uid="uid-1", namespace="prod", generation=3)
    if policy:
        m["spec"]["routing"]["policy"] = policy
    m["spec"]["edge"]["variants"][0].update(variant)
    return LLMDeployment.from_manifest(m)


def nodes(*mem_gi: float) -> ClusterView:
    return ClusterView(tuple(NodeView(f"e{i}", EDGE, (), Resources(4000, int(m * GI), 0))
                             for i, m in enumerate(mem_gi)))


def planned(results: dict[str, CompressionResult], d: LLMDeployment | None = None,
            cluster: ClusterView | None = None) -> Plan:
    return plan(d or dep(), cluster or nodes(4), results)


def conditions(p: Plan, ready: dict[str, int]) -> dict[str, Any]:
    return {c.type: c for c in assess(p, ready).conditions}


def test_compressing_before_any_result() -> None:
    p = planned({})
    a = assess(p, {"smollm2-cloud": 1, "smollm2-router": 1})
    conds = {c.type: c for c in a.conditions}
    assert a.phase == "Compressing" and conds["Compressed"].reason == "Compressing"
    assert conds["EdgeReady"].reason == "Compressing" and conds["CloudReady"].status == "True"


def test_rejected_variant_degrades_to_cloud() -> None:
    p = planned({"int8": result(status="rejected", reasons=["perplexity +9% > +5%"])})
    a = assess(p, {"smollm2-cloud": 1, "smollm2-router": 1})
    conds = {c.type: c for c in a.conditions}
    assert a.phase == "Degraded"
    assert conds["Compressed"].reason == "GateRejected" and "+9%" in conds["Compressed"].message
    assert conds["EdgeReady"].status == "False" and conds["EdgeReady"].reason == "GateRejected"
    assert conds["Ready"].status == "True" and conds["Ready"].reason == "Degraded"


def test_failed_job_fails_with_its_own_reason() -> None:
    failed = CompressionResult.failed("int8", "DeadlineExceeded", "Job was active longer than specified deadline")
    p = planned({"int8": failed})
    assert p.phase == "Failed"
    a = assess(p, {"smollm2-cloud": 1, "smollm2-router": 1})
    conds = {c.type: c for c in a.conditions}
    assert a.phase == "Failed"
    assert conds["Compressed"].status == "False" and conds["Compressed"].reason == "DeadlineExceeded"
    assert "deadline" in conds["Compressed"].message
    assert conds["Ready"].status == "False" and conds["Ready"].reason == "Failed"


def test_no_fitting_node_is_named_and_degraded() -> None:
    p = planned({"int8": accepted()}, cluster=ClusterView((NodeView("gpu", {"gpu": "h100"}, (),
                                                                     Resources(64000, 512 * GI, 8)),)))
    a = assess(p, {"smollm2-cloud": 1, "smollm2-router": 1})
    conds = {c.type: c for c in a.conditions}
    assert conds["EdgeReady"].reason == "NoFittingNode"
    assert "lacks label stratus.dev/edge=true (gpu)" in conds["EdgeReady"].message
    assert a.phase == "Degraded" and a.edge == (0, 1)


def test_partly_placed_replicas_are_counted_against_what_was_asked() -> None:
    d = dep(replicas=3, tolerations=[{"key": "dedicated", "operator": "Equal", "value": "edge",
                                      "effect": "NoSchedule"}])
    cluster = ClusterView((NodeView("t1", EDGE, (Taint("dedicated", "edge"),), Resources(4000, int(1.2 * GI))),
                           NodeView("t2", EDGE, (), Resources(4000, int(0.8 * GI)))))
    p = planned({"int8": accepted()}, d, cluster)
    a = assess(p, {"smollm2-cloud": 1, "smollm2-router": 1, "smollm2-edge-int8": 2})
    assert a.phase == "Degraded" and a.edge == (2, 3)


def test_policies_without_a_tier() -> None:
    edge_only = planned({"int8": accepted()}, dep("edge-only"))
    a = assess(edge_only, {"smollm2-edge-int8": 1, "smollm2-router": 1})
    assert a.phase == "Ready"
    assert {c.type: c.reason for c in a.conditions}["CloudReady"] == "NotRequested"
    nothing = planned({"int8": result(status="rejected", reasons=["no"])}, dep("edge-only"))
    assert assess(nothing, {}).phase == "Failed"
    cloud_only = planned({}, dep("cloud-only"))
    assert assess(cloud_only, {"smollm2-cloud": 1, "smollm2-router": 1}).phase == "Ready"


def test_ready_when_everything_runs_and_times_are_kept() -> None:
    p = planned({"int8": accepted()})
    a = assess(p, ALL_READY)
    assert a.phase == "Ready" and all(c.status == "True" for c in a.conditions)
    first = build_status(p, ALL_READY, previous=None, now="2026-01-01T00:00:00Z",
                         endpoints=Endpoints("smollm2-router.prod.svc:50051", "smollm2-router.prod.svc:8080"))
    assert first.observed_generation == 3 and first.edge.summary == "1/1" and first.cloud.summary == "1/1"
    assert first.variants[0].nodes == ["e0"] and first.variants[0].size_bytes == 180_000_000
    assert first.variants[0].perplexity_increase == 0.02 and first.variants[0].agreement == 0.9
    assert first.router.endpoint == "smollm2-router.prod.svc:50051" and first.router.ready
    assert first.url == "http://smollm2-router.prod.svc:8080" and first.effective_policy == "cascade"
    assert build_status(Plan.empty("x", 1), {}, previous=None, now="t").url == ""
    assert first.router.backends == ["smollm2-cloud", "smollm2-edge-int8"]
    again = build_status(p, ALL_READY, previous=first, now="2026-01-01T00:05:00Z")
    assert {c.last_transition_time for c in again.conditions} == {"2026-01-01T00:00:00Z"}
    degraded = build_status(p, {**ALL_READY, "smollm2-edge-int8": 0}, previous=first, now="2026-01-01T00:09:00Z")
    times = {c.type: c.last_transition_time for c in degraded.conditions}
    assert times["EdgeReady"] == "2026-01-01T00:09:00Z" and times["CloudReady"] == "2026-01-01T00:00:00Z"
    assert degraded.phase == "Deploying"


def test_status_without_times_tells_a_real_change() -> None:
    p = planned({"int8": accepted()})
    first = build_status(p, ALL_READY, previous=None, now="t1")
    later = build_status(p, ALL_READY, previous=None, now="t2")
    assert first != later and status_without_times(first) == status_without_times(later)
    moved = build_status(p, {**ALL_READY, "smollm2-router": 0}, previous=first, now="t3")
    assert status_without_times(moved) != status_without_times(first)


def test_invalid_spec_status() -> None:
    a = assess(Plan.empty("smollm2", 3), {}, invalid="spec.cloud.replicas: must be >= 0")
    assert a.phase == "Failed" and {c.reason for c in a.conditions} == {"InvalidSpec"}
    status = build_status(Plan.empty("smollm2", 3), {}, previous=None, now="t", invalid="spec: bad")
    assert status.router.endpoint == "" and status.message == "spec: bad"


def test_free_form_job_reasons_become_condition_reasons() -> None:
    odd = CompressionResult.failed("int8", "pod evicted: node pressure", "")
    a = assess(planned({"int8": odd}, cluster=ClusterView.local()), {})
    compressed = next(c for c in a.conditions if c.type == "Compressed")
    assert compressed.reason == "PodEvictedNodePressure"
    build_status(planned({"int8": odd}, cluster=ClusterView.local()), {}, previous=None, now="t")  # validates


def test_an_unbound_artifacts_claim_is_the_compressed_conditions_reason() -> None:
    from stratus_operator.render import claim_problem

    d = dep()
    problem = claim_problem(d, "Pending")
    assert problem is not None and "smollm2-artifacts is Pending" in problem
    assert "ReadWriteMany (the default)" in problem
    assert claim_problem(d, "Bound") is None and claim_problem(d, None) is None
    status = build_status(plan(d, nodes(4), {}), {}, previous=None, now="t", storage_problem=problem)
    compressed = next(c for c in status.conditions if c.type == "Compressed")
    assert (compressed.status, compressed.reason) == ("False", "ArtifactsClaimPending")
    assert "smollm2-artifacts" in compressed.message and status.phase == "Compressing"
    assert "storage.objectStore" in status.message
    # Once the Jobs are done the claim no longer holds anything back.
    done = build_status(plan(d, nodes(4), {"int8": accepted()}), ALL_READY, previous=None, now="t",
                        storage_problem=problem)
    assert next(c for c in done.conditions if c.type == "Compressed").reason == "Accepted"
    m = sample(uid="u")
    m["spec"]["storage"] = {"pvc": {"claimName": "shared"}}
    mine = LLMDeployment.from_manifest(m)
    assert claim_problem(mine, None) == "artifacts claim shared (storage.pvc.claimName) does not exist in default"
    m["spec"]["storage"] = {"objectStore": {"url": "s3://bucket/x"}}
    assert claim_problem(LLMDeployment.from_manifest(m), "Pending") is None


def test_a_storage_change_the_claim_will_not_take_is_said_in_the_compressed_condition() -> None:
    """A claim's access mode and class never change (and it is not resized): said in status, never ignored."""
    from stratus_operator.handlers.handle_index_children import index_child
    from stratus_operator.kube import PVCS
    from stratus_operator.render import RenderOptions, claim_change, render_storage

    m = sample(uid="u")
    before = LLMDeployment.from_manifest(m)
    # What the index records of the claim the operator created (a real API server fills the default class in).
    created = render_storage(before, RenderOptions())[0]
    created["spec"]["storageClassName"] = "standard"
    (info,) = index_child(created, "default", PVCS).values()
    assert info.claim == {"accessMode": "ReadWriteMany", "size": "20Gi", "storageClassName": "standard"}
    assert claim_change(before, info.claim) is None
    m["spec"]["storage"] = {"pvc": {"size": "20480Mi"}}  # the same size, written otherwise
    assert claim_change(LLMDeployment.from_manifest(m), info.claim) is None
    m["spec"]["storage"] = {"pvc": {"size": "50Gi", "storageClassName": "fast", "accessMode": "ReadWriteOnce"}}
    after = LLMDeployment.from_manifest(m)
    change = claim_change(after, info.claim)
    assert change is not None
    assert "accessMode ReadWriteOnce (created ReadWriteMany)" in change
    assert "size 50Gi (created 20Gi)" in change and "storageClassName fast (created standard)" in change
    assert "kubectl delete pvc smollm2-artifacts" in change
    # Another place altogether is not this claim's business (a new Job writes there).
    m["spec"]["storage"] = {"objectStore": {"url": "s3://bucket/x"}}
    assert claim_change(LLMDeployment.from_manifest(m), info.claim) is None

    done = build_status(plan(after, nodes(4), {"int8": accepted()}), ALL_READY, previous=None, now="t",
                        storage_change=change)
    compressed = next(c for c in done.conditions if c.type == "Compressed")
    assert (compressed.status, compressed.reason) == ("True", "ArtifactsClaimUnchanged")
    assert compressed.message.startswith("1 variant(s) passed their gates; spec.storage.pvc asks for")
    assert done.phase == "Ready"
    waiting = build_status(plan(after, nodes(4), {}), {}, previous=None, now="t", storage_change=change)
    compressed = next(c for c in waiting.conditions if c.type == "Compressed")
    assert (compressed.status, compressed.reason) == ("False", "ArtifactsClaimUnchanged")
    assert "waiting for smollm2-compress-int8-" in compressed.message and change in compressed.message
