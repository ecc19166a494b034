"""The scheduler, kubelet, volume binder and workload controller stand-ins decide as their real counterparts do."""

from __future__ import annotations

import re
from typing import Any

import pytest
from harness_objects import deployment, pod
from kube_emulator import DEPLOYMENTS, EVENTS, HPAS, JOBS, LLMD, NAMESPACES, PODS, PVCS, Emulator

pytestmark = pytest.mark.unit


def _events(emu: Emulator, name: str, reason: str) -> list[str]:
    return [e["message"] for e in emu.read_all(EVENTS) if e["involvedObject"].get("name") == name
            and e["reason"] == reason]


def _pod(emu: Emulator, name: str) -> dict[str, Any]:
    found = emu.read(PODS, "default", name)
    assert found is not None, name
    return found


def _scheduled(emu: Emulator, name: str) -> dict[str, Any]:
    conditions = (_pod(emu, name).get("status") or {}).get("conditions") or []
    return next(c for c in conditions if c["type"] == "PodScheduled")


async def test_pod_lands_only_where_labels_taints_and_capacity_admit_it(emu: Emulator) -> None:
    c = emu.controllers
    await c.add_node("small", cpu="1", memory="1Gi", labels={"pool": "edge"})
    await c.add_node("tainted", cpu="8", memory="16Gi", labels={"pool": "edge"},
                     taints=[{"key": "dedicated", "value": "camera", "effect": "NoSchedule"}])
    await c.add_node("big", cpu="8", memory="16Gi", labels={"pool": "cloud"})
    wanted = pod("want", nodeSelector={"pool": "edge"})
    wanted["spec"]["containers"][0]["resources"] = {"requests": {"memory": "2Gi"}}
    await emu.create_obj(PODS, "default", wanted)
    await c.settle()
    condition = _scheduled(emu, "want")
    assert condition["status"] == "False" and condition["reason"] == "Unschedulable"
    assert condition["message"].startswith(
        "0/3 nodes are available: 1 Insufficient memory, 1 node(s) didn't match Pod's node affinity/selector, "
        "1 node(s) had untolerated taint {dedicated: camera}.")
    assert _events(emu, "want", "FailedScheduling") == [condition["message"]]
    assert _pod(emu, "want")["status"]["phase"] == "Pending"
    # Tolerating the taint is enough: it lands there.
    await emu.delete_obj(PODS, "default", "want")
    wanted["spec"]["tolerations"] = [{"key": "dedicated", "operator": "Equal", "value": "camera",
                                      "effect": "NoSchedule"}]
    await emu.create_obj(PODS, "default", wanted)
    await c.settle()
    assert _pod(emu, "want")["spec"]["nodeName"] == "tainted"
    assert _pod(emu, "want")["status"]["phase"] == "Running"


async def test_capacity_counts_the_requests_of_pods_already_bound(emu: Emulator) -> None:
    c = emu.controllers
    await c.add_node("gpu-1", cpu="8", memory="32Gi", extended={"nvidia.com/gpu": "1"})
    for name in ("first", "second"):
        p = pod(name)
        p["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
        await emu.create_obj(PODS, "default", p)
    await c.settle()
    # Limits without requests default the requests (as the API server does for pods).
    assert _pod(emu, "first")["spec"]["containers"][0]["resources"]["requests"] == {"nvidia.com/gpu": "1"}
    assert _pod(emu, "first")["spec"].get("nodeName") == "gpu-1"
    assert "1 Insufficient nvidia.com/gpu" in _scheduled(emu, "second")["message"]


async def test_node_affinity_pins_by_name(emu: Emulator) -> None:
    c = emu.controllers
    for name in ("edge-1", "edge-2"):
        await c.add_node(name)
    pinned = pod("pinned", affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["edge-2"]}]}]}}})
    await emu.create_obj(PODS, "default", pinned)
    await c.settle()
    assert _pod(emu, "pinned")["spec"]["nodeName"] == "edge-2"


