"""Which cluster the scenarios get: the emulator by default, a real one only when given and guarded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from scenario import installed_operator_env, kind_nodes, real_cluster_config

pytestmark = pytest.mark.unit


def _kubeconfig(tmp_path: Path, context: str, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        "clusters": [{"name": context, "cluster": {"server": server}}],
        "users": [{"name": context, "user": {"token": "t"}}]}))
    return path


def test_no_kubeconfig_means_skip_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATUS_SCENARIO_KUBECONFIG", raising=False)
    reason = real_cluster_config()
    assert isinstance(reason, str) and "STRATUS_SCENARIO_KUBECONFIG" in reason


def test_kind_context_on_loopback_is_taken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path, "kind-stratus", "https://127.0.0.1:40000")
    monkeypatch.setenv("STRATUS_SCENARIO_KUBECONFIG", str(path))
    monkeypatch.delenv("STRATUS_SCENARIO_CONTEXT", raising=False)
    assert real_cluster_config() == (path, None)


def test_other_context_is_refused_unless_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path, "prod-eu-1", "https://10.0.0.1:6443")
    monkeypatch.setenv("STRATUS_SCENARIO_KUBECONFIG", str(path))
    monkeypatch.delenv("STRATUS_SCENARIO_CONTEXT", raising=False)
    reason = real_cluster_config()
    assert isinstance(reason, str) and "refusing" in reason and "STRATUS_SCENARIO_CONTEXT" in reason
    monkeypatch.setenv("STRATUS_SCENARIO_CONTEXT", "prod-eu-1")
    assert real_cluster_config() == (path, "prod-eu-1")


def test_emulated_nodes_are_the_kind_clusters() -> None:
    nodes = {n["name"]: n for n in kind_nodes()}
    assert sorted(nodes) == ["stratus-control-plane", "stratus-worker", "stratus-worker2", "stratus-worker3"]
    assert nodes["stratus-control-plane"]["taints"] == []
    assert nodes["stratus-worker"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert nodes["stratus-worker2"]["labels"] == {"stratus.dev/edge": "true"}


def test_operator_runs_with_the_installed_environment() -> None:
    env = installed_operator_env()
    assert env["STRATUS_CACHE_HOST_PATH"] == ""  # no hostPath unless asked (issue 13.2.1)
    assert env["STRATUS_EDGE_NODE_SELECTOR"] == '{"stratus.dev/edge":"true"}'
