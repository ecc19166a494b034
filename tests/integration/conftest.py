"""Fixtures that start real model servers and routers on loopback ports (shared by every integration test)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from stratus_workers.client import Client
from stratus_workers.ports import free_port
from stratus_workers.router.config import RouterConfig
from stratus_workers.router.server import RouterServer

if TYPE_CHECKING:
    # Imported where used: the operator's integration tests share this file and never load a model.
    from stratus_workers.serve.server import ModelServer

ServerFactory = Callable[..., AbstractAsyncContextManager["ModelServer"]]


@pytest.fixture
def model_server(tiny_model_dir: Path) -> ServerFactory:
    """`async with model_server(tier="edge", max_prompt_tokens=...) as server:` an in-process server.

    Its engine runs in a thread of the test process (the CPU's default) unless `engine="process"`.
    """

    import torch

    from stratus_workers.serve.server import ModelServer, ServerSettings

    torch.set_num_threads(1)  # two cores are shared by everything a test starts

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[ModelServer]:
        # One torch thread: two cores are shared by everything a test starts (an engine process included).
        settings: dict[str, Any] = dict(model=str(tiny_model_dir), port=0, http_port=0, log_format="text", threads=1)
        settings.update(overrides)
        server = ModelServer(ServerSettings(**settings))
        await server.start()
        try:
            yield server
        finally:
            await server.stop(0.5)

    return start


@pytest.fixture
def router_config() -> Callable[..., RouterConfig]:
    """`router_config(policy, [(name, address, tier), ...], cascade={...})` builds a RouterConfig."""
    return make_router_config


@pytest.fixture
def running_router() -> Callable[..., AbstractAsyncContextManager[RouterServer]]:
    """`async with running_router(config) as router:` an in-process router on free ports."""
    return start_router


def make_router_config(policy: str, backends: list[tuple[str, str, str]], **routing: Any) -> RouterConfig:
    return RouterConfig.model_validate(
        {
            "routing": {"policy": policy, **routing},
            "backends": [{"name": n, "address": a, "tier": t} for n, a, t in backends],
            "healthIntervalSeconds": 0.3,
        }
    )


@asynccontextmanager
async def start_router(config: RouterConfig, **kwargs: Any) -> AsyncIterator[RouterServer]:
    router = RouterServer(config, **kwargs)
    await router.start()
    try:
        yield router
    finally:
        await router.stop(0.5)


@pytest.fixture
def server_process(tiny_model_dir: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], str]]]:
    """Start `python -m stratus_workers.serve` as a separate process; returns (process, address)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(tier: str = "edge", **flags: Any) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "stratus_workers.serve",
            "--model",
            str(tiny_model_dir),
            "--tier",
            tier,
            "--port",
            str(port),
            "--http-port",
            "0",
            "--threads",
            "1",
            "--log-format",
            "text",
        ]
        for key, value in flags.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        proc = subprocess.Popen(args, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started.append(proc)
        address = f"127.0.0.1:{port}"
        with Client(address) as client:
            deadline = time.monotonic() + 120
            while not client.healthy():
                if proc.poll() is not None:
                    raise RuntimeError(f"server process exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("server process did not become healthy in 120 s")
                time.sleep(0.2)
        return proc, address

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
