"""Container suite fixtures: one skip line without a Docker engine, else the sample's plan running as containers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --import-mode=importlib adds no folder to sys.path; the suite's helpers are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

from docker_pods import engine_missing
from sample_stack import Images, Stack, deployed


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
    with deployed(images, tmp_path_factory.mktemp("containers")) as running:
        yield running
