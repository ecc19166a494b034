"""A decode step of rows sharing a long prefix (CUDA): read once for all rows (cascade) against once a row.

A diagnosis, not a benchmark of record. `python tests/bench/gpu_cascade_step.py [135m|1b] --rows 64 --prefix 3000
--own 100` builds the runner a server would (fused, CUDA graphs, a prefix pool), prefills one row with `--prefix`
random tokens and saves them to the pool, loads every row from the pool (as prefix-cache hits do), gives each row
`--own` tokens of its own, then times the captured decode step of all rows with the cascade graph and with the plain
one (every row reading its own copy, filled in for it), interleaved, and compares their logits. Random-init weights,
bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M, random_llama
from stratus_workers.serve.prefix import PrefixCache
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import FusedRunner

ARCHS = {"1b": SMOLLM2_1B, "135m": SMOLLM2_135M}
BLOCK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", nargs="?", default="135m", choices=sorted(ARCHS))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=3000)
    parser.add_argument("--own", type=int, default=100)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = random_llama(ARCHS[args.arch]).to(device="cuda", dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    max_len = args.prefix + args.own + 2 * args.reps + 64
    runner = build_runner(model, max_rows=args.rows, max_len=max_len, pool_tokens=args.prefix + 2 * BLOCK)
    assert isinstance(runner, FusedRunner) and runner.cache.cascade, "needs the fused CUDA path with its cascade"
    runner.warmup(max_kv_len=max_len)
    prefix = PrefixCache(BLOCK, (args.prefix + 2 * BLOCK) // BLOCK)
    system = torch.randint(3, vocab, (args.prefix + 1,)).tolist()
    rows = list(range(args.rows))
    with torch.inference_mode():
        runner.forward_rows([0], [system], [len(system) - 1])
        stored = prefix.insert(system)
        runner.save_prefix(0, stored.positions, stored.slots, BLOCK)
        for row in rows:
            runner.reset(row)
            slots, ids, _ = prefix.lookup(system)
            runner.load_prefix(row, slots, BLOCK, ids)
        for first in range(0, args.rows, 8):
            group = rows[first : first + 8]
            own = [torch.randint(3, vocab, (args.own,)).tolist() for _ in group]
            runner.forward_rows(group, own, [args.own - 1] * len(group))
        cache, decoder = runner.cache, runner.decoder
        # Rows that load the shared prefix do not hold it (runner/cache.py); the plain step reads only rows: fill them,
        # so that both steps read the same keys (the cascade's still from the prefix).
        cache.fill(rows)
        shared = cache.shared[: args.rows]
        print(f"{args.arch}: {args.rows} rows, {shared[0]} shared tokens each (pool blocks of {BLOCK}), "
              f"{args.own} of their own; cache {cache.bytes() / 2**30:.1f} GiB")  # fmt: skip
        bucket, kv_len = decoder.buckets(args.rows, max(cache.lengths[: args.rows]) + 1)
        graphs = {name: decoder.graph(bucket, kv_len, on) for name, on in (("plain", False), ("cascade", True))}
        times: dict[str, list[float]] = {"plain": [], "cascade": []}
        chosen: dict[str, list[int]] = {}
        logits: dict[str, torch.Tensor] = {}
        for rep in range(args.reps):
            for name, graph in graphs.items():
                assert graph is not None
                decoder.tokens[: args.rows].fill_(5 + rep)
                torch.cuda.synchronize()
                start = time.perf_counter()
                graph[0].replay()
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) * 1e3)
                if rep == 0:
                    chosen[name] = decoder.tokens[: args.rows].tolist()
                    logits[name] = graph[1][: args.rows].float().clone()
            # Both wrote this step's key at each row's length: the next repetition reads one more key.
            cache.advance(args.rows)
    plain, cascade = statistics.median(times["plain"]), statistics.median(times["cascade"])
    # Where the argmax differs, by how little: bfloat16 rounding of the attention's output (a different order of
    # sums) against the gap between the two best logits of a random-init model.
    top = logits["plain"].topk(2, dim=-1).values
    gap = (top[:, 0] - top[:, 1]).tolist()
    diff = (logits["plain"] - logits["cascade"]).abs().max(dim=-1).values.tolist()
    differ = [r for r in range(args.rows) if chosen["plain"][r] != chosen["cascade"][r]]
    print(f"logits: max |plain - cascade| {max(diff):.4f} (median {statistics.median(diff):.4f}); rows whose argmax "
          f"differs: {[(r, round(gap[r], 4)) for r in differ]} (row, plain's top-two gap)")
    same = sum(a == b for a, b in zip(chosen["plain"], chosen["cascade"], strict=True))
    print(f"| decode step, {args.rows} rows | plain (own copies) ms | cascade ms | plain / cascade | same argmax |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| {args.arch}, prefix {shared[0]}, own ~{args.own} | {plain:.3f} | {cascade:.3f} | "
          f"{plain / cascade:.2f}x | {same}/{args.rows} |")  # fmt: skip


if __name__ == "__main__":
    main()
