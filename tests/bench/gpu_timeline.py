"""Where the device idled in a traced range of engine steps, and what the engine's host thread did meanwhile.

A diagnosis, not a benchmark of record. Reads what the engine loop writes under STRATUS_STEP_TRACE
(serve/loop.py's StepTrace: the loop's phases `take`, `gather`, `step`, `emit` and, inside a step, the verify
pipeline's `launch` and `reply` and the packed `pass`), either torch.profiler's Chrome trace (`.json`: every kernel
and copy, host calls slowed by the profiler) or the phases with CUDA events (the device counted busy from each
pass's start to the end of its launch's work: the pass, the head, the verdicts), and prints the window's
device busy time, its idle time split by the innermost phase the host was in (`take`/`gather`: waiting for the
frontend's calls; `launch`: building the next pass; `reply`: judging a pass), the host calls (torch ops and CUDA
runtime calls) that overlapped the idle time most, and a line per step. `python tests/bench/gpu_timeline.py TRACE
[--gap-us 5]`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from typing import Any

DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
PHASES = ("pass", "head", "verdicts", "open", "launch", "reply", "step", "emit", "gather", "take")  # innermost first
Interval = tuple[float, float]


def load(path: str) -> list[dict[str, Any]]:
    """The trace as Chrome trace events (complete events only); the events form becomes such events too."""
    opener: Any = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    if "phases" not in data:
        return [e for e in data["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    rows = data["phases"]
    events = [{"cat": "user_annotation", "name": n, "ts": t0, "dur": t1 - t0} for n, t0, t1, _, _ in rows]
    launches = [(t0, t1, d1) for n, t0, t1, _, d1 in rows if n == "launch" and d1 is not None]
    for name, t0, t1, d0, _ in rows:
        if name == "pass" and d0 is not None:
            end = next((d1 for l0, l1, d1 in launches if l0 <= t0 and t1 <= l1), None)
            if end is not None and end > d0:
                events.append({"cat": "kernel", "name": "pass, head, verdicts", "ts": d0, "dur": end - d0})
    return events


def merged(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def overlap(a: Interval, spans: list[Interval]) -> float:
    return sum(max(0.0, min(a[1], e) - max(a[0], s)) for s, e in spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trace")
    parser.add_argument("--gap-us", type=float, default=5.0, help="idle spans shorter than this are not counted")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    events = load(args.trace)
    phases: dict[str, list[Interval]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "user_annotation" and e["name"] in PHASES:
            phases[e["name"]].append((e["ts"], e["ts"] + e["dur"]))
    steps = sorted(phases["step"])
    if not steps:
        raise SystemExit("no `step` phases in the trace: was it written by STRATUS_STEP_TRACE?")
    window = (
        min(s for spans in phases.values() for s, _ in spans), max(e for spans in phases.values() for _, e in spans)
    )
    busy = merged([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE])
    busy = [(max(a, window[0]), min(b, window[1])) for a, b in busy if b > window[0] and a < window[1]]
    idle: list[Interval] = []
    cursor = window[0]
    for a, b in busy:
        if a - cursor >= args.gap_us:
            idle.append((cursor, a))
        cursor = max(cursor, b)
    if window[1] - cursor >= args.gap_us:
        idle.append((cursor, window[1]))
    span = window[1] - window[0]
    busy_us = sum(b - a for a, b in busy)
    print(f"window {span / 1e3:.2f} ms over {len(steps)} steps; device busy {busy_us / 1e3:.2f} ms "
          f"({busy_us / span:.0%}), idle spans >= {args.gap_us:g} us: {len(idle)}, "
          f"{sum(b - a for a, b in idle) / 1e3:.2f} ms")
    # Each idle microsecond goes to the innermost phase the host was in then (none: between phases).
    by_phase: collections.defaultdict[str, float] = collections.defaultdict(float)
    for gap in idle:
        left = [gap]
        for name in PHASES:
            spans = merged(phases[name])
            rest: list[Interval] = []
            for piece in left:
                by_phase[name] += overlap(piece, spans)
                cursor = piece[0]
                for a, b in spans:
                    if b <= piece[0] or a >= piece[1]:
                        continue
                    if a > cursor:
                        rest.append((cursor, a))
                    cursor = max(cursor, b)
                if cursor < piece[1]:
                    rest.append((cursor, piece[1]))
            left = rest
        by_phase["(no phase)"] += sum(b - a for a, b in left)
    print("device idle by the host's phase:")
    for name, us in sorted(by_phase.items(), key=lambda item: -item[1]):
        host = sum(b - a for a, b in phases.get(name, []))
        print(f"  {name:<12} idle {us / 1e3:8.2f} ms   (host in it {host / 1e3:8.2f} ms, {len(phases.get(name, []))}x)")
    ops: collections.defaultdict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver"):
            us = overlap((e["ts"], e["ts"] + e["dur"]), idle)
            if us:
                ops[f'{e.get("cat")}: {e["name"]}'] += us
    print(f"host calls overlapping the idle time (top {args.top}; nested calls count in each):")
    for name, us in sorted(ops.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {us / 1e3:8.2f} ms  {name}")
    inner = [n for n in phases if n not in ("step", "take", "gather", "emit")]
    inner.sort(key=lambda n: PHASES.index(n) if n in PHASES else len(PHASES))
    print("per step, ms (host time in each phase inside it; idle: the device's, inside the step and before it):")
    print("step  start    step  " + "  ".join(f"{n:>8}" for n in inner) + "  idle_in  idle_before")
    previous = window[0]
    for i, (a, b) in enumerate(steps):
        cells = "  ".join(f"{overlap((a, b), merged(phases[n])) / 1e3:8.2f}" for n in inner)
        idle_in = sum(overlap(g, [(a, b)]) for g in idle) / 1e3
        idle_before = sum(overlap(g, [(previous, a)]) for g in idle) / 1e3
        print(f"{i:4d} {(a - window[0]) / 1e3:7.2f} {(b - a) / 1e3:6.2f}  {cells}  {idle_in:7.2f}  {idle_before:11.2f}")
        previous = b


if __name__ == "__main__":
    main()
