"""Container suite fixtures: one skip line without a Docker engine, else the sample's plan running as containers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --import-mode=importlib adds no folder to sys.path; the suite's helpers are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

from docker_pods import engine_missing
from sample_stack import Images, Stack, deployed, gguf_manifest, sample_manifest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if item.get_closest_marker("containers")]
    if not ours:
        return
    reason = engine_missing()
    if reason is not None:
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def images() -> Images:
    found = Images.from_env()
    missing = found.missing()
    if missing:
        pytest.fail(f"image(s) {', '.join(missing)} not built; run `make images` first")
    return found


@pytest.fixture(scope="session")
def stack(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with deployed(images, tmp_path_factory.mktemp("containers"), sample_manifest(), "e2e-containers") as running:
        yield running


@pytest.fixture(scope="session")
def gguf_stack(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The sample with a GGUF edge variant (test_gguf_edge.py), started after the first stack is gone."""
    with deployed(images, tmp_path_factory.mktemp("gguf"), gguf_manifest(), "e2e-containers-gguf") as running:
        yield running
