"""Summarise a pipeline trace (STRATUS_PP_TRACE, serve/stagetrace.py): where each stage's decode step spends its time.

`python tests/bench/pp_trace.py DIR [--json OUT]` reads DIR/stage<rank>.jsonl and prints, for each stage,
the decode calls' host segments (between consecutive marks, and `idle` before each call: the time since the
stage's previous call ended) and device segments (CUDA events), as p50 and mean, over all decode steps and
over the *slow* ones: steps whose stage-0 interval (one call's begin to the next's) is above twice the
median of the steps of as many rows. A segment whose mean grows in the slow steps is where the stall sits.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(directory: Path) -> dict[int, list[dict[str, Any]]]:
    stages: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(directory.glob("stage*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            stages[records[0]["r"]] = records
    return stages


def _segments(record: dict[str, Any], key: str) -> dict[str, float]:
    marks = sorted(record.get(key, {}).items(), key=lambda kv: kv[1])
    out = {}
    for (a, ta), (b, tb) in itertools.pairwise(marks):
        out[f"{a}>{b}"] = (tb - ta) * (1e3 if key == "t" else 1.0)
    return out


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "mean": statistics.fmean(values),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
    }


def summarise(stages: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    lead = stages.get(0, [])
    begins = {r["n"]: r["t"]["begin"] for r in lead}
    intervals = {
        r["n"]: (begins[r["n"] + 1] - r["t"]["begin"]) * 1e3
        for r in lead
        if r["m"] == "decode" and r["n"] + 1 in begins and not r.get("prof")
    }
    rows_of = {r["n"]: r["rows"] for r in lead}
    by_rows: dict[int, list[float]] = defaultdict(list)
    for n, ms in intervals.items():
        by_rows[rows_of[n]].append(ms)
    medians = {rows: statistics.median(v) for rows, v in by_rows.items()}
    slow = {n for n, ms in intervals.items() if ms > 2 * medians[rows_of[n]]}
    result: dict[str, Any] = {
        "decode_interval_ms": _stats(list(intervals.values())),
        "slow_steps": len(slow),
        "slow_share_of_time": sum(intervals[n] for n in slow) / max(sum(intervals.values()), 1e-9),
        "by_rows": {str(k): _stats(v) for k, v in sorted(by_rows.items())},
        "stages": {},
    }
    for rank, records in sorted(stages.items()):
        host: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        gpu: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        previous_end = None
        for r in records:
            idle = None if previous_end is None else (r["t"]["begin"] - previous_end) * 1e3
            previous_end = r["t"].get("end")
            if r["m"] != "decode" or r["n"] not in intervals:
                continue
            which = ["all", "slow" if r["n"] in slow else "normal"]
            segs = _segments(r, "t")
            if idle is not None:
                segs = {"idle": idle, **segs}
            for name, ms in segs.items():
                for w in which:
                    host[w][name].append(ms)
            for name, ms in _segments(r, "gpu").items():
                for w in which:
                    gpu[w][name].append(ms)
        result["stages"][str(rank)] = {
            "host_ms": {w: {k: _stats(v) for k, v in segs.items()} for w, segs in host.items()},
            "gpu_ms": {w: {k: _stats(v) for k, v in segs.items()} for w, segs in gpu.items()},
        }
    decodes = [r for r in lead if r["m"] == "decode"]
    result["ahead_hits"] = sum(1 for r in decodes if r.get("hit"))
    result["decodes"] = len(decodes)
    methods: dict[str, int] = defaultdict(int)
    for r in lead:
        methods[r["m"]] += 1
    result["calls"] = dict(methods)
    return result


def report(summary: dict[str, Any]) -> str:
    lines = []
    iv = summary["decode_interval_ms"]
    if not iv:
        return "no decode steps traced"
    lines.append(
        f"decode steps {iv['n']}: interval p50 {iv['p50']:.2f} ms, mean {iv['mean']:.2f}, p90 {iv['p90']:.2f}, "
        f"max {iv['max']:.1f}; slow (>2x p50 of their batch size) {summary['slow_steps']} steps, "
        f"{100 * summary['slow_share_of_time']:.0f}% of the time; calls {summary['calls']}; "
        f"decode steps taken from those queued ahead {summary['ahead_hits']} of {summary['decodes']}"
    )
    for rows, st in summary["by_rows"].items():
        lines.append(f"  rows {rows}: n {st['n']} p50 {st['p50']:.2f} mean {st['mean']:.2f} max {st['max']:.1f}")
    for rank, stage in summary["stages"].items():
        for kind in ("host_ms", "gpu_ms"):
            segs = stage[kind]
            if not segs.get("all"):
                continue
            lines.append(f"stage {rank} {kind} (p50 / mean all | mean normal | mean slow):")
            for name, st in segs["all"].items():
                normal = segs.get("normal", {}).get(name, {}).get("mean", float("nan"))
                slow = segs.get("slow", {}).get(name, {}).get("mean", float("nan"))
                lines.append(f"  {name:24s} {st['p50']:8.3f} / {st['mean']:8.3f} | {normal:8.3f} | {slow:8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    stages = load(args.directory)
    if not stages:
        print(f"no stage*.jsonl in {args.directory}", file=sys.stderr)
        return 2
    summary = summarise(stages)
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
