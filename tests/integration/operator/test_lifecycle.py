"""The real operator process against the API emulator: an LLMDeployment from apply to Ready to deletion."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import yaml
from kube_emulator import CONFIGMAPS, DEPLOYMENTS, EVENTS, JOBS, LLMD, NODES, PODS, SECRETS, SERVICES, Emulator
from operator_harness import ROOT, OperatorProcess, eventually

from stratus_workers.compress.spec import CompressionJobSpec, CompressionSummary
from stratus_workers.router.config import RouterConfig

pytestmark = pytest.mark.integration

NS = "default"
INSTANCE = "app.kubernetes.io/instance"
# What the worker would write (the contract test, tests/unit/operator/test_compression_contract.py, runs the real one).
SUMMARY = CompressionSummary(
    name="int8", status="accepted", recipe="quantize:int8-weight", artifact="/artifacts/int8", size_bytes=180_000_000,
    size_ratio=0.27, perplexity=13.2, full_perplexity=12.9, perplexity_increase=0.0233, tokens_per_second=41.5,
    agreement=0.94,
)


def sample() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())  # type: ignore[no-any-return]


async def add_nodes(emu: Emulator) -> None:
    """A GPU node, a roomy edge node, an edge node too full for the variant, a tainted edge node."""
    def node(name: str, labels: dict[str, str], cpu: str, memory: str, taints: list[dict[str, str]] | None = None,
             gpu: str | None = None) -> dict[str, Any]:
        alloc = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": gpu} if gpu else {})}
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
                "spec": {"taints": taints or []},
                "status": {"allocatable": alloc, "conditions": [{"type": "Ready", "status": "True"}]}}

    for obj in (
        node("gpu-1", {}, "32", "128Gi", gpu="1"),
        node("edge-big", {"stratus.dev/edge": "true"}, "4", "4Gi"),
        node("edge-full", {"stratus.dev/edge": "true"}, "4", "1Gi"),
        node("edge-tainted", {"stratus.dev/edge": "true"}, "8", "16Gi",
             taints=[{"key": "dedicated", "value": "camera", "effect": "NoSchedule"}]),
    ):
        await emu.create_obj(NODES, None, obj)
        # Node status (allocatable, Ready) is the kubelet's to write, through /status.
        await emu.patch_status(NODES, None, obj["metadata"]["name"], obj["status"])
    # Someone else's pod already holds most of edge-full.
    await emu.create_obj(PODS, "other", {"metadata": {"name": "busy", "namespace": "other"},
                                         "spec": {"nodeName": "edge-full", "containers": [
                                             {"name": "c", "image": "registry.k8s.io/pause:3.10",
                                              "resources": {"requests": {"memory": "900Mi"}}}]}})
    await emu.patch_status(PODS, "other", "busy", {"phase": "Running"})


def owned(emu: Emulator, key: tuple[str, str, str], name: str = "smollm2") -> list[dict[str, Any]]:
    return [o for o in emu.read_all(key, NS) if o["metadata"].get("labels", {}).get(INSTANCE) == name]


def names(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objs)


async def finish_job(emu: Emulator, job: dict[str, Any], message: str, *, failed: bool = False,
                     reason: str = "") -> None:
    """Act as the Job controller: a pod that terminated with `message`, then the Job's final condition."""
    name = job["metadata"]["name"]
    template = job["spec"]["template"]
    labels = {**template["metadata"]["labels"], "job-name": name, "batch.kubernetes.io/job-name": name}
    exit_code = 1 if failed else 0
    pod = f"{name}-x1"
    await emu.create_obj(PODS, NS, {"metadata": {"name": pod, "namespace": NS, "labels": labels},
                                    "spec": {**template["spec"], "nodeName": "gpu-1"}})
    # Status goes through /status, as the kubelet writes it.
    await emu.patch_status(PODS, NS, pod, {"phase": "Failed" if failed else "Succeeded", "containerStatuses": [{
            "name": "compress", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": "Error" if failed else "Completed",
                                     "message": message}}}]})
    condition = {"type": "Failed", "status": "True", "reason": reason or "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"} if failed else \
        {"type": "Complete", "status": "True"}
    await emu.patch_status(JOBS, NS, name, {"conditions": [condition], "failed" if failed else "succeeded": 1})


