"""Coalescer: one run per key at a time; calls during a run fold into one rerun; callers see their call applied."""

from __future__ import annotations

import asyncio

import pytest

from stratus_operator.coalescer import Coalescer

pytestmark = pytest.mark.unit


class Recorder:
    """An fn that records each run and can be held inside a run until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.active = 0
        self.most_active = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self) -> None:
        self.runs += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.started.set()
        try:
            await self.release.wait()
        finally:
            self.active -= 1


async def test_a_lone_call_runs_once() -> None:
    fn = Recorder()
    await Coalescer().run(("ns", "a"), fn)
    assert fn.runs == 1


async def test_calls_during_a_run_fold_into_one_rerun() -> None:
    coalescer, fn = Coalescer(), Recorder()
    fn.release.clear()
    first = asyncio.create_task(coalescer.run(("ns", "a"), fn))
    await fn.started.wait()
    # Five requests while the first run is held: none runs concurrently, all are served by one rerun.
    others = [asyncio.create_task(coalescer.run(("ns", "a"), fn)) for _ in range(5)]
    await asyncio.sleep(0)
    assert fn.runs == 1 and not any(t.done() for t in others)
    fn.release.set()
    await asyncio.gather(first, *others)
    assert fn.runs == 2 and fn.most_active == 1


async def test_a_waiter_returns_only_after_a_run_that_began_after_its_call() -> None:
    coalescer, fn = Coalescer(), Recorder()
    seen: list[int] = []
    fn.release.clear()
    first = asyncio.create_task(coalescer.run("k", fn))
    await fn.started.wait()

    async def later() -> None:
        await coalescer.run("k", fn)
        seen.append(fn.runs)  # the run that covers this call has finished

    waiter = asyncio.create_task(later())
    await asyncio.sleep(0)
    fn.release.set()
    await asyncio.gather(first, waiter)
    assert seen == [2]


async def test_different_keys_run_concurrently() -> None:
    coalescer, fn = Coalescer(), Recorder()
    fn.release.clear()
    tasks = [asyncio.create_task(coalescer.run(key, fn)) for key in ("a", "b", "c")]
    while fn.active < 3:
        await asyncio.sleep(0)
    assert fn.most_active == 3
    fn.release.set()
    await asyncio.gather(*tasks)
    assert fn.runs == 3


async def test_an_error_reaches_the_runner_and_releases_the_waiters() -> None:
    coalescer = Coalescer()
    gate = asyncio.Event()
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise RuntimeError("API down")

    first = asyncio.create_task(coalescer.run("k", failing))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(coalescer.run("k", failing))
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(RuntimeError, match="API down"):
        await first
    await asyncio.wait_for(waiter, 1)  # released, without an error of its own
    assert calls == 1
    # The key starts afresh: the next call runs.
    gate.set()
    with pytest.raises(RuntimeError):
        await coalescer.run("k", failing)
    assert calls == 2