async def test_missing_host_directory_leaves_the_pod_container_creating(emu: Emulator) -> None:
    c = emu.controllers
    await c.add_node("bare")
    await c.add_node("prepared", host_dirs={"/var/cache/stratus"})
    volume = [{"name": "cache", "hostPath": {"path": "/var/cache/stratus", "type": "Directory"}}]
    await emu.create_obj(PODS, "default", pod("on-bare", volumes=volume, nodeName="bare"))
    await emu.create_obj(PODS, "default", pod("on-prepared", volumes=volume, nodeName="prepared"))
    await c.settle()
    stuck = _pod(emu, "on-bare")
    assert stuck["status"]["phase"] == "Pending"
    assert stuck["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ContainerCreating"
    assert _events(emu, "on-bare", "FailedMount") == [
        'MountVolume.SetUp failed for volume "cache" : hostPath type check failed: /var/cache/stratus is not a '
        "directory"]
    assert _pod(emu, "on-prepared")["status"]["phase"] == "Running"


async def test_missing_secret_key_fails_the_mount(emu: Emulator) -> None:
    from kube_emulator import SECRETS

    c = emu.controllers
    await c.add_node("n")
    await emu.create_obj(SECRETS, "default", {"metadata": {"name": "tls"}, "data": {"tls.crt": "eA=="}})
    volume = [{"name": "tls", "secret": {"secretName": "tls", "items": [{"key": "ca.key", "path": "ca.key"}]}}]
    await emu.create_obj(PODS, "default", pod("reader", volumes=volume))
    await c.settle()
    assert _events(emu, "reader", "FailedMount") == [
        'MountVolume.SetUp failed for volume "tls" : references non-existent secret key: ca.key']


def _claim(name: str, mode: str, klass: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": [mode], "resources": {"requests": {"storage": "1Gi"}}}
    if klass is not None:
        spec["storageClassName"] = klass
    return {"metadata": {"name": name}, "spec": spec}


async def test_claim_without_a_class_or_with_an_unsupported_mode_stays_pending(emu: Emulator) -> None:
    c = emu.controllers
    await emu.create_obj(PVCS, "default", _claim("no-class", "ReadWriteMany"))
    await c.settle()
    assert (emu.read(PVCS, "default", "no-class") or {})["status"]["phase"] == "Pending"
    assert _events(emu, "no-class", "FailedBinding") == [
        "no persistent volumes available for this claim and no storage class is set"]
    # A block-storage default class: the claim gets it at admission, and it cannot offer ReadWriteMany.
    await c.volumes.add_class("gp3", "ebs.csi.aws.com", default=True)
    await emu.create_obj(PVCS, "default", _claim("rwx", "ReadWriteMany"))
    await emu.create_obj(PVCS, "default", _claim("rwo", "ReadWriteOnce"))
    await c.settle()
    rwx = emu.read(PVCS, "default", "rwx") or {}
    assert rwx["spec"]["storageClassName"] == "gp3" and rwx["status"]["phase"] == "Pending"
    assert "Volume capabilities MULTI_NODE_MULTI_WRITER not supported" in _events(emu, "rwx", "ProvisioningFailed")[0]
    assert (emu.read(PVCS, "default", "rwo") or {})["status"]["phase"] == "Bound"


async def test_rwo_claim_cannot_attach_on_a_second_node_and_rwop_not_to_a_second_pod(emu: Emulator) -> None:
    c = emu.controllers
    for name in ("n1", "n2"):
        await c.add_node(name)
    await c.volumes.add_class("gp3", "ebs.csi.aws.com", default=True)
    await emu.create_obj(PVCS, "default", _claim("rwo", "ReadWriteOnce"))
    await emu.create_obj(PVCS, "default", _claim("rwop", "ReadWriteOncePod"))
    await c.settle()

    def user(name: str, claim: str, node: str | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]}
        if node:
            extra["nodeName"] = node
        return pod(name, **extra)

    await emu.create_obj(PODS, "default", user("a", "rwo", "n1"))
    await c.settle()
    await emu.create_obj(PODS, "default", user("b", "rwo", "n2"))
    await emu.create_obj(PODS, "default", user("c", "rwo", "n1"))
    await c.settle()
    assert _pod(emu, "c")["status"]["phase"] == "Running"  # same node: fine
    assert _pod(emu, "b")["status"]["phase"] == "Pending"
    multi = _events(emu, "b", "FailedAttachVolume")
    assert multi and all(m.startswith("Multi-Attach error for volume") and "used by pod(s) a" in m for m in multi)
    await emu.create_obj(PODS, "default", user("d", "rwop"))
    await c.settle()
    await emu.create_obj(PODS, "default", user("e", "rwop"))
    await c.settle()
    assert _pod(emu, "d")["status"]["phase"] == "Running"
    assert "ReadWriteOncePod access mode already in-use by another pod" in _scheduled(emu, "e")["message"]


async def test_wait_for_first_consumer_binds_next_to_the_pod_and_keeps_later_pods_there(emu: Emulator) -> None:
    c = emu.controllers
    for name in ("n1", "n2"):
        await c.add_node(name)
    await c.volumes.add_class("standard", "rancher.io/local-path", default=True, binding_mode="WaitForFirstConsumer")
    await emu.create_obj(PVCS, "default", _claim("local", "ReadWriteOnce"))
    await c.settle()
    assert _events(emu, "local", "WaitForFirstConsumer")
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "local"}}]
    await emu.create_obj(PODS, "default", pod("first", volumes=volumes, nodeName="n2"))
    await c.settle()
    assert (emu.read(PVCS, "default", "local") or {})["status"]["phase"] == "Bound"
    await emu.create_obj(PODS, "default", pod("second", volumes=volumes, nodeSelector={
        "kubernetes.io/hostname": "n1"}))
    await c.settle()
    assert "1 node(s) had volume node affinity conflict" in _scheduled(emu, "second")["message"]


