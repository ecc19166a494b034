"""Where the runner's GPU time goes: packed against eager prefill timings, and the decode step's kernels (CUDA).

A diagnosis, not a benchmark of record: `python tests/bench/gpu_profile_step.py [1b] [135m]` on a GPU prints
prefill times (8 rows of 64 tokens from empty rows; 16 rows and one row of 24 tokens after 1,000 cached tokens)
with the packed prefill and with `STRATUS_PACKED_PREFILL=0`, the decode step's time with CUDA graphs, and
torch.profiler's kernel table of an eager decode step at batch 1 and 64. Random-init weights in bfloat16.
docs/bench-data/gpu-2026-11-30/profile-step-800fd26.txt is its output at 800fd26, whose second mode was the
padded prefill graphs since removed (its "static" rows).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M, random_llama
from stratus_workers.serve.runner.build import build_runner

ARCHS = {"1b": SMOLLM2_1B, "135m": SMOLLM2_135M}


def timed(fn: Callable[[], None], n: int) -> float:
    """Mean ms of `fn` over n calls, after one untimed call."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def prefill_times(runner: Any) -> dict[str, float]:
    def from_empty() -> None:
        runner.forward(0, [[5] * 64] * 8)
        for row in range(8):
            runner.truncate(row, 0)

    for row in range(16):  # 1,000 cached tokens in each of 16 rows
        runner.forward(row, [[7] * 500])
        runner.forward(row, [[7] * 500])

    def after_cached(rows: int) -> Callable[[], None]:
        def run() -> None:
            runner.forward(0, [[9] * 24] * rows)
            for row in range(rows):
                runner.truncate(row, 1000)

        return run

    out = {"8x64 from empty": timed(from_empty, 30), "16x24 after 1000": timed(after_cached(16), 30)}
    out["1x24 after 1000"] = timed(after_cached(1), 30)
    for row in range(16):
        runner.truncate(row, 0)
    return out


def print_kernels(prof: Any, runs: int, label: str, top: int, indent: str = "  ") -> None:
    """Print the device work of `runs` runs that torch.profiler `prof` recorded, per run: its kernels and copies,
    their time, and the `top` heaviest of them by name."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.device_time_total
    launches = sum(t[0] for t in totals.values()) / runs
    us = sum(t[1] for t in totals.values()) / runs
    print(f"{indent}{label}: {launches:.0f} kernels and copies, {us / 1000:.3f} ms of device time a run")
    for name, (count, total) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{indent}  {total / runs:8.1f} us {count / runs:5.1f}x  {name[:100]}")


def kernel_table(runner: Any, batch: int, steps: int = 10) -> None:
    runner.forward(0, [[3] * 64] * batch)
    for _ in range(5):
        runner.decode([4] * batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.decode([4] * batch)
        torch.cuda.synchronize()
    print_kernels(prof, steps, f"eager decode batch {batch}", 12)
    for row in range(batch):
        runner.truncate(row, 0)


def main(names: list[str]) -> None:
    device = torch.device("cuda")
    results: dict[str, Any] = {}
    for name in names:
        torch._dynamo.reset()  # a second model's step functions are new code to the compiler, not recompiles
        model = random_llama(dict(ARCHS[name]), seed=0).to(device, torch.bfloat16).eval()
        for mode in ("packed", "eager"):
            os.environ["STRATUS_PACKED_PREFILL"] = "1" if mode == "packed" else "0"
            start = time.perf_counter()
            runner = build_runner(model, max_rows=64, max_len=1200)
            graphs = runner.warmup()
            print(f"{name} {mode}: built and warmed up in {time.perf_counter() - start:.1f}s, {graphs} graphs")
            with torch.inference_mode():
                results[f"{name} {mode} prefill ms"] = times = prefill_times(runner)
                print("  prefill ms:", {k: round(v, 3) for k, v in times.items()})
                if mode == "packed":
                    for batch in (1, 64):
                        runner.forward(0, [[3] * 64] * batch)
                        ids = [4] * batch
                        ms = timed(lambda ids=ids, r=runner: r.decode(ids), 200)
                        print(f"  decode step batch {batch} (graphs; fed other tokens than its argmax): {ms:.3f} ms")
                        for row in range(batch):
                            runner.truncate(row, 0)
            runner = None  # its graphs and cache freed before the next one is built
            torch.cuda.empty_cache()
        os.environ["STRATUS_PACKED_PREFILL"] = "1"
        eager = build_runner(model, max_rows=64, max_len=1200, cuda_graphs=False)
        with torch.inference_mode():
            for batch in (1, 64):
                kernel_table(eager, batch)
        eager = model = None
        torch.cuda.empty_cache()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or ["1b", "135m"])
