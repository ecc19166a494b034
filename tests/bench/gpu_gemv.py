"""The fused small-batch decode layer on a GPU: its kernels' block sizes swept, and the decode step with it on and off.

A diagnosis, not a benchmark of record. On a GPU, `python tests/bench/gpu_gemv.py [--no-sweep | --sweep-only]
[--batch N] [1b] [135m]` prints, for each config (random-init weights in bfloat16):

- a sweep of serve/gemv.py's kernels over their launch shapes (weight rows a program, columns a step, warps) at
  the config's shapes: q|k|v with norm, rotary and the cache write; o; gate|up with norm and SiLU; down; each the
  mean of 20 launches in a CUDA graph, against the torch step's functions run eagerly (cuBLAS's F.linear for o and
  down) and the block rule's pick;
- the runner's decode step at batch N (1): kernels per step (torch.profiler over the step body, run eagerly), GPU µs
  per step (its CUDA graph replayed), µs per step of a greedy decode loop (decode-ahead, as the server runs it)
  and the greedy tokens, with the fused layer on and then off (`gemv_layer`, what STRATUS_GEMV_LAYER=0 sets);
- with `--variants`, only the decode step's graph replay and greedy tokens under each of VARIANTS (the launch rule
  changed) and SWAPS (cuBLAS in place of the plain GEMV), the rule's first and last (about a minute a config).

Under three minutes on an H200 for both configs. Its forerunner (a plain GEMV against cuBLAS) made
docs/bench-data/gpu-2026-11-30/gemv-09ee46d.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M, random_llama
from stratus_workers.serve import gemv
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import _mlp_in, _qkv_rope

ARCHS = {"1b": SMOLLM2_1B, "135m": SMOLLM2_135M}
EPS = 1e-5
DEVICE = "cuda"


def graph_us(fn: Callable[[], Any], launches: int = 200) -> float:
    """µs per call of `fn`, replayed 20 to a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches // 20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / launches * 1000


