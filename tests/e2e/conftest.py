"""kind e2e fixtures: one skip line when docker/kind are missing, else a kind cluster with Stratus installed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib, which adds no folder to sys.path; the suite's helper
# modules (e2e_preflight, kind_cluster) are imported by name from here and from the tests.
sys.path.insert(0, str(Path(__file__).parent))

from e2e_preflight import missing_tools, skip_reason
from kind_cluster import CONTEXT, REPO, Installed, KindCluster

# The images `make images` builds (the Makefile passes its OPERATOR_IMAGE / WORKERS_IMAGE through).
OPERATOR_IMAGE = os.environ.get("OPERATOR_IMAGE", "ghcr.io/stratus-llm/stratus-operator:0.1.0")
WORKERS_IMAGE = os.environ.get("WORKERS_IMAGE", "ghcr.io/stratus-llm/stratus-workers:0.1.0")
RELEASE = "stratus"
SYSTEM_NAMESPACE = "stratus-system"
# LLMDeployments go here; the chart's model-server NetworkPolicy is installed here too.
SAMPLE_NAMESPACE = "stratus-e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e_items = [item for item in items if item.get_closest_marker("e2e")]
    if not e2e_items:
        return
    missing = missing_tools()
    if missing:
        skip = pytest.mark.skip(reason=skip_reason(missing))
        for item in e2e_items:
            item.add_marker(skip)


def split_image(image: str) -> tuple[str, str]:
    """'registry:5000/org/name:tag' -> ('registry:5000/org/name', 'tag')."""
    repository, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return repository, tag


@pytest.fixture(scope="session")
def kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KindCluster]:
    cluster = KindCluster.up(tmp_path_factory.mktemp("kind"))
    try:
        yield cluster
    finally:
        if not os.environ.get("STRATUS_E2E_KEEP_CLUSTER"):
            cluster.down()


@pytest.fixture(scope="session")
def stratus(kind: KindCluster) -> Iterator[Installed]:
    """The chart installed with the freshly built images, and a namespace for the samples."""
    import helm_python as helm

    for image in (OPERATOR_IMAGE, WORKERS_IMAGE):
        inspected = subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False)
        if inspected.returncode != 0:
            pytest.fail(f"image {image} is not built; run `make images` (make e2e does)")
        kind.load_image(image)
    assert kind.fake_gpu(), "deploy/kind/cluster.yaml should have a node labelled nvidia.com/gpu.present=true"
    # The operator's namespace enforces "restricted", as deploy/namespace.yaml does: a pod of the
    # chart that breaks the posture is refused by the API server and the install fails.
    kind.kubectl("create", "namespace", SYSTEM_NAMESPACE, check=False)
    kind.kubectl("label", "--overwrite", "namespace", SYSTEM_NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    kind.kubectl("create", "namespace", SAMPLE_NAMESPACE, check=False)
    # Warn (not enforce): the pods the operator creates are checked against "restricted" and the
    # warnings show in the diagnostics, without blocking the run.
    kind.kubectl("label", "--overwrite", "namespace", SAMPLE_NAMESPACE, "pod-security.kubernetes.io/warn=restricted")

    operator_repo, operator_tag = split_image(OPERATOR_IMAGE)
    workers_repo, workers_tag = split_image(WORKERS_IMAGE)
    values = {
        "images": {
            "operator": {"repository": operator_repo, "tag": operator_tag, "pullPolicy": "Never"},
            "workers": {"repository": workers_repo, "tag": workers_tag, "pullPolicy": "Never"},
        },
        "logLevel": "debug",
        "networkPolicy": {"namespaces": [SAMPLE_NAMESPACE]},
    }
    with helm.Config(kubeconfig_path=kind.kubeconfig, kube_context=CONTEXT, namespace=SYSTEM_NAMESPACE) as config:
        config.install(str(REPO / "charts" / "stratus"), RELEASE, values, namespace=SYSTEM_NAMESPACE,
                       wait="watcher", timeout=300)
        try:
            yield Installed(cluster=kind, namespace=SAMPLE_NAMESPACE, system_namespace=SYSTEM_NAMESPACE)
        finally:
            config.uninstall(RELEASE, wait="watcher", timeout=300, ignore_not_found=True)


@pytest.fixture
def diagnostics_on_failure(request: pytest.FixtureRequest, stratus: Installed) -> Iterator[None]:
    """Print the cluster's state when the test fails: objects, events and the operator's log."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(stratus.cluster.diagnostics([stratus.system_namespace, stratus.namespace]))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
