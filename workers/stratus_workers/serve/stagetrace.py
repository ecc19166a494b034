"""Pipeline stage timings (STRATUS_PP_TRACE=DIR): per runner call, when each stage got it, queued it, waited.

A diagnosis tool, off unless STRATUS_PP_TRACE names a directory. Each stage process then appends one
JSON line per runner call to DIR/stage<rank>.jsonl: the call (`m`, `rows`, the call's number `n`, the
same on every stage since stage 0 repeats each call to the others in order), host timestamps
(`t`: CLOCK_MONOTONIC seconds, comparable across the processes of one host) and, on CUDA, the device
time between marks taken with events (`gpu`: milliseconds from the call's first event), read once the
events are done so that tracing adds no wait to the stage. STRATUS_PP_PROFILE=START:COUNT also runs
torch.profiler over calls START..START+COUNT-1 and writes DIR/stage<rank>.trace.json.gz (those calls
are marked `prof` in the lines: the profiler slows them). tests/bench/pp_trace.py summarises the files.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FLUSH_EVERY = 256


class StageTrace:
    """Records this stage's runner calls; every method is a no-op when tracing is off (`enabled` False).

    A stage marks every micro-batch of every step, so callers pass a mark's parts (`tag`, `name`, `group`)
    and the rows of their micro-batches as they are: names and lists are put together here, only when on.
    """

    def __init__(self, rank: int, device: torch.device, directory: str | None = None) -> None:
        directory = os.environ.get("STRATUS_PP_TRACE", "") if directory is None else directory
        self.enabled = bool(directory)
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.calls = 0
        self._path = Path(directory) / f"stage{rank}.jsonl" if directory else None
        self._open: dict[str, Any] | None = None
        self._events: list[tuple[str, Any]] = []
        self._pending: list[tuple[dict[str, Any], list[tuple[str, Any]]]] = []
        self._done: list[dict[str, Any]] = []
        self._profile = _profile_window(os.environ.get("STRATUS_PP_PROFILE", "")) if self.enabled else None
        self._profiler: Any = None
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._path.write_text("")

    def begin(self, method: str, rows: int = 0) -> None:
        """A runner call starts (stage 0: before it is repeated to the others; the others: once it arrived)."""
        if not self.enabled:
            return
        now = time.monotonic()
        self._close_open(now)
        self._profile_step()
        self._open = {"r": self.rank, "n": self.calls, "m": method, "rows": rows, "t": {"begin": now}}
        if self._profiler is not None:
            self._open["prof"] = True
        self.calls += 1
        self._events = []
        self.mark("begin")

    def mark(self, name: str, group: int | None = None, *, tag: str = "", device: bool = True) -> None:
        """The host reached `name` in the current call (and, on CUDA, an event marks the stream there); the
        mark is called `{tag}{name}{group}` (e.g. "ahead_in0": micro-batch 0 of a step queued ahead)."""
        if not self.enabled or self._open is None:
            return
        key = f"{tag}{name}" if group is None else f"{tag}{name}{group}"
        self._open["t"][key] = time.monotonic()
        if self.cuda and device:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record()
            self._events.append((key, event))

    def set(self, key: str, value: Any) -> None:
        if self.enabled and self._open is not None:
            self._open[key] = value

    def groups(self, ranges: Sequence[Sequence[int]], *, tag: str = "") -> None:
        """The current call's micro-batches, (start, end, ...) row ranges, recorded as their sizes (`{tag}groups`)."""
        if self.enabled and self._open is not None:
            self._open[f"{tag}groups"] = [r[1] - r[0] for r in ranges]

    def end(self) -> None:
        """The current call returned to the caller."""
        if self.enabled:
            self._close_open(time.monotonic())

    def close(self) -> None:
        if not self.enabled:
            return
        self._close_open(time.monotonic())
        if self.cuda:
            torch.cuda.synchronize()
        self._resolve(block=True)
        self._write()
        if self._profiler is not None:
            self._stop_profiler()

    # -- internals ----------------------------------------------------------------------------

    def _close_open(self, now: float) -> None:
        if self._open is None:
            return
        self._open["t"]["end"] = now
        self._pending.append((self._open, self._events))
        self._open, self._events = None, []
        self._resolve(block=False)
        if len(self._done) >= FLUSH_EVERY:
            self._write()

    def _resolve(self, *, block: bool) -> None:
        """Turn finished calls' events into milliseconds from each call's first event (in order; stops at
        the first call whose last event is not done yet, unless `block`)."""
        while self._pending:
            record, events = self._pending[0]
            if events and not block and not events[-1][1].query():
                return
            self._pending.pop(0)
            if events:
                first = events[0][1]
                record["gpu"] = {name: round(first.elapsed_time(ev), 3) for name, ev in events}
            self._done.append(record)

    def _write(self) -> None:
        if self._path is None or not self._done:
            return
        with self._path.open("a") as out:
            for record in self._done:
                out.write(json.dumps(record) + "\n")
        self._done = []

    def _profile_step(self) -> None:
        if self._profile is None:
            return
        start, count = self._profile
        if self.calls == start and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            try:
                self._profiler = torch.profiler.profile(activities=activities)
                self._profiler.__enter__()
            except Exception as exc:  # a diagnosis tool must not take the stage down
                log.warning("stage %d: torch.profiler did not start (%s: %s)", self.rank, type(exc).__name__, exc)
                self._profiler, self._profile = None, None
        elif self.calls == start + count and self._profiler is not None:
            self._stop_profiler()

    def _stop_profiler(self) -> None:
        assert self._path is not None
        profiler, self._profiler, self._profile = self._profiler, None, None
        raw = self._path.with_name(f"stage{self.rank}.trace.json")
        try:
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(str(raw))
            with raw.open("rb") as src, gzip.open(raw.with_name(raw.name + ".gz"), "wb") as dst:
                dst.write(src.read())
            raw.unlink()
        except Exception as exc:
            log.warning("stage %d: torch.profiler's trace was not written (%s: %s)", self.rank, type(exc).__name__, exc)


def _profile_window(value: str) -> tuple[int, int] | None:
    if not value:
        return None
    start, _, count = value.partition(":")
    try:
        return int(start), int(count or 20)
    except ValueError:
        raise ValueError(f"STRATUS_PP_PROFILE={value!r}: expected START:COUNT (runner calls), e.g. 200:30") from None
