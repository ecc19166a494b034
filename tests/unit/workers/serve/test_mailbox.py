"""The mailbox delivers every event posted from another thread, in order per queue."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stratus_workers.serve.mailbox import mailbox

pytestmark = pytest.mark.unit


async def test_events_from_threads_arrive_in_order() -> None:
    loop = asyncio.get_running_loop()
    box = mailbox(loop)
    assert mailbox(loop) is box
    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(4)]

    def engine() -> None:  # one "step": an event for every queue, several times
        for step in range(50):
            for q in queues:
                box.post(q, step)

    thread = threading.Thread(target=engine)
    thread.start()
    got = [[await asyncio.wait_for(q.get(), 10) for _ in range(50)] for q in queues]
    thread.join()
    assert got == [list(range(50))] * 4
