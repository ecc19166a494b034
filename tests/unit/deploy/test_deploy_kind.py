"""deploy/kind/cluster.yaml fits the samples, the chart's defaults and the operator's placement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import DEPLOY_DIR

from stratus_operator.placement import ClusterView
from stratus_operator.planner import CompressionResult, plan
from stratus_operator.spec import LLMDeployment
from stratus_workers.compress.spec import CompressionSummary

pytestmark = pytest.mark.unit

KIND_CONFIG = DEPLOY_DIR / "kind" / "cluster.yaml"
SAMPLES = sorted((DEPLOY_DIR / "samples").glob("*.yaml"))
ADMISSION = "ExtendedResourceToleration"


def kind_nodes() -> list[dict[str, Any]]:
    """The kind nodes as v1 Node objects (names as kind gives them), each with 8 CPUs and 16Gi."""
    config = yaml.safe_load(KIND_CONFIG.read_text())
    nodes, workers = [], 0
    for node in config["nodes"]:
        if node["role"] == "control-plane":
            name = "stratus-control-plane"
        else:
            workers += 1
            name = "stratus-worker" + (str(workers) if workers > 1 else "")
        taints: list[dict[str, str]] = []
        for patch in node.get("kubeadmConfigPatches", []):
            doc = yaml.safe_load(patch)
            if doc["kind"] in ("InitConfiguration", "JoinConfiguration"):
                taints = doc.get("nodeRegistration", {}).get("taints") or []
        resources = {"cpu": "8", "memory": "16Gi", "pods": "110"}
        nodes.append({
            "metadata": {"name": name, "labels": {**node.get("labels", {}), "kubernetes.io/hostname": name}},
            "spec": {"taints": taints},
            "status": {"allocatable": resources, "capacity": resources},
        })
    return nodes


def _tolerated(taint: dict[str, str], tolerations: list[dict[str, Any]]) -> bool:
    for t in tolerations:
        key_ok = t.get("key") in (None, "", taint["key"])
        value_ok = t.get("operator") == "Exists" or t.get("value") == taint.get("value")
        effect_ok = not t.get("effect") or t["effect"] == taint["effect"]
        if key_ok and value_ok and effect_ok:
            return True
    return False


def _with_labels(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [n for n in kind_nodes() if all(n["metadata"]["labels"].get(k) == v for k, v in labels.items())]


def test_topology_one_gpu_two_edge_and_an_untainted_control_plane(chart: Any) -> None:
    values = chart.values
    nodes = kind_nodes()
    assert len(nodes) == 4
    control_plane = nodes[0]
    assert control_plane["spec"]["taints"] == [], "the operator and router need an untainted node"
    (gpu,) = _with_labels({"nvidia.com/gpu.present": "true"})
    # ExtendedResourceToleration tolerates taints keyed by the requested resource's name.
    assert [t["key"] for t in gpu["spec"]["taints"]] == [values["cloud"]["gpuResourceName"]]
    edges = _with_labels(values["edge"]["nodeSelector"])
    assert len(edges) == 2 and gpu not in edges
    for edge in edges:
        assert edge["spec"]["taints"], "edge nodes are tainted so only edge variants land there"
        assert all(_tolerated(t, values["edge"]["tolerations"]) for t in edge["spec"]["taints"])


def test_gpu_taint_is_tolerated_through_the_admission_plugin() -> None:
    (control_plane,) = [n for n in yaml.safe_load(KIND_CONFIG.read_text())["nodes"] if n["role"] == "control-plane"]
    patches = [yaml.safe_load(p) for p in control_plane["kubeadmConfigPatches"]]
    cluster = {p["apiVersion"]: p["apiServer"]["extraArgs"] for p in patches if p["kind"] == "ClusterConfiguration"}
    assert ADMISSION in cluster["kubeadm.k8s.io/v1beta3"]["enable-admission-plugins"].split(",")
    (arg,) = [a for a in cluster["kubeadm.k8s.io/v1beta4"] if a["name"] == "enable-admission-plugins"]
    assert ADMISSION in arg["value"].split(",")


def _edge_samples() -> list[Path]:
    return [s for s in SAMPLES if (yaml.safe_load(s.read_text())["spec"].get("edge") or {}).get("variants")]


@pytest.mark.parametrize("sample", _edge_samples(), ids=lambda p: p.stem)
def test_operator_places_every_edge_variant_on_the_kind_edge_nodes(sample: Path, chart: Any) -> None:
    manifest = yaml.safe_load(sample.read_text())
    manifest["metadata"].update(namespace="default", uid="0000-test")
    try:
        deployment = LLMDeployment.from_manifest(manifest)
    except ValueError:
        pytest.skip("not a valid LLMDeployment; test_deploy_samples.py reports why")
    # As the chart-installed operator does: variants without their own nodeSelector / tolerations
    # get the chart's edge defaults (STRATUS_EDGE_NODE_SELECTOR / STRATUS_EDGE_TOLERATIONS).
    edge = chart.values["edge"]
    deployment = deployment.with_edge_defaults(node_selector=edge["nodeSelector"],
                                               tolerations=tuple(edge["tolerations"]))
    results = {v.name: CompressionResult(CompressionSummary(name=v.name, status="accepted", size_bytes=150 * 2**20))
               for v in deployment.spec.edge.variants}
    p = plan(deployment, ClusterView.from_objects(kind_nodes()), results)
    edge_nodes = {n["metadata"]["name"] for n in _with_labels(chart.values["edge"]["nodeSelector"])}
    for variant in p.variants:
        server = next(s for s in p.servers if s.variant == variant.name)
        assert server.placement.nodes, f"{variant.name}: {server.placement}"
        assert set(server.placement.nodes) <= edge_nodes


def test_every_node_shares_the_model_cache_and_artifact_folders(chart: Any) -> None:
    nodes = yaml.safe_load(KIND_CONFIG.read_text())["nodes"]
    mounts = [{m["hostPath"]: m["containerPath"] for m in n.get("extraMounts", [])} for n in nodes]
    assert all(m == mounts[0] for m in mounts), "one host folder behind every node, like shared storage"
    # No hostPath cache by default (a stock node lacks the folder; baseline/restricted namespaces refuse it):
    # the chart and the operator agree, and kind offers the folder for those who opt in.
    config = pytest.importorskip("stratus_operator.config")
    assert config.Config.cache_host_path == chart.values["modelCache"]["hostPath"] == ""
    assert "/var/cache/stratus" in mounts[0].values()
