"""The decode step's matrix products on a GPU: cuBLAS (what the runner calls) against inductor's autotuned choice.

A diagnosis, not a benchmark of record. `python tests/bench/gpu_gemm_sweep.py [1b|135m] --rows 64 128` times, for
each of the config's products (q|k|v, o, gate|up, down, the head) at each row count, a CUDA graph of one product a
layer over `layers` distinct weights (so no weight stays in L2 between layers, as in a real step) run through
`F.linear` (cuBLAS) and through `torch.compile(mode="max-autotune-no-cudagraphs")` of the same call (inductor
benchmarks Triton matmul templates beside cuBLAS and keeps the fastest); µs a layer and the memory speed the
weights were read at. Random-init weights, bfloat16.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from gpu_layer_parts import ARCHS, graph_ms


def compare(n: int, k: int, count: int, rows: int, dev: torch.device, dt: torch.dtype) -> tuple[float, float, float]:
    """µs a product of [rows, k] by `count` distinct [n, k] weights takes through cuBLAS and autotuned, and the
    largest difference between their outputs."""
    weights = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(count)]
    x = torch.randn(rows, k, device=dev, dtype=dt)
    outs: list[torch.Tensor] = []
    tuned_fn = torch.compile(lambda a, w: F.linear(a, w), mode="max-autotune-no-cudagraphs", dynamic=False)
    tuned_fn(x, weights[0])  # autotune once: every weight has the same shape

    def plain() -> None:
        outs[:] = [F.linear(x, w) for w in weights]

    def tuned() -> None:
        outs[:] = [tuned_fn(x, w) for w in weights]

    err = (tuned_fn(x, weights[0]).float() - F.linear(x, weights[0]).float()).abs().max().item()
    result = graph_ms(plain, 1) * 1000 / count, graph_ms(tuned, 1) * 1000 / count, err
    weights.clear()
    outs.clear()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", nargs="?", default="1b", choices=sorted(ARCHS))
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    cfg = ARCHS[args.arch]
    dev, dt = torch.device("cuda"), torch.bfloat16
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    n_q, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = hidden // n_q
    shapes = {
        "qkv": ((n_q + 2 * n_kv) * d, hidden, layers),
        "o": (hidden, n_q * d, layers),
        "gate|up": (2 * inter, hidden, layers),
        "down": (hidden, inter, layers),
        "head": (49152, hidden, 1),
    }
    print(f"{args.arch} on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| product | rows | cuBLAS µs a layer | TB/s | autotuned µs | TB/s | autotuned / cuBLAS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    totals = {"cublas": 0.0, "tuned": 0.0}
    for rows in args.rows:
        for name, (n, k, count) in shapes.items():
            a, b, err = compare(n, k, count, rows, dev, dt)
            gb = n * k * 2 / 1e9
            scale = layers if count > 1 else 1
            totals["cublas"] += a * scale
            totals["tuned"] += b * scale
            print(
                f"| {name} | {rows} | {a:.1f} | {gb / a * 1e3:.2f} | {b:.1f} | {gb / b * 1e3:.2f} | {b / a:.2f} "
                f"(max |diff| {err:.3g}) |",
                flush=True,
            )
    print(f"step totals over {args.rows}: cuBLAS {totals['cublas']:.0f} µs, autotuned {totals['tuned']:.0f} µs")


if __name__ == "__main__":
    main()
