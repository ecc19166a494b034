"""Where a packed verification pass's device time goes (CUDA): `forward_rows` over R rows of T new tokens each.

A diagnosis, not a benchmark of record. `python tests/bench/gpu_profile_verify.py [1b|135m] --rows 64 --context 320
--tokens 1,5,9,17` builds the runner a server would (fused, CUDA graphs), fills every row with `--context` random
tokens, then times the packed pass (the one a step of Verify calls runs: each row's pending token and its draft,
every position scored) at each T, rolling the rows back after each repetition, and prints device ms per pass and per
token beside a plain decode step of the same rows; then torch.profiler's heaviest kernels for the `--profile-tokens`
pass, run eagerly (a graph hides its kernels from the profiler). Random-init weights, bfloat16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M, TINY, random_llama
from stratus_workers.serve.runner.build import build_runner

ARCHS = {"1b": SMOLLM2_1B, "135m": SMOLLM2_135M, "tiny": TINY}


def timed(fn: Any, reps: int, after: Any) -> float:
    """Median device+host ms of `fn()` over `reps` (`after()` between, untimed)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        after()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", nargs="?", default="1b", choices=sorted(ARCHS))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=320)
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5, 9, 17])
    parser.add_argument("--profile-tokens", type=int, default=9)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = random_llama(ARCHS[args.arch]).to(device="cuda", dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    rows = list(range(args.rows))
    runner = build_runner(model, max_rows=args.rows, max_len=args.context + max(args.tokens) + 64)
    print(f"{args.arch} {type(runner).__name__}, {args.rows} rows of {args.context} tokens")
    with torch.inference_mode():
        for first in range(0, args.rows, 8):
            group = rows[first : first + 8]
            ctx = [torch.randint(3, vocab, (args.context,)).tolist() for _ in group]
            runner.forward_rows(group, ctx, [args.context - 1] * len(group))
        torch.cuda.synchronize()

        def back() -> None:
            runner.truncate_rows(rows, [args.context] * args.rows)

        def draft(t: int) -> list[list[int]]:
            return [torch.randint(3, vocab, (t,)).tolist() for _ in rows]

        for t in args.tokens:
            toks = draft(t)
            ms = timed(lambda: runner.forward_rows(rows, toks, [0] * args.rows), args.reps, back)  # noqa: B023
            print(f"  packed pass, {t:3d} tokens a row ({t * args.rows:5d} tokens): {ms:7.3f} ms, "
                  f"{ms / (t * args.rows) * 1e3:7.2f} µs a token")  # fmt: skip
        toks = draft(args.profile_tokens)
        # The graph's kernels are not all seen by the profiler: the breakdown is of the same pass run eagerly.
        os.environ["STRATUS_VERIFY_GRAPHS"] = "0"
        ms = timed(lambda: runner.forward_rows(rows, toks, [0] * args.rows), args.reps, back)
        print(f"  eagerly (no graph), {args.profile_tokens} tokens a row: {ms:7.3f} ms; its kernels:")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                runner.forward_rows(rows, toks, [0] * args.rows)
                torch.cuda.synchronize()
                back()
        table: Any = prof.key_averages()
        print(table.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