async def roll_out(emu: Emulator, instance: str = "smollm2") -> None:
    """Act as the Deployment controller: every owned Deployment has all its pods ready."""
    for dep in owned(emu, DEPLOYMENTS, instance):
        replicas = dep["spec"].get("replicas", 1)
        await emu.patch_status(DEPLOYMENTS, NS, dep["metadata"]["name"], {
            "observedGeneration": dep["metadata"]["generation"], "replicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas, "updatedReplicas": replicas})


async def roll_out_until(emu: Emulator, phase: str, instance: str = "smollm2", *, what: str,
                         logs: Any = None) -> None:
    """Act as the Deployment controller until the deployment reaches `phase`. A controller keeps up with every
    generation the operator writes (the router's Deployment is patched after the edge one is created), so
    the roll-out is repeated at each poll."""

    async def check() -> bool:
        await roll_out(emu, instance)
        return status(emu, instance).get("phase") == phase

    await eventually(check, what=what, logs=logs)


def status(emu: Emulator, name: str = "smollm2") -> dict[str, Any]:
    obj = emu.read(LLMD, NS, name)
    return (obj or {}).get("status") or {}


def conditions(emu: Emulator, name: str = "smollm2") -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status(emu, name).get("conditions", [])}


def event_reasons(emu: Emulator, name: str = "smollm2") -> set[str]:
    return {e["reason"] for e in emu.read_all(EVENTS, NS) if e["involvedObject"].get("name") == name}


def container(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


async def test_lifecycle_apply_compress_place_ready_replan_restart_delete(
        emulator: Emulator, operator: OperatorProcess) -> None:
    emu = emulator
    await add_nodes(emu)
    created = await emu.create_obj(LLMD, NS, sample())
    uid = created["metadata"]["uid"]

    # --- compression Job, with the cloud tier and router starting meanwhile (cloud-only until the gate) ---
    jobs = await eventually(lambda: owned(emu, JOBS), what="the compression Job", logs=operator.logs)
    assert len(jobs) == 1
    job = jobs[0]
    assert job["metadata"]["name"].startswith("smollm2-compress-int8-")
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "stratus.dev/v1alpha1", "kind": "LLMDeployment", "name": "smollm2", "uid": uid,
        "controller": True, "blockOwnerDeletion": True}
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "stratus-operator"
    assert job["metadata"]["annotations"]["stratus.dev/spec-hash"]
    compress = job["spec"]["template"]["spec"]["containers"][0]
    assert compress["command"][:3] == ["python", "-m", "stratus_workers.compress"]
    assert compress["command"][3:] == ["--spec", "/etc/stratus/spec.json", "--out", "/artifacts/int8",
                                       "--termination-log", "/dev/termination-log"]
    spec_cm = emu.read(CONFIGMAPS, NS, job["metadata"]["name"])
    assert spec_cm is not None
    job_spec = CompressionJobSpec.model_validate_json(spec_cm["data"]["spec.json"])
    assert job_spec.name == "int8" and job_spec.compression.quantization is not None
    assert job_spec.gate.max_perplexity_increase == 0.05

    await eventually(lambda: len(owned(emu, DEPLOYMENTS)) == 2, what="cloud and router Deployments",
                     logs=operator.logs)
    assert names(owned(emu, DEPLOYMENTS)) == ["smollm2-cloud", "smollm2-router"]
    cloud = emu.read(DEPLOYMENTS, NS, "smollm2-cloud")
    assert cloud is not None
    assert container(cloud)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--dtype" in container(cloud)["command"] and "bfloat16" in container(cloud)["command"]
    router_cm = emu.read(CONFIGMAPS, NS, "smollm2-router")
    assert router_cm is not None
    router = RouterConfig.model_validate_json(router_cm["data"]["router.json"])
    assert router.routing.policy == "cloud-only"
    assert [b.name for b in router.backends] == ["smollm2-cloud"]
    await eventually(lambda: status(emu).get("phase") == "Compressing", what="phase Compressing",
                     logs=operator.logs)
    # Events are posted asynchronously (and lost with a SIGKILLed process): wait for this one first.
    await eventually(lambda: "Compressing" in event_reasons(emu), what="the Compressing event")

    # --- mTLS: a CA Secret no pod mounts, and one Secret per server and router, issued once, owned ---
    secret = await eventually(lambda: emu.read(SECRETS, NS, "smollm2-ca"), what="the CA Secret")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == uid
    assert set(secret["data"]) == {"ca.crt", "ca.key"}
    for dep in owned(emu, DEPLOYMENTS):
        assert "--tls-ca" in container(dep)["command"], dep["metadata"]["name"]
        assert dep["spec"]["template"]["metadata"]["annotations"]["stratus.dev/tls-hash"]
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        mounted = {v["secret"]["secretName"] for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v}
        assert mounted == {f"{dep['metadata']['name']}-tls"}, mounted
        own = emu.read(SECRETS, NS, f"{dep['metadata']['name']}-tls")
        assert own is not None and set(own["data"]) == {"tls.crt", "tls.key", "ca.crt"}

    # --- kill the operator mid-compression; the new one adopts everything and creates nothing twice ---
    before = {key: names(owned(emu, key)) for key in (JOBS, DEPLOYMENTS, SERVICES, CONFIGMAPS)}
    creates_before = len(emu.log[JOBS])
    await operator.kill()
    await operator.start()
    await eventually(lambda: "Resuming is processed" in operator.logs().split("===== start 2 =====")[-1],
                     what="the restarted operator to resume", timeout=30, logs=operator.logs)
    await eventually(lambda: status(emu).get("phase") == "Compressing", what="still Compressing")
    after = {key: names(owned(emu, key)) for key in (JOBS, DEPLOYMENTS, SERVICES, CONFIGMAPS)}
    assert after == before
    assert not any(e["type"] == "ADDED" for _, e in emu.log[JOBS][creates_before:])
    # The CA survives the restart: reused, not issued again.
    assert emu.read(SECRETS, NS, "smollm2-ca")["metadata"]["resourceVersion"] == \
        secret["metadata"]["resourceVersion"]  # type: ignore[index]

    # --- act as the Job controller: the summary arrives through the pod's termination message ---
    await finish_job(emu, job, SUMMARY.to_json())
    edge = await eventually(lambda: emu.read(DEPLOYMENTS, NS, "smollm2-edge-int8"), what="the edge Deployment",
                            logs=operator.logs)
    pod = edge["spec"]["template"]["spec"]
    # Placement: the only edge node with room that tolerates nothing special.
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchFields"][0] == {"key": "metadata.name", "operator": "In", "values": ["edge-big"]}
    assert pod["nodeSelector"] == {"stratus.dev/edge": "true"}
    # Memory follows the measured size: 180 MB * 1.25 + 512 MiB runtime, rounded up to MiB.
    assert container(edge)["resources"]["requests"] == {"cpu": "500m", "memory": "727Mi"}
    assert "--tier" in container(edge)["command"] and "edge" in container(edge)["command"]
    # The artifact is read in place from the claim, read-only; no fetch.
    assert "initContainers" not in pod
    assert {"name": "artifacts", "mountPath": "/artifacts", "subPath": "smollm2", "readOnly": True} in \
        container(edge)["volumeMounts"]
    assert edge["metadata"]["ownerReferences"][0]["uid"] == uid
    # Applied in the same pass as the Deployment, right after it: the test may look in between.
    await eventually(lambda: emu.read(SERVICES, NS, "smollm2-edge-int8"), what="the edge Service")
    router_cm = await eventually(
        lambda: (cm := emu.read(CONFIGMAPS, NS, "smollm2-router")) and "smollm2-edge-int8" in cm["data"]["router.json"]
        and cm, what="the router config to gain the edge backend")
    router = RouterConfig.model_validate_json(router_cm["data"]["router.json"])
    assert router.routing.policy == "cascade"
    assert sorted(b.address for b in router.backends) == ["smollm2-cloud.default.svc:50051",
                                                          "smollm2-edge-int8.default.svc:50051"]

    # --- act as the Deployment controller: everything ready -> Ready, every condition True ---
    await eventually(lambda: len(owned(emu, DEPLOYMENTS)) == 3, what="three Deployments")
    await roll_out_until(emu, "Ready", what="phase Ready", logs=operator.logs)
    conds = conditions(emu)
    assert sorted(conds) == ["CloudReady", "Compressed", "EdgeReady", "Ready", "RouterReady"]
    assert all(c["status"] == "True" for c in conds.values()), conds
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] for c in conds.values())
    st = status(emu)
    assert st["observedGeneration"] == 1
    assert st["edge"]["summary"] == "1/1" and st["cloud"]["summary"] == "1/1"
    assert st["router"]["endpoint"] == "smollm2-router.default.svc:50051"
    variant = st["variants"][0]
    assert variant["state"] == "Accepted" and variant["sizeBytes"] == 180_000_000
    assert variant["perplexityIncrease"] == pytest.approx(0.0233) and variant["tokensPerSecond"] == 41.5
    assert variant["nodes"] == ["edge-big"] and "edge-big" in variant["placement"]
    await eventually(lambda: {"Compressing", "Accepted", "Ready"} <= event_reasons(emu), what="transition Events")

    # --- a spec change: new generation, replanned children, observedGeneration follows ---
    spec = copy.deepcopy(emu.read(LLMD, NS, "smollm2"))["spec"]  # type: ignore[index]
    spec["cloud"]["serving"]["maxBatchSize"] = 32
    await emu.patch_obj(LLMD, NS, "smollm2", {"spec": spec})

    def cloud_batch() -> str | None:
        dep = emu.read(DEPLOYMENTS, NS, "smollm2-cloud")
        command = container(dep)["command"] if dep else []
        return command[command.index("--max-batch-size") + 1] if "--max-batch-size" in command else None

    await eventually(lambda: cloud_batch() == "32", what="the cloud Deployment to roll", logs=operator.logs)
    await eventually(lambda: status(emu).get("observedGeneration") == 2, what="observedGeneration 2")
    await roll_out_until(emu, "Ready", what="Ready again", logs=operator.logs)

    # A new recipe means a new Job (the old one goes) and compression again.
    spec["edge"]["variants"][0]["compression"]["quantization"]["method"] = "int4-weight"
    await emu.patch_obj(LLMD, NS, "smollm2", {"spec": spec})
    await eventually(lambda: len(owned(emu, JOBS)) == 1 and owned(emu, JOBS)[0]["metadata"]["name"]
                     != job["metadata"]["name"], what="the replacement Job", logs=operator.logs)
    await eventually(lambda: status(emu).get("phase") == "Compressing", what="Compressing the new recipe")

    # --- delete: the finalizer runs, then the children go by owner reference ---
    await emu.delete_obj(LLMD, NS, "smollm2")
    await eventually(lambda: emu.read(LLMD, NS, "smollm2") is None, what="the finalizer to be removed",
                     logs=operator.logs)
    await eventually(lambda: "Finalizing" in event_reasons(emu), what="the Finalizing event")
    assert owned(emu, DEPLOYMENTS) == [] and owned(emu, JOBS) == [] and owned(emu, SERVICES) == []