async def test_rolling_update_respects_max_surge_and_max_unavailable(emu: Emulator) -> None:
    c = emu.controllers
    await c.add_node("n", cpu="1", memory="1Gi")
    web = deployment()
    web["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] = {"memory": "700Mi"}
    web["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    await emu.create_obj(DEPLOYMENTS, "default", web)
    await c.settle()
    first = [p["metadata"]["name"] for p in emu.read_all(PODS, "default")]
    assert len(first) == 1
    # A template change: the surge pod does not fit beside the old one, and nothing may go first.
    await emu.patch_obj(DEPLOYMENTS, "default", "web", {"spec": {"template": {"metadata": {"annotations": {
        "restarted": "1"}}}}})
    await c.settle()
    pods = emu.read_all(PODS, "default")
    assert len(pods) == 2 and first[0] in [p["metadata"]["name"] for p in pods]
    status = (emu.read(DEPLOYMENTS, "default", "web") or {})["status"]
    assert status["updatedReplicas"] == 1 and status["readyReplicas"] == 1  # stuck: the old pod still serves
    # maxUnavailable 1 lets the old pod go first; the rollout completes.
    await emu.patch_obj(DEPLOYMENTS, "default", "web", {"spec": {"strategy": {"rollingUpdate": {
        "maxSurge": 0, "maxUnavailable": 1}}}})
    await c.settle()
    pods = emu.read_all(PODS, "default")
    assert len(pods) == 1 and first[0] != pods[0]["metadata"]["name"]
    assert pods[0]["status"]["phase"] == "Running"


async def test_pod_security_refuses_host_paths_in_a_baseline_namespace(emu: Emulator) -> None:
    c = emu.controllers
    await c.add_node("n")
    await emu.create_obj(NAMESPACES, None, {"metadata": {"name": "team", "labels": {
        "pod-security.kubernetes.io/enforce": "baseline"}}})
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "compress", "namespace": "team"},
           "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "w:1"}],
                                          "volumes": [{"name": "cache", "hostPath": {"path": "/var/cache/stratus",
                                                                                     "type": "Directory"}}]}}}}
    with emu.acting_as("stratus-operator") as request:
        await emu.create_obj(JOBS, "team", job)
    assert request.warnings == ['would violate PodSecurity "baseline:latest": hostPath volumes (volume "cache")']
    await c.settle()
    assert not emu.read_all(PODS, "team")
    created = [e["message"] for e in emu.read_all(EVENTS, "team") if e["reason"] == "FailedCreate"]
    assert len(created) == 1
    assert re.fullmatch(r'Error creating: pods "compress-[a-z0-9]{5}" is forbidden: violates PodSecurity '
                        r'"baseline:latest": hostPath volumes \(volume "cache"\)', created[0]), created


