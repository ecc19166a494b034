"""Runs an async service until SIGINT/SIGTERM, then stops it gracefully (shared by every entrypoint)."""

from __future__ import annotations

import asyncio
import signal
from typing import Protocol


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self, grace: float = ...) -> None: ...


async def run_until_signalled(service: Service, grace: float = 5.0) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop(grace)
