"""Coalescer: at most one run per key at a time; requests that arrive during a run fold into one rerun."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class _Slot:
    running: bool = False
    dirty: bool = False
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Coalescer:
    """Runs at most one `fn` per key at a time; calls during a run fold into one rerun after it.

    A caller returns once a run that started after its call has finished, so its request is applied. The
    first caller runs the loop; when `fn` raises, that caller gets the error and every waiter is released
    (the next call starts afresh).
    """

    def __init__(self) -> None:
        self._slots: dict[Hashable, _Slot] = {}

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[None]]) -> None:
        slot = self._slots.setdefault(key, _Slot())
        slot.dirty = True
        if slot.running:
            # Wait for the running loop to pick this request up, so callers see their change applied.
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            slot.waiters.append(waiter)
            await waiter
            return
        slot.running = True
        try:
            while slot.dirty:
                slot.dirty = False
                waiters, slot.waiters = slot.waiters, []
                try:
                    await fn()
                finally:
                    for w in waiters:
                        if not w.done():
                            w.set_result(None)
        finally:
            slot.running = False
            for w in slot.waiters:
                if not w.done():
                    w.set_result(None)
            slot.waiters = []
            self._slots.pop(key, None)