def shapes(shape: dict[str, Any], batch: int) -> dict[str, Any]:
    """One layer's tensors at the config's shapes (random, bfloat16, on the GPU)."""
    dev, dt = DEVICE, torch.bfloat16
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    n_q, n_kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = hidden // n_q

    def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, device=dev) * scale).to(dt)

    angles = torch.arange(1200, device=dev)[:, None].float() * torch.rand(d // 2, device=dev)[None, :]
    angles = torch.cat([angles, angles], -1)
    return dict(
        n_q=n_q, n_kv=n_kv, d=d, hidden=hidden, inter=inter,
        h=rand(batch, hidden), delta=rand(batch, hidden), norm_w=rand(hidden, scale=0.1) + 1,
        qkv=rand((n_q + 2 * n_kv) * d, hidden, scale=0.02), o=rand(hidden, n_q * d, scale=0.02),
        gate_up=rand(2 * inter, hidden, scale=0.02), down=rand(hidden, inter, scale=0.02),
        cos=angles.cos().to(dt), sin=angles.sin().to(dt),
        k_cache=rand(8, n_kv, 1200, d), v_cache=rand(8, n_kv, 1200, d),
        pos=torch.arange(batch, device=dev) * 7 + 100, rows=torch.arange(batch, device=dev),
        attn=rand(batch, n_q * d), act=rand(batch, inter),
    )  # fmt: skip


def kernel_calls(t: dict[str, Any]) -> dict[str, tuple[Callable[[gemv.Blocks], Any], Callable[[], Any], int, int]]:
    """Each kernel: (call with a launch shape, the torch step's same work, its output rows, its columns)."""

    def qkv(b: gemv.Blocks) -> Any:
        return gemv.norm_qkv_rope(
            t["h"], t["delta"], t["norm_w"], EPS, t["qkv"], None, t["cos"], t["sin"], t["pos"], t["rows"],
            t["k_cache"], t["v_cache"], t["n_q"], b,
        )  # fmt: skip

    def qkv_torch() -> Any:
        cos, sin = t["cos"][t["pos"]], t["sin"][t["pos"]]
        return _qkv_rope(t["h"], t["delta"], t["norm_w"], EPS, t["qkv"], None, cos, sin, t["n_q"], t["n_kv"], t["d"])

    return {
        "qkv": (qkv, qkv_torch, t["qkv"].shape[0], t["hidden"]),
        "o": (lambda b: gemv.gemv(t["attn"], t["o"], b), lambda: F.linear(t["attn"], t["o"]), t["hidden"], t["hidden"]),
        "gate_up": (
            lambda b: gemv.norm_gate_up(t["h"], t["delta"], t["norm_w"], EPS, t["gate_up"], b),
            lambda: _mlp_in(t["h"], t["delta"], None, t["norm_w"], EPS, t["gate_up"], None),
            t["inter"], t["hidden"],
        ),
        "down": (lambda b: gemv.gemv(t["act"], t["down"], b), lambda: F.linear(t["act"], t["down"]), t["hidden"],
                 t["inter"]),
    }  # fmt: skip


def candidates(kind: str, n_out: int, k_in: int, head_dim: int) -> list[gemv.Blocks]:
    """Launch shapes to time: weight rows a program (per half for the paired kernels), columns a step, warps (4 and
    8 for the plain GEMV, 4 for the paired kernels, which won the forerunner's sweep for q|k|v and gate|up, and the
    rule's `warps_for`)."""
    rows = (2, 4, 8) if kind != "plain" else (2, 4, 8, 16)
    cols = (256, 512) if k_in >= 1024 else (128, 256, 512)
    halves = 1 if kind == "plain" else 2
    out = []
    for n, k in itertools.product(rows, cols):
        if kind == "qkv" and (head_dim // 2) % n:
            continue
        for w in sorted(({4, 8} if kind == "plain" else {4}) | {gemv.warps_for(kind, n * halves, k, n_out)}):
            out.append(gemv.Blocks(n, k, w))
    return out


def sweep(name: str, batch: int) -> dict[str, Any]:
    t = shapes(ARCHS[name], batch)
    results: dict[str, Any] = {}
    for kernel, (call, torch_fn, n_out, k_in) in kernel_calls(t).items():
        kind = {"qkv": "qkv", "gate_up": "gate_up"}.get(kernel, "plain")
        rule = gemv.blocks_for(kind, n_out, k_in, batch, t["d"])
        want = torch_fn()
        torch_us = graph_us(torch_fn)
        timings = []
        for blocks in dict.fromkeys([rule, *candidates(kind, n_out, k_in, t["d"])]):
            got = call(blocks)
            # The outputs both give (the kernel's residual and q; the torch step also returns k and v).
            for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):  # noqa: B905
                err = float((g.float() - w.float()).abs().max())
                if err > 0.1:
                    raise AssertionError(f"{name} {kernel} at {blocks}: differs from torch by {err}")
            timings.append((graph_us(lambda b=blocks, c=call: c(b)), blocks))
        timings.sort(key=lambda x: x[0])
        rule_us = next(us for us, b in timings if b == rule)
        best_us, best = timings[0]
        print(f"  {kernel:8s} N={n_out:6d} K={k_in:5d}: torch eager {torch_us:6.2f} us, rule {rule_us:6.2f} us "
              f"({rule.n},{rule.k},{rule.warps}), best {best_us:6.2f} us ({best.n},{best.k},{best.warps}); "
              "next: " + ", ".join(f"{us:.2f} ({b.n},{b.k},{b.warps})" for us, b in timings[1:4]))  # fmt: skip
        results[kernel] = {
            "torch_us": torch_us, "rule_us": rule_us, "rule": [rule.n, rule.k, rule.warps],
            "all": [[us, b.n, b.k, b.warps] for us, b in timings],
        }  # fmt: skip
    return results


def step_kernels(runner: Any, batch: int) -> tuple[int, float, list[tuple[str, int, float]]]:
    """Kernels and GPU ms of one decode step body, run eagerly (what the step's graph captures), and the kernels
    that took most of it: (name, launches, µs) per step, the longest first."""
    tokens = runner.decoder.tokens
    body = runner.decode_body
    kv_len = runner.decoder.buckets(batch, 65)[1]  # the graph the replay and the loop time (short rows: no splits)
    for _ in range(2):
        body(tokens, batch, kv_len)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            body(tokens, batch, kv_len)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e.device_time_total)
    top = sorted(((name[:60], len(t) // 5, sum(t) / 5) for name, t in by_name.items()), key=lambda x: -x[2])[:6]
    return round(len(events) / 5), sum(e.device_time_total for e in events) / 5 / 1000, top


def decode_runs(name: str, batch: int) -> dict[str, Any]:
    torch._dynamo.reset()  # a second model's step functions are new code to the compiler, not recompiles
    model = random_llama(dict(ARCHS[name]), seed=0).to("cuda", torch.bfloat16).eval()
    start = time.perf_counter()
    runner = build_runner(model, max_rows=8, max_len=1200)
    print(f"  built in {time.perf_counter() - start:.1f}s; fused layer {'on' if runner.gemv_layer else 'OFF'}")
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for mode in ("on", "off") if runner.gemv_layer else ("off",):
            runner.gemv_layer = mode == "on"  # what STRATUS_GEMV_LAYER=0 leaves off from the start
            runner.gemv_max_batch = gemv.MAX_BATCH  # the layer at the asked batch (the server runs it at one row)
            runner.decoder.graphs.graphs.clear()
            runner.gemv_batches.clear()
            for row in range(batch):
                runner.truncate(row, 0)
            first = runner.forward(0, [[3 + row] * 64 for row in range(batch)]).argmax(-1).tolist()
            start = time.perf_counter()
            graph, _ = runner.decoder.graph(*runner.decoder.buckets(batch, 65))
            capture_s = time.perf_counter() - start
            replay_us = _replay_us(graph)
            tokens, ids = [], first
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(128):
                ids = runner.decode(ids).greedy
                tokens.append(ids)
            loop_us = (time.perf_counter() - start) / 128 * 1e6
            kernels, kernel_ms, top = step_kernels(runner, batch)
            out[mode] = {
                "kernels_per_step": kernels, "kernel_ms": kernel_ms, "top_kernels": top, "graph_replay_us": replay_us,
                "greedy_loop_us": loop_us, "capture_s": capture_s, "fused_batches": sorted(runner.gemv_batches),
                "tokens": [t[0] for t in tokens],
            }  # fmt: skip
            print(f"  fused layer {mode:3s}: {kernels} kernels/step ({kernel_ms:.3f} ms of kernels, eager), graph "
                  f"replay {replay_us:.1f} us/step, greedy loop {loop_us:.1f} us/step ({1e6 / loop_us:.0f} tok/s a "
                  f"stream), fused batches {sorted(runner.gemv_batches)}")  # fmt: skip
            for name, launches, us in top:
                print(f"    {us:9.1f} us  {launches:3d}x  {name}")
    if "on" not in out:
        return out
    same = sum(a == b for a, b in zip(out["on"]["tokens"], out["off"]["tokens"], strict=True))
    pairs = zip(out["on"]["tokens"], out["off"]["tokens"], strict=True)
    first_diff = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    print(f"  greedy tokens on vs off: {same}/128 equal, first difference at {first_diff}")
    out["tokens_equal"] = same
    return out


# Launch-rule variants the decode step is timed with (`--variants`): each maps the rule's Blocks (for a kernel kind
# and input length) to another. The kernel sweep times one kernel over and over on the same weights, which then sit
# in the GPU's L2 (an H200's 50 MB holds the ~1B config's q|k|v, o and down matrices); in a decode step each layer's
# weights are new, so only the whole step's replay judges a rule. (Session 10's first run also timed 3 to 5 stages,
# 8 warps, 256 columns a step, 2+2 gate|up rows and 16 plain rows: none beat the rule; docs/bench-data. Session
# 11's rounds for the ~1B config, which found today's rule at inputs of 2,048 and more: docs/benchmarks.md.)
Change = Callable[[str, int, gemv.Blocks], gemv.Blocks]


def _with(**per_kind: dict[str, int]) -> Change:
    """A launch-rule change at inputs of 2,048 and more: per kind ("qkv", "gate_up", "plain"), Blocks fields."""
    return lambda kind, k_in, b: dataclasses.replace(b, **per_kind[kind]) if kind in per_kind and k_in >= 2048 else b


VARIANTS: dict[str, Change] = {
    "rule": lambda kind, k_in, b: b,
    # The rule before session 10 (512, 256 or 128 columns a step, whichever pads least) where it now takes 1,024.
    "before: k <= 512": lambda kind, k_in, b: (
        dataclasses.replace(b, k=min((512, 256, 128), key=lambda c: (-(-k_in // c) * c, -c))) if b.k == 1024 else b
    ),
    "before, q|k|v wide too": lambda kind, k_in, b: (
        b if kind == "qkv" else VARIANTS["before: k <= 512"](kind, k_in, b)
    ),
    # The rule before session 11 at inputs of 2,048 and more, at one row (the ~1B config's).
    "before: session 10 at >= 2,048": _with(
        qkv={"k": 512}, gate_up={"warps": 4}, plain={"n": 8, "k": 512, "warps": 4}
    ),
    "stages 3": lambda kind, k_in, b: dataclasses.replace(b, stages=3),
    # Session 11's neighbours of the rule at one row of the ~1B config (each within 1.5% of it, or slower).
    "q|k|v 2048 columns": _with(qkv={"k": 2048}),
    "gate|up 1 warp": _with(gate_up={"warps": 1}),
    "gate|up 1024 columns": _with(gate_up={"k": 1024}),
    "plain 1 row": _with(plain={"n": 1}),
    "plain 4 rows": _with(plain={"n": 4}),
    "plain 4 warps": _with(plain={"warps": 4}),
}

# The plain GEMV swapped for cuBLAS's (F.linear) inside the fused layer where `swap(w)` says so: label -> swap. (Down
# is the non-square one: o is square in both configs.)
SWAPS: dict[str, Callable[[torch.Tensor], bool]] = {
    "cuBLAS down": lambda w: w.shape[1] != w.shape[0],
    "cuBLAS o and down": lambda w: True,
}


def variant_runs(name: str, batch: int) -> dict[str, Any]:
    """The decode step's graph replay (and its greedy tokens, which every variant must keep) under each of
    VARIANTS, one model, the rule's run first and last (the machine's drift)."""
    model = random_llama(dict(ARCHS[name]), seed=0).to("cuda", torch.bfloat16).eval()
    runner = build_runner(model, max_rows=8, max_len=1200)
    rule, own_gemv = gemv.blocks_for, gemv.gemv
    out: dict[str, Any] = {}
    try:
        with torch.inference_mode():
            for label in [*VARIANTS, *SWAPS, "rule"]:
                swap, change = SWAPS.get(label), VARIANTS.get(label, VARIANTS["rule"])
                gemv.blocks_for = lambda kind, *a, _c=change, **k: _c(kind, a[1], rule(kind, *a, **k))  # type: ignore[misc]
                gemv.gemv = (  # type: ignore[assignment]
                    own_gemv if swap is None
                    else lambda x, w, blocks=None, _s=swap: F.linear(x, w) if _s(w) else own_gemv(x, w, blocks)
                )
                runner.gemv_max_batch = gemv.MAX_BATCH
                runner.decoder.graphs.graphs.clear()
                for row in range(batch):
                    runner.truncate(row, 0)
                ids = runner.forward(0, [[3 + row] * 64 for row in range(batch)]).argmax(-1).tolist()
                try:
                    graph, _ = runner.decoder.graph(*runner.decoder.buckets(batch, 65))
                except Exception as exc:  # a shape the compiler refuses
                    print(f"  {label:28s}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                replay = min(_replay_us(graph) for _ in range(3))
                tokens = []
                for _ in range(32):
                    ids = runner.decode(ids).greedy
                    tokens.append(ids[0])
                key = label if label not in out else f"{label} (again)"
                out[key] = {"replay_us": replay, "tokens": tokens}
                same = tokens == out["rule"]["tokens"]
                print(f"  {key:28s}: graph replay {replay:7.1f} us/step; greedy tokens as the rule's: {same}")
    finally:
        gemv.blocks_for, gemv.gemv = rule, own_gemv  # type: ignore[assignment]
    return out


def _replay_us(graph: torch.cuda.CUDAGraph, replays: int = 200) -> float:
    """GPU µs per replay of a captured decode step (the same inputs each time)."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["1b", "135m"], choices=sorted(ARCHS))
    parser.add_argument("--no-sweep", action="store_true", help="only the decode step on and off")
    parser.add_argument("--sweep-only", action="store_true", help="only the kernels' launch shapes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", action="store_true", help="only the decode step under each of VARIANTS")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # two models' step functions in one process
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name in args.configs:
        print(f"{name} (batch {args.batch}):")
        if args.variants:
            results[f"{name} variants"] = variant_runs(name, args.batch)
            continue
        if not args.no_sweep:
            results[f"{name} sweep"] = sweep(name, args.batch)
            print(f"  [{time.perf_counter() - t0:.0f}s]")
        if not args.sweep_only:
            results[f"{name} decode"] = decode_runs(name, args.batch)
            print(f"  [{time.perf_counter() - t0:.0f}s]")
        torch.cuda.empty_cache()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
