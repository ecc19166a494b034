"""Host integers to the device without waiting: the small arrays a step sends (token ids, rows, positions, lengths)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: np.ndarray | Sequence[int], device: torch.device) -> torch.Tensor:
    """`values` as int64 on `device`, the copy queued without the host waiting. A copy from pageable memory makes the
    host wait for the whole stream first, which keeps it from queueing the next kernels (a decode step running ahead;
    in a pipeline stage, a micro-batch behind the activations it is about to receive); pinned memory does not.

    (A ring of pinned slots reused behind events, instead of pinning each array, measured no different on an H200:
    64 sessions' Verify rounds at 3.05, 3.03, 3.17x cloud-only against 2.94, 3.17x, interleaved in one call.)"""
    host = torch.from_numpy(np.asarray(values, dtype=np.int64))
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
