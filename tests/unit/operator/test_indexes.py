"""The production cluster view: `Observed` over what the index handlers make of real Node, Pod and child bodies."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import pytest

from stratus_operator.handlers.handle_index_children import index_child
from stratus_operator.handlers.handle_index_cluster import index_node, index_pod
from stratus_operator.indexes import CHILD_INDEXES, INDEXES, NODES_INDEX, PODS_INDEX, Observed, child_index
from stratus_operator.kube import CHILDREN, DEPLOYMENTS, JOBS
from stratus_operator.placement import GPU_RESOURCE, Resources
from stratus_workers.compress.spec import CompressionSummary

pytestmark = pytest.mark.unit

MI = 2**20
OURS = {"app.kubernetes.io/managed-by": "stratus-operator"}


def node(name: str, cpu: str = "4", memory: str = "8Gi") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"stratus.dev/edge": "true"}},
            "status": {"allocatable": {"cpu": cpu, "memory": memory}}}


def pod(name: str, namespace: str, node_name: str, memory: str, labels: dict[str, str] | None = None,
        **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node_name,
                     "containers": [{"name": "c", "resources": {"requests": {"memory": memory}}}]},
            "status": {"phase": "Running", **status}}


def indexed(entries: Iterable[dict[Any, Any]]) -> dict[Any, list[Any]]:
    """What kopf keeps for an index: each key with every value the handler returned for it."""
    out: dict[Any, list[Any]] = defaultdict(list)
    for entry in entries:
        for key, value in entry.items():
            out[key].append(value)
    return dict(out)


def observed(nodes: list[dict[str, Any]], pods: list[dict[str, Any]], **children: list[dict[str, Any]]) -> Observed:
    kwargs: dict[str, Any] = {
        NODES_INDEX: indexed(index_node(n, n["metadata"]["name"], GPU_RESOURCE) for n in nodes),
        PODS_INDEX: indexed(index_pod(p, p["metadata"]["namespace"], GPU_RESOURCE) for p in pods),
        "logger": object(), "memo": object(),  # the other kwargs a handler gets
    }
    for resource in CHILDREN:
        bodies = children.get(resource.plural, [])
        kwargs[child_index(resource)] = indexed(index_child(b, b["metadata"]["namespace"], resource) for b in bodies)
    return Observed.from_kwargs(kwargs)


def test_index_names_are_one_set() -> None:
    assert set(INDEXES) == {NODES_INDEX, PODS_INDEX, *CHILD_INDEXES} and len(INDEXES) == len(set(INDEXES))
    assert child_index(JOBS) == "stratus_jobs"


def test_cluster_counts_every_pod_but_the_deployments_own() -> None:
    mine = {**OURS, "app.kubernetes.io/instance": "smollm2"}
    theirs = {**OURS, "app.kubernetes.io/instance": "other"}
    obs = observed(
        [node("edge-b", memory="4Gi"), node("edge-a", memory="2Gi")],
        [pod("busy", "other-team", "edge-a", "900Mi"),              # someone else's pod
         pod("mine", "prod", "edge-a", "700Mi", mine),              # this deployment's: placement keeps it
         pod("same-name", "staging", "edge-b", "300Mi", mine),      # same instance name, other namespace
         pod("theirs", "prod", "edge-b", "100Mi", theirs),
         pod("done", "prod", "edge-b", "5Gi", phase="Succeeded")],  # finished pods hold nothing
    )
    view = obs.cluster("prod", "smollm2")
    assert not view.is_local
    assert [n.name for n in view.nodes] == ["edge-a", "edge-b"]
    requested = {n.name: n.requested for n in view.nodes}
    assert requested["edge-a"] == Resources(0, 900 * MI, 0)
    assert requested["edge-b"] == Resources(0, 400 * MI, 0)
    assert {n.name: n.allocatable.memory for n in view.nodes} == {"edge-a": 2 * 2**30, "edge-b": 4 * 2**30}


def test_an_empty_cluster_has_no_nodes() -> None:
    assert observed([], []).cluster("prod", "smollm2").nodes == ()
    assert Observed({}).cluster("prod", "smollm2").nodes == ()


def test_children_and_the_jobs_termination_message() -> None:
    labels = {**OURS, "app.kubernetes.io/instance": "smollm2"}
    job = {"metadata": {"name": "smollm2-compress-int8-abc", "namespace": "prod", "labels": labels,
                        "annotations": {"stratus.dev/spec-hash": "h1", "stratus.dev/generation": "4"}},
           "spec": {"backoffLimit": 2}, "status": {"succeeded": 1}}
    deployment = {"metadata": {"name": "smollm2-cloud", "namespace": "prod", "labels": labels, "generation": 1,
                               "annotations": {"stratus.dev/spec-hash": "h2"}},
                  "status": {"observedGeneration": 1, "readyReplicas": 2}}
    summary = CompressionSummary(name="int8", status="accepted", size_bytes=10).to_json()
    job_pod = pod("smollm2-compress-int8-abc-x", "prod", "edge-a", "1Gi",
                  {**labels, "batch.kubernetes.io/job-name": "smollm2-compress-int8-abc"}, phase="Succeeded",
                  containerStatuses=[{"name": "compress", "state": {"terminated": {"exitCode": 0,
                                                                                  "message": summary}}}])
    obs = observed([node("edge-a")], [job_pod], jobs=[job], deployments=[deployment])
    children = obs.children("prod", "smollm2")
    assert set(children) == {("Job", "smollm2-compress-int8-abc"), ("Deployment", "smollm2-cloud")}
    info = children[("Job", "smollm2-compress-int8-abc")]
    assert (info.api_version, info.spec_hash, info.job) == (
        JOBS.api_version, "h1", {"spec": {"backoffLimit": 2}, "status": {"succeeded": 1}, "generation": 4})
    assert children[("Deployment", "smollm2-cloud")].ready == 2
    assert children[("Deployment", "smollm2-cloud")].api_version == DEPLOYMENTS.api_version
    assert obs.job_message("prod", "smollm2-compress-int8-abc") == summary
    assert obs.job_message("prod", "other-job") is None
    assert obs.children("staging", "smollm2") == {}