async def test_failed_job_gives_failed_condition_with_the_jobs_reason(
        emulator: Emulator, operator: OperatorProcess) -> None:
    emu = emulator
    await add_nodes(emu)
    manifest = sample()
    manifest["metadata"]["name"] = "broken"
    await emu.create_obj(LLMD, NS, manifest)
    job = (await eventually(lambda: owned(emu, JOBS, "broken"), what="the Job", logs=operator.logs))[0]
    # Back-off is the Job controller's: crashes retry (exponential delay) up to the limit; verdicts do not.
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2, 3]
    # One crashed pod is not a failed Job: the operator waits for the controller's retries.
    await emu.patch_status(JOBS, NS, job["metadata"]["name"], {"failed": 1, "active": 1})
    await eventually(lambda: status(emu, "broken").get("phase") == "Compressing", what="Compressing")
    await emu.create_obj(PODS, NS, {"metadata": {"name": job["metadata"]["name"] + "-crash", "namespace": NS,
                                                 "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                                            "job-name": job["metadata"]["name"]}},
                                    "spec": {**job["spec"]["template"]["spec"], "nodeName": "gpu-1"}})
    await emu.patch_status(PODS, NS, job["metadata"]["name"] + "-crash", {"phase": "Failed", "containerStatuses": [{
        "name": "compress", "ready": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "RuntimeError: flake"}}}]})
    await asyncio.sleep(1.0)
    assert status(emu, "broken").get("phase") == "Compressing"
    await finish_job(emu, job, "Traceback (most recent call last):\nMemoryError: out of memory", failed=True,
                     reason="DeadlineExceeded")
    await eventually(lambda: status(emu, "broken").get("phase") == "Failed", what="phase Failed",
                     logs=operator.logs)
    compressed = conditions(emu, "broken")["Compressed"]
    assert compressed["status"] == "False"
    assert compressed["reason"] == "DeadlineExceeded"
    assert "MemoryError" in compressed["message"]
    assert conditions(emu, "broken")["Ready"]["status"] == "False"
    assert status(emu, "broken")["variants"][0]["state"] == "Failed"
    await eventually(lambda: any(e["reason"] == "Failed" and e["type"] == "Warning"
                                 for e in emu.read_all(EVENTS, NS)), what="a Warning event")
    # It stays failed (no retry loop) until the spec changes...
    await asyncio.sleep(1.0)
    assert [j["metadata"]["uid"] for j in owned(emu, JOBS, "broken")] == [job["metadata"]["uid"]]
    # ...and any spec change runs it again, even one that leaves the recipe (and the Job's name) alone.
    spec = copy.deepcopy(emu.read(LLMD, NS, "broken"))["spec"]  # type: ignore[index]
    spec["cloud"]["serving"]["maxBatchSize"] = 24
    await emu.patch_obj(LLMD, NS, "broken", {"spec": spec})
    retried = await eventually(
        lambda: [j for j in owned(emu, JOBS, "broken") if j["metadata"]["uid"] != job["metadata"]["uid"]],
        what="the retried Job", logs=operator.logs)
    assert retried[0]["metadata"]["name"] == job["metadata"]["name"]
    assert retried[0]["metadata"]["annotations"]["stratus.dev/generation"] == "2"
    assert len(owned(emu, JOBS, "broken")) == 1
    await eventually(lambda: status(emu, "broken").get("phase") == "Compressing", what="Compressing again",
                     logs=operator.logs)
    # A new recipe is a new Job (the old one goes), whatever became of the old one.
    spec["edge"]["variants"][0]["compression"]["quantization"]["method"] = "int4-weight"
    await emu.patch_obj(LLMD, NS, "broken", {"spec": spec})
    # The new Job is created and the old one deleted in one pass: the test may look in between.
    await eventually(lambda: len(jobs := owned(emu, JOBS, "broken")) == 1
                     and jobs[0]["metadata"]["name"] != job["metadata"]["name"],
                     what="the new recipe's Job alone", logs=operator.logs)


