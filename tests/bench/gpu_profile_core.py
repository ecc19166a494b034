"""Where a serving step's time goes at the engine core, without gRPC: the shared-prefix workload's steps (CUDA).

A diagnosis, not a benchmark of record. `python tests/bench/gpu_profile_core.py [135m|1b] [--steps N]` builds the
engine core as a server would (fused runner, prefix pool, 64 rows), keeps 64 requests in flight (one shared
system prompt of 1,000 tokens and a 24-token turn each, 128 new tokens, greedy), and prints:
host ms per step, prefill steps apart from plain ones, with the prefix cache off and on; then, for a window of
steps with the cache on, cProfile's heaviest Python calls and torch.profiler's heaviest CPU ops and GPU kernels.
With `--phases N` it first traces N steps' phases (serve/loop.py's StepTrace: host times and, on CUDA, when the
device reached each phase) and prints, for steps that admit and steps that do not, each phase's host µs and when
the device finished the prefill against when the host had its first tokens. With `--parts N` it times, over N steps,
the host calls inside the steps that admit requests (a packed pass's plan: its numpy, the pinned copy, the graph's
inputs, the cache's growth and lengths; the load, the head) by wrapping them with perf_counter, to find where an
admitting step's host time goes between StepTrace's phases.
Random-init weights (bfloat16 on CUDA, float32 on the CPU, where it runs the tiny config for a smoke test).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import step_phases
import torch
from torch.profiler import ProfilerActivity, profile

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M, TINY, random_llama
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.core import PREFIX_BLOCK, EngineCore, EngineRequest, StepOutput
from stratus_workers.serve.loop import StepTrace
from stratus_workers.serve.prefix import PrefixCache
from stratus_workers.serve.runner import no_mark
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.sessions import SpeculativeSessions

ARCHS = {"1b": SMOLLM2_1B, "135m": SMOLLM2_135M, "tiny": TINY}
EOS = frozenset({-1})  # random weights: no request ends early, every one runs to its budget


class Workload:
    """A closed loop of `inflight` requests: when one finishes, the next one is added."""

    def __init__(
        self, core: EngineCore, vocab: int, system: int, turn: int, new: int, inflight: int, stagger: bool = False
    ) -> None:
        gen = torch.Generator().manual_seed(11)
        self.system = torch.randint(3, vocab, (system,), generator=gen).tolist()
        self.gen = gen
        self.core, self.vocab, self.turn, self.new = core, vocab, turn, new
        self.next_id = 0
        self.live = 0
        # Staggered: one request joins per step until `inflight` run, so they also finish (and return) apart, as
        # the bench's staggered clients do; else all at once, and every round is a burst.
        self.owed = inflight - 1 if stagger else 0
        self.ended = 0  # requests a step's part said finished (a step's output says the rest)
        core.on_part = self.part  # as the engine loop: first tokens go out ahead of their step's output
        for _ in range(inflight - self.owed):
            self.add()

    def part(self, out: StepOutput) -> None:
        out.pack(True)  # what the engine loop does before sending it
        self.ended += len(out.finished)

    def add(self) -> None:
        prompt = self.system + torch.randint(3, self.vocab, (self.turn,), generator=self.gen).tolist()
        self.core.add(EngineRequest(self.next_id, prompt, Sampling(max_new_tokens=self.new)))
        self.next_id += 1
        self.live += 1

    def step(self) -> tuple[float, bool]:
        """One engine step: its host seconds and whether it prefilled."""
        before = self.core.prefill_tokens
        start = time.perf_counter()
        out = self.core.step()
        took = time.perf_counter() - start
        for _ in range(len(out.finished) + self.ended):
            self.live -= 1
            self.add()
        self.ended = 0
        if self.owed:
            self.owed -= 1
            self.add()
        return took, self.core.prefill_tokens != before


def build_core(arch: str, device: str, dtype: torch.dtype, rows: int, max_len: int, cache: bool) -> EngineCore:
    model = random_llama(ARCHS[arch]).to(device=device, dtype=dtype).eval()
    pool = rows * max_len if cache else 0
    runner = build_runner(model, max_rows=rows + 4, max_len=max_len, pool_tokens=pool)
    sessions = SpeculativeSessions(runner, EOS, first_row=rows)
    prefix = PrefixCache(PREFIX_BLOCK, pool // PREFIX_BLOCK) if cache else None
    core = EngineCore(runner, sessions, EOS, max_batch_size=rows, prefix=prefix)
    core.warmup()
    return core


def summary(times: list[tuple[float, bool]]) -> str:
    def ms(values: list[float]) -> str:
        if not values:
            return "-"
        q = statistics.quantiles(values, n=20) if len(values) > 1 else values * 19
        return f"{len(values):4d} steps p50 {statistics.median(values) * 1e3:6.2f} p95 {q[18] * 1e3:6.2f} ms"

    plain = [t for t, p in times if not p]
    pre = [t for t, p in times if p]
    return f"plain {ms(plain)} | prefill {ms(pre)} | mean {sum(t for t, _ in times) / len(times) * 1e3:.2f} ms"


def trace_phases(load: Workload, steps: int, keep: str = "") -> None:
    """Trace `steps` steps' phases (StepTrace) and print their medians, admitting steps apart from the rest; `keep`:
    also leave the trace (StepTrace's JSON) there."""
    with tempfile.TemporaryDirectory() as tmp:
        path = keep or os.path.join(tmp, "phases")
        trace = StepTrace(path, f"0,{steps}")
        core = load.core
        core.mark = core.runner.mark = trace.marker()
        for i in range(steps):
            trace.before(i)
            with trace.marker()("step"):
                load.step()
            trace.after(i)
        core.mark = core.runner.mark = no_mark
        with open(path) as f:
            rows = json.load(f)["phases"]
    for line in step_phases.summary(rows):
        print(f"  {line}")


class Parts:
    """Host µs of wrapped calls, counted only while `on` (the steps that admit requests)."""

    def __init__(self) -> None:
        self.on = False
        self.times: dict[str, list[float]] = {}
        self.open: dict[str, float] = {}

    def wrap(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)
        self.times.setdefault(label, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.open[label] = self.open.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def end_step(self) -> None:
        """Close a step: each label's time in it (0 where it was not called) becomes one sample."""
        for label, totals in self.times.items():
            totals.append(self.open.get(label, 0.0) * 1e6)
        self.open = {}


def time_parts(load: Workload, steps: int) -> None:
    """Print, for the admitting steps among `steps`, each wrapped call's host µs per step (p50, mean)."""
    from stratus_workers.serve import kernels
    from stratus_workers.serve.runner import fused

    core, runner = load.core, load.core.runner
    parts = Parts()
    for owner, name, label in (
        (core, "step", "core.step"), (core, "_admit", "core._admit"), (core, "_load", "core._load"),
        (core, "_prefill", "core._prefill"), (runner, "_packed_plan", "runner._packed_plan"),
        (runner, "_packed_graph", "runner._packed_graph (inputs copy)"), (runner, "_splits", "runner._splits"),
        (runner, "head", "runner.head"), (runner.cache, "grow", "cache.grow"),
        (runner.cache, "set_row_lengths", "cache.set_row_lengths"), (fused, "to_device", "fused.to_device"),
        (kernels, "extend_blocks", "kernels.extend_blocks"), (kernels, "extend_block", "kernels.extend_block"),
        (np, "concatenate", "np.concatenate"), (np, "fromiter", "np.fromiter"),
        (torch.cuda.CUDAGraph, "replay", "CUDAGraph.replay"),
    ):
        if hasattr(owner, name):  # (the CPU's runner has no packed pass)
            parts.wrap(owner, name, label)
    admitting = 0
    for _ in range(steps):
        parts.on = bool(core.waiting)
        load.step()
        if parts.on:
            parts.end_step()
            admitting += 1
    print(f"  host µs per admitting step ({admitting} of {steps} steps; a call inside another counts in both):")
    for label, values in sorted(parts.times.items(), key=lambda kv: -statistics.fmean(kv[1] or [0.0])):
        if values and any(values):
            print(f"    {label:40s} p50 {statistics.median(values):8.1f}  mean {statistics.fmean(values):8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", nargs="?", default="135m", choices=sorted(ARCHS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--window", type=int, default=60, help="steps profiled (cache on)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--system", type=int, default=1000)
    parser.add_argument("--turn", type=int, default=24)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=0,
                        help="the rows' length limit (default: the workload's, +16); a server's is its longest prompt "
                        "and answer, e.g. 3,216 where it also serves a 3,000-token shared prefix")
    parser.add_argument("--trace", help="also write the torch.profiler window as a Chrome trace here")
    parser.add_argument("--cache-only", action="store_true", help="skip the run with the prefix cache off")
    parser.add_argument("--stagger", action="store_true", help="requests join one per step at first (not at once)")
    parser.add_argument("--phases", type=int, default=0, help="trace this many steps' phases first (cache on)")
    parser.add_argument("--phases-file", default="", help="keep the phases' trace here (not a .json name)")
    parser.add_argument("--parts", type=int, default=0,
                        help="time the admitting steps' host calls over N steps (then stop)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    max_len = max(args.max_len, args.system + args.turn + args.new + 16)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for cache in (True,) if args.cache_only else (False, True):
        t0 = time.perf_counter()
        core = build_core(args.arch, device, dtype, args.rows, max_len, cache)
        load = Workload(core, core.runner.vocab_size, args.system, args.turn, args.new, args.rows, args.stagger)
        built = time.perf_counter() - t0
        times = [load.step() for _ in range(args.steps)]
        sync()
        stats = core.stats()
        hit = stats.prefix_hit_tokens / max(1, stats.prefix_queried_tokens)
        beside = f", {core.prefills_beside} prefills beside the decode step" if core.prefills_beside else ""
        label = f"{args.arch} cache {'on ' if cache else 'off'} (built {built:.0f}s, hit {hit:.2f}{beside})"
        print(f"{label}: {summary(times)}")
        if not cache:
            del core, load
            continue
        if args.phases:
            trace_phases(load, args.phases, args.phases_file)
        if args.parts:
            time_parts(load, args.parts)
            return
        profiler = cProfile.Profile()
        profiler.enable()
        window = [load.step() for _ in range(args.window)]
        sync()
        profiler.disable()
        print(f"  cProfile window: {summary(window)}")
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print("\n".join("  " + line for line in text.getvalue().splitlines() if line.strip()))
        with profile(activities=activities) as prof:
            window = []
            for _ in range(args.window):  # the steps that admit requests apart from the rest, in the table
                with torch.profiler.record_function("step: admits" if core.waiting else "step: none waiting"):
                    window.append(load.step())
            sync()
        print(f"  torch.profiler window: {summary(window)}")
        if args.trace:
            prof.export_chrome_trace(args.trace)
        table: Any = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        if cuda:
            print(table.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