async def test_job_controller_runs_one_pod_and_completes_when_it_succeeds(emu: Emulator) -> None:
    c = emu.controllers
    await c.add_node("n")
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
           "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "w:1"}]}}}}
    await emu.create_obj(JOBS, "default", job)
    await c.settle()
    pods = emu.read_all(PODS, "default")
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Running"
    await c.kubelet.terminate(pods[0], message='{"ok": true}')
    await c.settle()
    conditions = (emu.read(JOBS, "default", "once") or {})["status"]["conditions"]
    assert [(x["type"], x["status"]) for x in conditions] == [("Complete", "True")]


async def test_namespace_controller_waits_for_finalizers_then_removes_the_namespace(emu: Emulator) -> None:
    import yaml
    from operator_harness import ROOT

    c = emu.controllers
    await emu.create_obj(NAMESPACES, None, {"metadata": {"name": "doomed"}})
    manifest = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    manifest["metadata"] = {"name": "m", "namespace": "doomed", "finalizers": ["stratus.dev/cleanup"]}
    await emu.create_obj(LLMD, "doomed", manifest)
    await emu.delete_obj(NAMESPACES, None, "doomed")
    await c.settle()
    namespace = emu.read(NAMESPACES, None, "doomed") or {}
    assert namespace["status"]["conditions"][0]["message"] == (
        "Some content in the namespace has finalizers remaining: stratus.dev/cleanup in 1 resource instances")
    await emu.patch_obj(LLMD, "doomed", "m", {"metadata": {"finalizers": None}})
    await c.settle()
    assert emu.read(NAMESPACES, None, "doomed") is None


async def test_hpa_cannot_scale_on_cpu_without_cpu_requests(emu: Emulator) -> None:
    c = emu.controllers
    web = deployment()
    web["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"},
                                                                     "requests": {"nvidia.com/gpu": "1"}}
    await emu.create_obj(DEPLOYMENTS, "default", web)
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                    "minReplicas": 1, "maxReplicas": 3, "metrics": [{"type": "Resource", "resource": {
                        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}}
    await emu.create_obj(HPAS, "default", hpa)
    await c.hpas.run()
    active = (emu.read(HPAS, "default", "web") or {})["status"]["conditions"][1]
    assert (active["status"], active["reason"]) == ("False", "FailedGetResourceMetric")
    assert 'missing request for cpu in container "c"' in active["message"]
    await emu.patch_obj(DEPLOYMENTS, "default", "web", {"spec": {"template": {"spec": {"containers": [
        {"name": "c", "image": "nginx:1.27", "resources": {"requests": {"cpu": "1", "nvidia.com/gpu": "1"},
                                                           "limits": {"nvidia.com/gpu": "1"}}}]}}}})
    await c.hpas.run()
    active = (emu.read(HPAS, "default", "web") or {})["status"]["conditions"][1]
    assert (active["status"], active["reason"]) == ("True", "ValidMetricFound")
