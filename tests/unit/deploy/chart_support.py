"""Paths and small helpers shared by the chart and manifest tests (imported by conftest and the tests)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
CHART_DIR = REPO / "charts" / "stratus"
DEPLOY_DIR = REPO / "deploy"
CRD_SOURCE = DEPLOY_DIR / "crds" / "stratus.dev_llmdeployments.yaml"
CRD_COPY = CHART_DIR / "crds" / CRD_SOURCE.name
RELEASE = "stratus"
NAMESPACE = "stratus-system"

Manifest = dict[str, Any]
# render(values=None, namespace=NAMESPACE) -> the chart's objects (the `render` fixture).
Render = Callable[..., list[Manifest]]


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML with YAML 1.2 floats: kustomize (Go) writes 5e-05, which YAML 1.1 would read as a string."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_all(text: str) -> list[Manifest]:
    return [doc for doc in yaml.load_all(text, Loader=Yaml12Loader) if doc]


def key(obj: Manifest) -> tuple[str, str, str]:
    """(kind, namespace, name): what identifies an object in a cluster."""
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def pod_templates(objects: list[Manifest]) -> list[tuple[str, Manifest]]:
    """(object name, pod spec) for every workload that runs pods."""
    found = []
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            found.append((f"{obj['kind']}/{obj['metadata']['name']}", spec["template"]["spec"]))
        elif obj["kind"] == "CronJob":
            found.append((obj["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            found.append((obj["metadata"]["name"], spec))
    return found


def containers(pod: Manifest) -> Iterator[Manifest]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def assert_locked_down(name: str, pod: Manifest) -> None:
    """Non-root, read-only root filesystem with /tmp writable, no privilege escalation, no capabilities."""
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    assert pod["securityContext"]["runAsUser"] != 0, name
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
    writable = {m["mountPath"] for c in containers(pod) for m in c.get("volumeMounts", [])}
    assert "/tmp" in writable, f"{name}: a read-only root filesystem needs /tmp mounted"
    for container in containers(pod):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert not sc.get("privileged", False), name

