"""Rendering: every child is a valid Kubernetes object with owner, labels and spec hash; sources and storage."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from samples import ROOT, SAMPLES, all_accepted

from stratus_operator.placement import ClusterView, NodeView, Resources
from stratus_operator.planner import Plan, plan
from stratus_operator.render import RenderOptions, render_cleanup, render_plan
from stratus_operator.spec import LLMDeployment
from stratus_workers.compress.spec import CompressionJobSpec
from stratus_workers.router.config import RouterConfig

pytestmark = pytest.mark.unit

K8S_VERSION = "1.31"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
NODES = ClusterView(tuple(NodeView(f"edge-{i}", {"stratus.dev/edge": "true", "kubernetes.io/hostname": f"h{i}"}, (),
                                   Resources(8000, 64 * 2**30, 0)) for i in range(3)))


def load(path: Path, **spec_changes: Any) -> LLMDeployment:
    m = yaml.safe_load(path.read_text())
    m["metadata"].update(uid="11111111-2222-3333-4444-555555555555", namespace="team-a")
    m["spec"].update(spec_changes)
    return LLMDeployment.from_manifest(m)


def render(p: Plan, d: LLMDeployment, options: RenderOptions | None = None) -> list[dict[str, Any]]:
    return render_plan(p, d, options or RenderOptions())


def rendered(d: LLMDeployment, options: RenderOptions | None = None) -> list[dict[str, Any]]:
    return render(plan(d, NODES, all_accepted(d)), d, options)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_every_child_is_valid_owned_labelled_and_hashed(sample: Path) -> None:
    d = load(sample)
    objects = rendered(d) + render(plan(d, NODES, {}), d)
    assert objects
    for obj in objects:
        # The Kubernetes OpenAPI schemas of the kind, strictly: a typo in a field name fails here.
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        meta = obj["metadata"]
        assert DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [{
            "apiVersion": "stratus.dev/v1alpha1", "kind": "LLMDeployment", "name": d.metadata.name,
            "uid": d.metadata.uid, "controller": True, "blockOwnerDeletion": True}]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "stratus"
        assert labels["app.kubernetes.io/instance"] == d.metadata.name
        assert labels["app.kubernetes.io/managed-by"] == "stratus-operator"
        assert labels["app.kubernetes.io/component"]
        assert re.fullmatch(r"[0-9a-f]{16}", meta["annotations"]["stratus.dev/spec-hash"])


def test_spec_hash_changes_only_with_the_object() -> None:
    d = load(ROOT / "deploy" / "samples" / "smollm2.yaml")
    def hashes(objects: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
        return {(o["kind"], o["metadata"]["name"]): o["metadata"]["annotations"]["stratus.dev/spec-hash"]
                for o in objects}

    a = hashes(rendered(d))
    b = hashes(rendered(d))
    assert a == b
    m = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"].update(uid=d.metadata.uid, namespace="team-a")
    m["spec"]["cloud"]["serving"]["maxBatchSize"] = 64
    c = hashes(rendered(LLMDeployment.from_manifest(m)))
    changed = {key for key in a if a[key] != c[key]}
    assert changed == {("Deployment", "smollm2-cloud")}  # its Service and the router stay


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_default_storage_pvc_job_and_edge_fetch() -> None:
    d = load(ROOT / "deploy" / "samples" / "smollm2.yaml")
    objects = rendered(d)
    assert list(by_kind(objects, "PersistentVolumeClaim")) == ["smollm2-artifacts"]
    job = next(iter(by_kind(objects, "Job").values()))
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["backoffLimit"] == 2 and pod["restartPolicy"] == "Never"
    # Verdicts (bad input 2, gate rejection 3) fail the Job at once; crashes are retried with back-off.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "compress", "operator": "In",
                                                             "values": [2, 3]}}
    assert rules[1]["action"] == "Ignore"
    compress = pod["containers"][0]
    assert compress["terminationMessagePath"] == "/dev/termination-log"
    assert compress["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "artifacts", "mountPath": "/artifacts", "subPath": "smollm2"} in compress["volumeMounts"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "smollm2-artifacts"}} in pod["volumes"]
    # bundled: the image's converted copy, linked into the Job's writable cache (no conversion, no fetch)
    assert [c["name"] for c in pod["initContainers"]] == ["prepare-cache"]
    assert "ln -s /opt/stratus/cache/models/smollm2-135m-instruct /cache/models/smollm2-135m-instruct" in \
        pod["initContainers"][0]["command"][2]
    assert {"name": "cache", "hostPath": {"path": "/var/cache/stratus", "type": "Directory"}} in pod["volumes"]
    assert {"name": "STRATUS_CACHE_DIR", "value": "/cache"} in compress["env"]

    edge = by_kind(objects, "Deployment")["smollm2-edge-int8"]
    edge_pod = edge["spec"]["template"]["spec"]
    assert "initContainers" not in edge_pod  # the artifact is read in place from the claim
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "smollm2-artifacts", "readOnly": True}} \
        in edge_pod["volumes"]
    assert {"name": "artifacts", "mountPath": "/artifacts", "subPath": "smollm2", "readOnly": True} in \
        edge_pod["containers"][0]["volumeMounts"]
    model = edge_pod["containers"][0]["command"]
    assert model[model.index("--model") + 1] == "/artifacts/int8"
    affinity = edge["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    values = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchFields"]
    assert values[0]["values"] == ["edge-0"]

    router = by_kind(objects, "Deployment")["smollm2-router"]
    assert router["spec"]["template"]["metadata"]["annotations"]["stratus.dev/config-hash"]
    svc = by_kind(objects, "Service")["smollm2-router"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [50051, 8080]


def test_object_store_and_existing_claim() -> None:
    d = load(ROOT / "deploy" / "samples" / "smollm2.yaml",
             storage={"objectStore": {"url": "s3://models/stratus", "secretName": "s3-creds"}})
    objects = rendered(d)
    assert by_kind(objects, "PersistentVolumeClaim") == {}
    pod = next(iter(by_kind(objects, "Job").values()))["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["prepare-cache", "compress"]
    upload = pod["containers"][0]
    assert upload["name"] == "upload" and "s3://models/stratus/team-a/smollm2/int8" in upload["command"][2]
    assert {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds",
                                                                        "key": "AWS_ACCESS_KEY_ID"}}} in upload["env"]
    edge = by_kind(objects, "Deployment")["smollm2-edge-int8"]["spec"]["template"]["spec"]
    assert "aws s3 sync s3://models/stratus/team-a/smollm2/int8" in edge["initContainers"][0]["command"][2]
    cleanup = render_cleanup(d, RenderOptions())
    assert "aws s3 rm --recursive s3://models/stratus/team-a/smollm2" in cleanup[0]["spec"]["template"]["spec"][
        "containers"][0]["command"][2]
    assert "ownerReferences" not in cleanup[0]["metadata"]

    claim = load(ROOT / "deploy" / "samples" / "smollm2.yaml", storage={"pvc": {"claimName": "shared"}})
    objects = rendered(claim)
    assert by_kind(objects, "PersistentVolumeClaim") == {}
    pod = next(iter(by_kind(objects, "Job").values()))["spec"]["template"]["spec"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
    assert "rm -rf /artifacts/smollm2" in render_cleanup(claim, RenderOptions())[0]["spec"]["template"]["spec"][
        "containers"][0]["command"][2]
    assert render_cleanup(load(ROOT / "deploy" / "samples" / "smollm2.yaml"), RenderOptions()) == []


@pytest.mark.parametrize(("source", "model_arg", "init"), [
    ("s3://bucket/models/smol", "/cache/models/", "aws s3 sync s3://bucket/models/smol"),
    ("pvc://models-claim/smollm2", "/models/models-claim/smollm2", None),
    ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "/cache/models/", "snapshot_download"),
    ("/opt/models/smol", "/opt/models/smol", None),
    ("bundled://smollm2-135m-instruct", "bundled://smollm2-135m-instruct", None),
])
def test_model_sources(source: str, model_arg: str, init: str | None) -> None:
    d = load(ROOT / "deploy" / "samples" / "smollm2.yaml", model={"source": source})
    cloud = by_kind(rendered(d), "Deployment")["smollm2-cloud"]["spec"]["template"]["spec"]
    command = cloud["containers"][0]["command"]
    assert command[command.index("--model") + 1].startswith(model_arg)
    if init is None:
        assert "initContainers" not in cloud
        assert not any(v["name"] == "cache" for v in cloud["volumes"])
    else:
        assert init in " ".join(cloud["initContainers"][0]["command"])
        assert {"name": "cache", "hostPath": {"path": "/var/cache/stratus", "type": "Directory"}} in cloud["volumes"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": cloud},
                                 K8S_VERSION, strict=True)


def test_autoscaling_renders_hpas_and_leaves_replicas_to_them() -> None:
    m = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"].update(uid="u", namespace="team-a")
    m["spec"]["cloud"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 4, "targetCpuUtilization": 60}
    m["spec"]["edge"]["variants"][0]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 3, "metric": "queue-depth",
                                                       "targetQueueDepth": 2}
    d = LLMDeployment.from_manifest(m)
    objects = rendered(d)
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    assert set(hpas) == {"smollm2-cloud", "smollm2-edge-int8"}
    cloud = hpas["smollm2-cloud"]["spec"]
    assert cloud["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "smollm2-cloud"}
    assert cloud["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
    edge = hpas["smollm2-edge-int8"]["spec"]
    assert edge["metrics"][0] == {"type": "Pods", "pods": {"metric": {"name": "stratus_queue_depth"},
                                                           "target": {"type": "AverageValue", "averageValue": "2"}}}
    deployments = by_kind(objects, "Deployment")
    assert "replicas" not in deployments["smollm2-cloud"]["spec"]
    assert "replicas" not in deployments["smollm2-edge-int8"]["spec"]
    assert deployments["smollm2-router"]["spec"]["replicas"] == 1
    for obj in hpas.values():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_render_options_reach_the_pods() -> None:
    d = load(ROOT / "deploy" / "samples" / "smollm2.yaml")
    options = RenderOptions(image="registry.local/stratus-workers:dev", image_pull_policy="Always",
                            cache_host_path="/mnt/cache")
    for obj in rendered(d, options):
        if obj["kind"] in ("Deployment", "Job"):
            spec = obj["spec"]["template"]["spec"]
            for c in spec["containers"] + spec.get("initContainers", []):
                assert c["image"] == "registry.local/stratus-workers:dev" and c["imagePullPolicy"] == "Always"
            assert any(v.get("hostPath", {}).get("path") == "/mnt/cache" for v in spec["volumes"]) or \
                obj["kind"] == "Deployment"  # bundled servers and the router fetch nothing


def test_tensor_parallel_cloud_pod_gets_flag_gpus_and_shared_memory() -> None:
    manifest = yaml.safe_load((ROOT / "deploy/samples/smollm2.yaml").read_text())
    manifest["spec"]["cloud"].update({"gpusPerPod": 2, "tensorParallel": 2})
    deployment = LLMDeployment.from_manifest(manifest)
    objects = render(plan(deployment, ClusterView.local(), {}), deployment)
    cloud = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-cloud"))
    pod = cloud["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["command"] if "command" in container else container["args"]
    assert command[command.index("--tensor-parallel") + 1] == "2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] in ("2", 2)
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_gpu_job_requests_its_gpu_lands_on_gpu_nodes_and_trains_on_cuda() -> None:
    d = load(ROOT / "deploy" / "samples" / "smollm2-compression-gpu.yaml")
    jobs = by_kind(rendered(d), "Job")
    assert len(jobs) == 4
    for job in jobs.values():
        pod = job["spec"]["template"]["spec"]
        compress = next(c for c in pod["containers"] if c["name"] == "compress")
        assert compress["resources"]["requests"]["nvidia.com/gpu"] == compress["resources"]["limits"][
            "nvidia.com/gpu"] == "1"
        assert compress["command"][-2:] == ["--device", "cuda"]
        assert pod["nodeSelector"] == {"stratus.dev/gpu": "true"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    student = next(j for name, j in jobs.items() if "student-15l-" in name and "int8" not in name)
    resources = student["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                         "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"}}
    # A variant that asks for nothing keeps the operator's defaults and picks its device itself.
    plain = next(iter(by_kind(rendered(load(ROOT / "deploy" / "samples" / "smollm2.yaml")), "Job").values()))
    container = plain["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == RenderOptions().compress_resources and "--device" not in container["command"]
    assert "nodeSelector" not in plain["spec"]["template"]["spec"]


def test_rendered_job_and_configs_are_what_the_workers_read() -> None:
    d = load(ROOT / "deploy" / "samples" / "smollm2.yaml")
    objects = rendered(d)
    job = next(o for o in objects if o["kind"] == "Job")
    spec_cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == job["metadata"]["name"])
    spec = CompressionJobSpec.model_validate(json.loads(spec_cm["data"]["spec.json"]))
    assert spec.name == "int8" and spec.model_source == "bundled://smollm2-135m-instruct"
    router_cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "smollm2-router")
    config = RouterConfig.model_validate(json.loads(router_cm["data"]["router.json"]))
    # render binds the plan's backend names to Service DNS names and their gRPC port.
    assert {(b.name, b.address, b.tier) for b in config.backends} == {
        ("smollm2-cloud", "smollm2-cloud.team-a.svc:50051", "cloud"),
        ("smollm2-edge-int8", "smollm2-edge-int8.team-a.svc:50051", "edge")}
    assert config.routing.policy == "cascade"