async def test_gate_rejection_degrades_to_the_cloud(emulator: Emulator, operator: OperatorProcess) -> None:
    emu = emulator
    await add_nodes(emu)
    manifest = sample()
    manifest["metadata"]["name"] = "strict"
    await emu.create_obj(LLMD, NS, manifest)
    job = (await eventually(lambda: owned(emu, JOBS, "strict"), what="the Job", logs=operator.logs))[0]
    verdict = ["perplexity +9.0% exceeds the gate's +5.0%"]
    rejected = SUMMARY.model_copy(update={"status": "rejected", "reasons": verdict})
    await finish_job(emu, job, rejected.to_json(), failed=True)
    await eventually(lambda: len(owned(emu, DEPLOYMENTS, "strict")) == 2, what="cloud and router")
    await roll_out_until(emu, "Degraded", "strict", what="phase Degraded", logs=operator.logs)
    conds = conditions(emu, "strict")
    assert conds["EdgeReady"]["status"] == "False" and conds["EdgeReady"]["reason"] == "GateRejected"
    assert conds["Compressed"]["reason"] == "GateRejected" and "+9.0%" in conds["Compressed"]["message"]
    assert conds["Ready"]["status"] == "True"  # still serving, from the cloud
    assert status(emu, "strict")["effectivePolicy"] == "cloud-only"
    assert emu.read(DEPLOYMENTS, NS, "strict-edge-int8") is None
