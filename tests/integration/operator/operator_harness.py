"""Test harness for the operator: the emulator's kubeconfig, `stratus operator` as a process, polling."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from stratus_workers.ports import free_port

ROOT = Path(__file__).resolve().parents[3]
CRD = ROOT / "deploy" / "crds" / "stratus.dev_llmdeployments.yaml"


def write_kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                      "namespace": "default"}}],
    }))
    return path


class OperatorProcess:
    """`stratus operator` as a child process against the emulator; restartable, killable."""

    def __init__(self, kubeconfig: Path, log_path: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ("--all-namespaces",)) -> None:
        self.args = args
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra_env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.starts = 0

    async def start(self, healthy_within: float = 60.0) -> None:
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "STRATUS_HEALTH_PORT": str(self.health_port),
               "STRATUS_METRICS_PORT": str(self.metrics_port), "STRATUS_RESYNC_SECONDS": "30",
               **self.extra_env}
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        self.proc = await asyncio.create_subprocess_exec(
            # The operator's own entry point (the full CLI would also import torch for other subcommands).
            sys.executable, "-m", "stratus_operator.cli.operator", "--log-level", "info", "--log-format", "text",
            *self.args,
            env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )
        log.close()
        await self.wait_healthy(healthy_within)

    async def wait_healthy(self, timeout: float = 60.0) -> None:
        import aiohttp

        deadline = asyncio.get_running_loop().time() + timeout
        # A probe answers at once or not at all, as the kubelet's 1 s timeout expects.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while asyncio.get_running_loop().time() < deadline:
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
                try:
                    async with session.get(f"http://127.0.0.1:{self.health_port}/healthz") as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"operator not healthy in {timeout}s:\n{self.logs()[-4000:]}")

    async def kill(self) -> None:
        """SIGKILL: no cleanup handlers, as when a node dies."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                await self.kill()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def eventually(check: Callable[[], Any], *, timeout: float = 30.0, what: str = "",
                    logs: Callable[[], str] | None = None) -> Any:
    """Poll `check` (sync or async) until it returns a truthy value; fail with the last value seen."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        last = value
        if asyncio.get_running_loop().time() > deadline:
            tail = ("\noperator log:\n" + logs()[-6000:]) if logs else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last: {last!r}{tail}")
        await asyncio.sleep(0.1)
