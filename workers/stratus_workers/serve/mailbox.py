"""Mailbox: hands events from the engine thread to an event loop in batches, not one wake-up per token.

A decode step of a batch of 64 produces 64 events at once. Scheduling each with its own
`call_soon_threadsafe` costs a write to the loop's wake-up pipe and a callback per token, paid
while the engine thread holds the GIL; a mailbox posts them under a lock and wakes the loop once
per batch, which then puts every event into its stream's queue in one callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from typing import Any

_BOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
_BOXES_LOCK = threading.Lock()


class Mailbox:
    """Events bound for queues of one event loop; `post` is safe from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The mailbox of `loop` (one per loop, created on first use)."""
    with _BOXES_LOCK:
        box = _BOXES.get(loop)
        if box is None:
            box = _BOXES[loop] = Mailbox(loop)
        return box
