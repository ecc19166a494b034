"""How every entrypoint lives and ends: run an async service until SIGINT/SIGTERM and stop it gracefully; exit now."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import NoReturn, Protocol


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


def exit_now(code: int) -> NoReturn:
    """Flush the logs and leave without interpreter teardown: destroying NCCL process groups or CUDA graphs
    at exit can hang or abort, and the process is ending anyway."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
