"""On kind: install the chart, apply the SmolLM2 sample, chat through the router, delete and see it cleaned up."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kind_cluster import CONTEXT, Installed, sample_path

from stratus_workers.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("diagnostics_on_failure")]

SAMPLE = "smollm2"
ARTIFACTS_CLAIM = "stratus-artifacts"
# Compression runs on CPU inside kind; pulling nothing (images are preloaded) but converting and
# evaluating the model takes minutes on a laptop.
READY_TIMEOUT_S = 1500
OWNED_KINDS = "deployments,jobs,services,configmaps,horizontalpodautoscalers,networkpolicies"


@contextlib.contextmanager
def port_forward(stratus: Installed, service: str, port: int) -> Iterator[int]:
    """kubectl port-forward to the Service; yields the local port once it forwards."""
    local = free_port()
    proc = subprocess.Popen(
        ["kubectl", "--context", CONTEXT, "-n", stratus.namespace, "port-forward", f"svc/{service}",
         f"{local}:{port}"],
        env=stratus.cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "Forwarding from" in line, f"port-forward did not start: {line}"
        yield local
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _owned_by(stratus: Installed, uid: str) -> list[str]:
    items: list[dict[str, Any]] = stratus.cluster.get_json(OWNED_KINDS, "-n", stratus.namespace)["items"]
    return [f"{item['kind']}/{item['metadata']['name']}" for item in items
            if any(ref.get("uid") == uid for ref in item["metadata"].get("ownerReferences", []))]


def test_operator_runs_restricted(stratus: Installed) -> None:
    """The operator pod is up, never restarted, and runs as non-root on a read-only root filesystem."""
    pods = stratus.cluster.get_json("pods", "-n", stratus.system_namespace,
                                    "-l", "app.kubernetes.io/component=operator")["items"]
    assert len(pods) == 1
    pod = pods[0]
    assert pod["status"]["phase"] == "Running"
    assert all(c["restartCount"] == 0 for c in pod["status"]["containerStatuses"])
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_sample_serves_through_router_then_cleans_up(stratus: Installed) -> None:
    kube = stratus.cluster
    # The sample as it is, but with its artifacts on the shared ReadWriteMany claim: kind's own
    # storage is node-local, and the edge pods run on other nodes than the compression Job.
    kube.shared_artifacts_claim(stratus.namespace, ARTIFACTS_CLAIM, [SAMPLE])
    manifest = yaml.safe_load(sample_path(SAMPLE).read_text())
    manifest["spec"]["storage"] = {"pvc": {"claimName": ARTIFACTS_CLAIM}}
    kube.kubectl("apply", "-n", stratus.namespace, "-f", "-", input_text=json.dumps(manifest))

    kube.kubectl("wait", "-n", stratus.namespace, f"llmd/{SAMPLE}", "--for=jsonpath={.status.phase}=Ready",
                 f"--timeout={READY_TIMEOUT_S}s", timeout=READY_TIMEOUT_S + 60)
    kube.kubectl("wait", "-n", stratus.namespace, f"llmd/{SAMPLE}", "--for=condition=Ready", "--timeout=60s")
    obj = kube.get_json("llmd", SAMPLE, "-n", stratus.namespace)
    conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conditions == {t: "True" for t in ("Compressed", "CloudReady", "EdgeReady", "RouterReady", "Ready")}, (
        json.dumps(obj["status"], indent=2))
    uid = obj["metadata"]["uid"]
    assert _owned_by(stratus, uid), "the operator created no children owned by the LLMDeployment"

    # status.router.endpoint is the router Service's gRPC host:port, e.g. smollm2-router.stratus-e2e.svc:50051.
    host, _, port = obj["status"]["router"]["endpoint"].rpartition(":")
    service = host.split(".")[0]
    stratus_cli = str(Path(sys.executable).with_name("stratus"))
    with port_forward(stratus, service, int(port)) as local:
        answer = subprocess.run(
            [stratus_cli, "chat", "--target", f"127.0.0.1:{local}", "--max-new-tokens", "16",
             "What is the capital of France? One word."],
            capture_output=True, text=True, timeout=180, check=False,
        )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip(), "the router answered with no text"

    kube.kubectl("delete", "-n", stratus.namespace, f"llmd/{SAMPLE}", "--wait=true", "--timeout=300s", timeout=360)
    deadline = time.monotonic() + 300
    left = _owned_by(stratus, uid)
    while left and time.monotonic() < deadline:
        time.sleep(3)
        left = _owned_by(stratus, uid)
    assert not left, f"children left after delete: {left}"
    pods = kube.wait_until_gone("pods", "app.kubernetes.io/managed-by=stratus-operator", stratus.namespace)
    assert not pods, f"pods left after delete: {pods}"
