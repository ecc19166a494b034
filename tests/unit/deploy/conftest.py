"""Fixtures for the chart and manifest tests: Helm's own engine (helm-python-sdk), kustomize, the YAML on disk."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# pytest imports test modules with --import-mode=importlib, which adds no folder to sys.path;
# this one makes the shared helpers (chart_support) importable by name from the tests here.
sys.path.insert(0, str(Path(__file__).parent))

from chart_support import (
    CHART_DIR,
    CRD_SOURCE,
    DEPLOY_DIR,
    NAMESPACE,
    RELEASE,
    REPO,
    Manifest,
    Render,
    load_all,
)


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    import helm_python as helm

    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: Any) -> Render:
    """Render the chart offline (as `helm template` would) and parse every manifest."""

    def _render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> list[Manifest]:
        rendered = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
        objects: list[Manifest] = []
        for path, text in sorted(rendered.items()):
            if not path.endswith("NOTES.txt"):
                objects.extend(load_all(text))
        return objects

    return _render


@pytest.fixture(scope="session")
def default_objects(render: Render) -> list[Manifest]:
    return render()


@pytest.fixture(scope="session")
def crd_source() -> Path:
    if not CRD_SOURCE.is_file():
        pytest.skip(f"{CRD_SOURCE.relative_to(REPO)} is not generated yet (make manifests writes it)")
    return CRD_SOURCE


@pytest.fixture(scope="session")
def kustomize_objects(crd_source: Path) -> list[Manifest]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; it builds the kustomization")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY_DIR)], capture_output=True, text=True, check=True,
                         timeout=120)
    return load_all(out.stdout)
