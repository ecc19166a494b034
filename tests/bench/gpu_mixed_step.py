"""A mixed step against a decode step plus a separate packed prefill: what one read of the weights saves (CUDA).

A diagnosis, not a benchmark of record: `python tests/bench/gpu_mixed_step.py [1b] [135m]` on a GPU builds the
runner as the server does (CUDA graphs, Triton attention, packed prefill; random-init weights in bfloat16), fills
64 decoding rows with 128 tokens each, and times, for K prefill rows of 64 prompt tokens (K = 1, 2, 8):

- the decode step of the 64 rows alone, and the packed prefill of the K rows alone;
- both one after the other (what a prefill step ran before mixed steps);
- one mixed pass of the 64 decode tokens and the K chunks (`FusedRunner.forward_mixed`).

Each figure is the mean time from the first launch until the tokens are on the host (the argmax read back, as
the engine reads them), over 50 runs after warm-up, the rows rolled back between runs and outside the timing.
Decode-ahead is off, so that every decode step is timed, not found done. `--device cpu` runs the same calls on the
CPU (the fused path's arithmetic), to check the script, not to time anything. `--kernels N` also prints, for K = 1
and 2, torch.profiler's device time of each call (all its kernels and copies, per run) and its N heaviest kernels.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from gpu_profile_step import print_kernels
from torch.profiler import ProfilerActivity, profile

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M, TINY, random_llama
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import FusedRunner

ARCHS = {"1b": SMOLLM2_1B, "135m": SMOLLM2_135M, "tiny": TINY}
DECODE_ROWS = 64
CONTEXT = 128
PROMPT = 64
PREFILLS = (1, 2, 8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def roll_back(runner: FusedRunner, rows: dict[int, int]) -> None:
    """Set each row's length back to `rows[row]` (what a timed call appended is past it, overwritten next run), in one
    copy: a fill a row (`set_length`) put 65 int64 fill kernels into every call's device time in `--kernels`' table
    (45 µs of session 24's 1.450 ms decode step, which it could not place)."""
    runner.cache.set_row_lengths(list(rows), list(rows.values()))


def timed(runner: FusedRunner, work: Callable[[], None], rows: dict[int, int], n: int) -> float:
    """Mean ms of `work` (which ends with its tokens on the host), the rows set back to `rows` after each run."""
    total = 0.0
    for i in range(n + 2):  # two untimed runs first
        sync(runner.device)
        start = time.perf_counter()
        work()
        if i >= 2:
            total += time.perf_counter() - start
        roll_back(runner, rows)
    return total / n * 1e3


def kernel_table(runner: FusedRunner, label: str, work: Callable[[], None], rows: dict[int, int], top: int) -> None:
    """Print `work`'s device time per run (kernels, copies, sets) and its `top` heaviest kernels, over 20 runs."""
    runs = 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            work()
            roll_back(runner, rows)
        sync(runner.device)
    print_kernels(prof, runs, label, top, indent="    ")


def measure(name: str, device: torch.device, runs: int, kernels: int = 0) -> list[tuple[str, int, float]]:
    model = random_llama(dict(ARCHS[name]), seed=0).to(device, torch.bfloat16 if device.type == "cuda" else None)
    model = model.eval()
    os.environ.update(STRATUS_DECODE_AHEAD="0", STRATUS_MIXED_STEP="1", STRATUS_PACKED_PREFILL="1")
    start = time.perf_counter()
    runner = build_runner(model, max_rows=DECODE_ROWS + max(PREFILLS), max_len=1024, fast=True)
    assert isinstance(runner, FusedRunner) and runner.mixed_step
    graphs = runner.warmup(batch_sizes=[DECODE_ROWS])
    print(f"{name}: built and warmed up in {time.perf_counter() - start:.1f}s, {graphs} graphs, "
          f"triton attention {runner.triton_attention}, cuda graphs {runner.cuda_graphs}")  # fmt: skip
    out: list[tuple[str, int, float]] = []
    with torch.inference_mode():
        for row in range(DECODE_ROWS):
            runner.forward(row, [[(3 * row + j) % 100 for j in range(CONTEXT)]])
        decode_ids = [4] * DECODE_ROWS
        for k in PREFILLS:
            rows = {r: (CONTEXT if r < DECODE_ROWS else 0) for r in range(DECODE_ROWS + k)}
            chunks = [[(5 + r + j) % 100 for j in range(PROMPT)] for r in range(k)]

            def decode() -> None:
                runner.decode(decode_ids)  # its greedy choices come back to the host

            def prefill(chunks: list[list[int]] = chunks) -> None:
                runner.forward(DECODE_ROWS, chunks).argmax(dim=-1).tolist()

            def both(chunks: list[list[int]] = chunks) -> None:
                logits = runner.forward(DECODE_ROWS, chunks)
                runner.decode(decode_ids)
                logits.argmax(dim=-1).tolist()

            def mixed(k: int = k, chunks: list[list[int]] = chunks) -> None:
                tokens = [[t] for t in decode_ids] + chunks
                runner.forward_mixed(list(range(DECODE_ROWS + k)), tokens).argmax(dim=-1).tolist()

            replays = runner.mixed_replays
            for label, work in (
                (f"decode step, {DECODE_ROWS} rows", decode),
                (f"packed prefill, {k} x {PROMPT}", prefill),
                ("decode step + packed prefill (unmixed)", both),
                (f"mixed pass, {DECODE_ROWS} + {k} x {PROMPT} tokens", mixed),
            ):
                out.append((label, k, timed(runner, work, rows, runs)))
                if kernels and k <= 2 and device.type == "cuda":
                    kernel_table(runner, f"K={k} {label}", work, rows, kernels)
            graphed = runner.mixed_replays - replays
            print(f"  K={k}: {graphed} of {runs + 2} mixed passes ran as a captured graph")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=["1b"], choices=sorted(ARCHS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--kernels", type=int, default=0, help="print this many heaviest kernels of each call (K 1, 2)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for name in args.archs:
        torch._dynamo.reset()
        rows = measure(name, device, args.runs, args.kernels)
        print(f"\n{name}, {DECODE_ROWS} decoding rows at {CONTEXT} tokens, K new rows of {PROMPT} prompt tokens "
              f"({device.type}):")  # fmt: skip
        print("| K | what | ms |")
        print("| ---: | --- | ---: |")
        for label, k, ms in rows:
            print(f"| {k} | {label} | {ms:.3f} |")
        by_k: dict[int, dict[str, float]] = {}
        for label, k, ms in rows:
            by_k.setdefault(k, {})[label.split(",")[0].split(" (")[0]] = ms
        for k, figures in by_k.items():
            unmixed, mixed = figures["decode step + packed prefill"], figures["mixed pass"]
            print(f"K={k}: mixed {mixed:.3f} ms against {unmixed:.3f} ms unmixed ({unmixed - mixed:+.3f} ms saved, "
                  f"{mixed / figures['decode step']:.2f}x a plain decode step)")  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
