"""The `start_cluster` factory every scenario starts from: the strict emulator, or a real cluster under `make e2e`."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scenario import Cluster, Start, real_cluster_config, start_emulator_cluster, start_real_cluster


@pytest.fixture(scope="session")
def kind_kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The e2e kind cluster (created or reused, as tests/e2e does), for `make e2e` (STRATUS_SCENARIO_KIND=1)."""
    from kind_cluster import KindCluster

    cluster = KindCluster.up(tmp_path_factory.mktemp("scenario-kind"))
    # The pods the operator creates run the workers image `make images` built (make e2e passes its name).
    cluster.load_image(os.environ.get("WORKERS_IMAGE", "ghcr.io/stratus-llm/stratus-workers:0.1.0"))
    try:
        yield cluster.kubeconfig
    finally:
        if not os.environ.get("STRATUS_E2E_KEEP_CLUSTER"):
            cluster.down()


@pytest.fixture(params=[pytest.param("emulator", marks=pytest.mark.integration),
                        pytest.param("cluster", marks=pytest.mark.e2e)])
async def start_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Start]:
    """`cluster = await start_cluster(env={...}, namespace_labels={...})`: the cluster, a namespace of the test's
    own and the operator running. On the emulator (the default) every scenario runs; on a real cluster only
    where one is given (STRATUS_SCENARIO_KUBECONFIG, or kind under make e2e), else it skips saying why."""
    stops: list[Callable[[], Awaitable[None]]] = []
    backend = request.param
    real: tuple[Path, str | None] | str | None = None
    if backend == "cluster":
        if os.environ.get("STRATUS_SCENARIO_KIND") and not os.environ.get("STRATUS_SCENARIO_KUBECONFIG"):
            real = (request.getfixturevalue("kind_kubeconfig"), None)
        else:
            real = real_cluster_config()
        if isinstance(real, str):
            pytest.skip(real)

    async def start(**options: Any) -> Cluster:
        if backend == "emulator":
            cluster, stop = await start_emulator_cluster(tmp_path, **options)
        else:
            assert isinstance(real, tuple)
            options.pop("extended_resource_toleration", None)  # a real cluster's admission is what it is
            cluster, stop = await start_real_cluster(tmp_path, real[0], real[1], **options)
        stops.append(stop)
        return cluster

    try:
        yield start
    finally:
        for stop in reversed(stops):
            await stop()
