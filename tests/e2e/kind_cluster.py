"""The kind cluster the e2e suite drives: create or reuse it, guard its identity, run kubectl on it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

REPO = Path(__file__).resolve().parents[2]
KIND_CONFIG = REPO / "deploy" / "kind" / "cluster.yaml"
_KIND = yaml.safe_load(KIND_CONFIG.read_text())
CLUSTER_NAME = str(_KIND["name"])
CONTEXT = f"kind-{CLUSTER_NAME}"
# Host folders every kind node bind-mounts (deploy/kind/cluster.yaml extraMounts): host path -> node path.
SHARED_MOUNTS = {m["hostPath"]: m["containerPath"] for m in _KIND["nodes"][0]["extraMounts"]}
ARTIFACTS_STORAGE_CLASS = "stratus-e2e-shared"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class NotATestClusterError(RuntimeError):
    """The kubeconfig points somewhere other than the kind test cluster; the suite refuses to touch it."""


def check_test_cluster(kubeconfig: dict[str, Any]) -> None:
    """Refuse any kubeconfig whose current context is not kind's test cluster on this machine.

    The suite creates, deletes and labels things cluster-wide; run against a real cluster it would
    do damage, so both the context name and a loopback API server are required.
    """
    current = kubeconfig.get("current-context")
    if current != CONTEXT:
        raise NotATestClusterError(
            f"refusing to run the e2e suite against context {current!r}: only {CONTEXT!r} (kind) is a test cluster"
        )
    contexts = {c["name"]: c.get("context", {}) for c in kubeconfig.get("contexts", [])}
    clusters = {c["name"]: c.get("cluster", {}) for c in kubeconfig.get("clusters", [])}
    cluster = clusters.get(contexts.get(current, {}).get("cluster", ""), {})
    server = str(cluster.get("server", ""))
    host = urlparse(server).hostname or ""
    if host not in LOOPBACK_HOSTS and f"[{host}]" not in LOOPBACK_HOSTS:
        raise NotATestClusterError(
            f"refusing to run the e2e suite: context {current!r} points at {server!r}, "
            "not a kind API server on loopback"
        )


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600,
        check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its output when it fails (pytest shows the message)."""
    result = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout,
                            input=input_text, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class KindCluster:
    """A kind cluster reached only through its own kubeconfig file, never the user's."""

    kubeconfig: Path
    created: bool

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    @classmethod
    def up(cls, workdir: Path) -> KindCluster:
        """Reuse the cluster named in deploy/kind/cluster.yaml, or create it; then check what we got."""
        kubeconfig = workdir / "kubeconfig"
        existing = run(["kind", "get", "clusters"]).stdout.split()
        created = CLUSTER_NAME not in existing
        for host_path in SHARED_MOUNTS:
            # World-writable: the workers run as uid 65532 and the kubelet creates nothing for them here.
            Path(host_path).mkdir(parents=True, exist_ok=True)
            Path(host_path).chmod(0o777)
        if created:
            run(["kind", "create", "cluster", "--config", str(KIND_CONFIG), "--kubeconfig", str(kubeconfig),
                 "--wait", "180s"], timeout=900)
        else:
            kubeconfig.write_text(run(["kind", "get", "kubeconfig", "--name", CLUSTER_NAME]).stdout)
        check_test_cluster(yaml.safe_load(kubeconfig.read_text()))
        return cls(kubeconfig=kubeconfig, created=created)

    def down(self) -> None:
        if self.created:
            run(["kind", "delete", "cluster", "--name", CLUSTER_NAME], timeout=300)

    def kubectl(self, *args: str, timeout: float = 300, check: bool = True,
                input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(["kubectl", "--context", CONTEXT, *args], env=self.env, timeout=timeout, check=check,
                   input_text=input_text)

    def get_json(self, *args: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return loaded

    def load_image(self, image: str) -> None:
        run(["kind", "load", "docker-image", image, "--name", CLUSTER_NAME], timeout=900)

    def fake_gpu(self, resource: str = "nvidia.com/gpu", count: int = 1) -> list[str]:
        """Advertise `count` of `resource` on the GPU-labelled nodes (kind has no GPUs; the pods run on CPU)."""
        nodes = self.get_json("nodes", "-l", "nvidia.com/gpu.present=true")["items"]
        escaped = resource.replace("~", "~0").replace("/", "~1")
        names = []
        for node in nodes:
            name = node["metadata"]["name"]
            patch = [{"op": "add", "path": f"/status/{field}/{escaped}", "value": str(count)}
                     for field in ("capacity", "allocatable")]
            self.kubectl("patch", "node", name, "--subresource=status", "--type=json", "-p", json.dumps(patch))
            names.append(name)
        return names

    def shared_artifacts_claim(self, namespace: str, claim: str, subdirs: Sequence[str]) -> None:
        """A ReadWriteMany claim on the host folder all nodes share; `subdirs` are pre-created writable
        (the operator mounts <claim>/<LLMDeployment name> with subPath, which the kubelet would create as root)."""
        host_path, node_path = next((h, c) for h, c in SHARED_MOUNTS.items() if c.endswith("artifacts"))
        for sub in subdirs:
            Path(host_path, sub).mkdir(exist_ok=True)
            Path(host_path, sub).chmod(0o777)
        volume = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{claim}"},
            "spec": {"capacity": {"storage": "20Gi"}, "accessModes": ["ReadWriteMany"],
                     "storageClassName": ARTIFACTS_STORAGE_CLASS, "hostPath": {"path": node_path},
                     "claimRef": {"namespace": namespace, "name": claim}},
        }
        pvc = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": ARTIFACTS_STORAGE_CLASS,
                     "resources": {"requests": {"storage": "20Gi"}}},
        }
        self.kubectl("apply", "-f", "-", input_text=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                "items": [volume, pvc]}))

    def wait_until_gone(self, kinds: str, selector: str, namespace: str, timeout: float = 300) -> list[str]:
        """Poll until nothing of `kinds` matches `selector`; returns what is left at the deadline."""
        deadline = time.monotonic() + timeout
        left: list[str] = []
        while time.monotonic() < deadline:
            out = self.kubectl("get", kinds, "-n", namespace, "-l", selector, "-o", "name").stdout
            left = out.split()
            if not left:
                return []
            time.sleep(3)
        return left

    def diagnostics(self, namespaces: Sequence[str]) -> str:
        """Everything worth reading when a step fails: objects, events, operator logs."""
        parts = []
        for ns in namespaces:
            for args in (("get", "all,llmd,jobs,configmaps,networkpolicies", "-n", ns, "-o", "wide"),
                         ("get", "events", "-n", ns, "--sort-by=.lastTimestamp"),
                         ("logs", "-n", ns, "-l", "app.kubernetes.io/component=operator", "--tail=200")):
                result = self.kubectl(*args, check=False)
                parts.append(f"$ kubectl {' '.join(args)}\n{result.stdout}{result.stderr}")
        return "\n".join(parts)


@dataclass
class Installed:
    """Stratus installed on the cluster, and the namespace the samples go to."""

    cluster: KindCluster
    namespace: str
    system_namespace: str


def sample_path(name: str) -> Path:
    return REPO / "deploy" / "samples" / f"{name}.yaml"
