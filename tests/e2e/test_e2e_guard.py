"""The e2e suite's safety nets, checked without a cluster: the skip line and the test-cluster guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_preflight import MISSING_EXIT_CODE, main, missing_tools, skip_reason
from kind_cluster import CONTEXT, NotATestClusterError, check_test_cluster

pytestmark = pytest.mark.unit


def _kubeconfig(context: str, server: str) -> dict[str, Any]:
    return {
        "current-context": context,
        "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        "clusters": [{"name": context, "cluster": {"server": server}}],
    }


def test_kind_test_cluster_is_accepted() -> None:
    check_test_cluster(_kubeconfig(CONTEXT, "https://127.0.0.1:41234"))


@pytest.mark.parametrize(
    ("context", "server", "says"),
    [
        ("prod-eu-1", "https://10.0.0.1:6443", "only 'kind-stratus'"),
        ("kind-other", "https://127.0.0.1:41234", "only 'kind-stratus'"),
        (CONTEXT, "https://k8s.example.com:6443", "not a kind API server on loopback"),
        (CONTEXT, "", "not a kind API server on loopback"),
    ],
)
def test_other_clusters_are_refused(context: str, server: str, says: str) -> None:
    with pytest.raises(NotATestClusterError, match=says):
        check_test_cluster(_kubeconfig(context, server))


def test_context_pointing_at_another_cluster_entry_is_refused() -> None:
    config = _kubeconfig(CONTEXT, "https://127.0.0.1:41234")
    config["contexts"][0]["context"]["cluster"] = "prod"
    config["clusters"].append({"name": "prod", "cluster": {"server": "https://prod.example.com"}})
    with pytest.raises(NotATestClusterError):
        check_test_cluster(config)


def test_missing_tools_are_named_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert missing_tools() == ["docker (not on PATH)", "kind (not on PATH)", "kubectl (not on PATH)"]
    assert main() == MISSING_EXIT_CODE
    out = capsys.readouterr().out
    assert out == skip_reason(missing_tools()) + "\n"
    assert out.count("\n") == 1 and out.startswith("kind e2e skipped: needs docker")


def test_dead_docker_daemon_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert missing_tools()[0] == "a running Docker daemon (docker info failed)"
