"""Whether a Triton matrix-vector product beats cuBLAS for the decode step's batch-1 shapes (CUDA).

A diagnosis, not a benchmark of record: `python tests/bench/gpu_gemv.py` times `F.linear` at one row against a
Triton GEMV swept over block shapes, for the ~1B config's projections and head and the 135M config's, each
20 launches in a CUDA graph. docs/bench-data/gpu-2026-11-30/gemv-09ee46d.txt is its output on an H200.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {
    "qkv": (6144, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192), "head": (49152, 2048),
    "135m qkv": (960, 576), "135m gate_up": (3072, 576), "135m down": (576, 1536),
}  # fmt: skip


@triton.jit  # type: ignore[misc]
def _gemv(x_ptr, w_ptr, y_ptr, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # type: ignore[no-untyped-def]
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + k).to(tl.float32)
        acc += tl.sum(tl.load(w_ptr + n[:, None] * K + k[None, :]).to(tl.float32) * x[None, :], axis=1)
    tl.store(y_ptr + n, acc.to(y_ptr.dtype.element_ty))


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, warps: int) -> torch.Tensor:
    n, k = w.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv[(n // block_n,)](x, w, y, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=2)
    return y


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


def main() -> None:
    results = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x, w).float()
        cublas = graph_us(lambda w=w, x=x: F.linear(x, w))
        best: tuple[float, tuple[int, int, int]] | None = None
        for block_n, block_k, warps in itertools.product((8, 16, 32, 64), (256, 512), (4, 8)):
            if n % block_n or k % block_k:
                continue
            if (gemv(x, w, block_n, block_k, warps).float() - want).abs().max() > 0.05:
                raise AssertionError(f"{name}: the GEMV's answer differs at {(block_n, block_k, warps)}")
            us = graph_us(lambda w=w, x=x, b=block_n, bk=block_k, wp=warps: gemv(x, w, b, bk, wp))
            if best is None or us < best[0]:
                best = (us, (block_n, block_k, warps))
        assert best is not None
        gb = n * k * 2 / 1e9
        print(f"{name:14s} N={n:6d} K={k:5d}: cuBLAS {cublas:6.2f} us ({gb / cublas * 1e3:5.2f} TB/s)  "
              f"triton best {best[0]:6.2f} us ({gb / best[0] * 1e3:5.2f} TB/s) at {best[1]}")  # fmt: skip
        results[name] = {"cublas_us": cublas, "triton_us": best[0], "config": best[1]}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
