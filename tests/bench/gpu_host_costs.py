"""What a Verify round's small host calls cost the engine loop's thread on a GPU, with the device idle and busy.

A diagnosis, not a benchmark of record. `python tests/bench/gpu_host_costs.py` prints, for each call, the host µs
(perf_counter around the call, no synchronisation inside) as the median of 50 calls, once with the stream idle
and once behind 40 queued products of 4,096-square matrices (a few ms: a step running while the loop queues the
next): `to_device` of a packed pass's plan (5,000 int64) and of a verdict plan (2,200), a pinned copy into a
preallocated device buffer, and the LM head of the ~1B config over 1,088 positions (F.linear then .float(), and
the norm's eager ops).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stratus_workers.serve.runner.staging import to_device


def host_us(fn: Callable[[], Any], busy: Callable[[], None] | None, reps: int = 50) -> float:
    """Median host µs of `fn()`; `busy()` queues device work before each call."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        if busy is not None:
            busy()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)

    def busy() -> None:
        for _ in range(40):
            a @ a

    plan = np.arange(5000, dtype=np.int64)
    small = np.arange(2200, dtype=np.int64)
    pinned = torch.empty(5000, dtype=torch.long).pin_memory()
    target = torch.empty(5000, dtype=torch.long, device=dev)
    h = torch.randn(1088, 2048, device=dev, dtype=torch.bfloat16)
    head = torch.randn(49152, 2048, device=dev, dtype=torch.bfloat16)
    norm_w = torch.ones(2048, device=dev, dtype=torch.bfloat16)

    def norm() -> torch.Tensor:
        xf = h.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
        return norm_w * xf.to(h.dtype)

    calls: dict[str, Callable[[], Any]] = {
        "to_device 5,000 int64": lambda: to_device(plan, dev),
        "to_device 2,200 int64": lambda: to_device(small, dev),
        "np -> pinned slot -> device buffer": lambda: (
            np.copyto(pinned.numpy(), plan), target.copy_(pinned, non_blocking=True)
        ),
        "rms norm (eager, 1,088 x 2,048)": norm,
        "F.linear head 1,088 x 49,152": lambda: F.linear(h, head),
        "F.linear head + .float()": lambda: F.linear(h, head).float(),
        "F.linear head 1,000 rows (a new M)": lambda: F.linear(h[:1000], head),
    }
    for name, fn in calls.items():
        idle = host_us(fn, None)
        loaded = host_us(fn, busy)
        print(f"  {name:40s}: host {idle:8.1f} µs idle, {loaded:8.1f} µs behind queued work")


if __name__ == "__main__":
    main()
