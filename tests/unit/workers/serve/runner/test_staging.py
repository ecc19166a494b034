"""Host integers reach the device as int64, unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratus_workers.serve.runner import staging


def test_cpu_values_arrive_as_int64() -> None:
    out = staging.to_device([3, -1, 7], torch.device("cpu"))
    assert out.dtype == torch.int64 and out.tolist() == [3, -1, 7]
    grid = staging.to_device(np.arange(6, dtype=np.int32).reshape(2, 3), torch.device("cpu"))
    assert grid.shape == (2, 3) and grid.dtype == torch.int64 and grid.sum().item() == 15


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copies_queued_behind_long_work_arrive_intact() -> None:
    device = torch.device("cuda")
    big = torch.randn(4096, 4096, device=device)
    for _ in range(20):  # the copies below queue behind this
        big = big @ big / 64
    rng = np.random.default_rng(0)
    sent = [rng.integers(-(2**40), 2**40, size=int(rng.integers(1, 3000))) for _ in range(200)]
    got = [staging.to_device(values, device) for values in sent]
    torch.cuda.synchronize()
    for values, out in zip(sent, got, strict=True):
        assert out.device.type == "cuda" and out.cpu().numpy().tolist() == values.tolist()
