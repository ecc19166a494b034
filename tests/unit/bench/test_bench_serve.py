"""bench_serve's report: each model's goals come from that model's rows."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.unit

META = dict(kind="gpu", device="H200", cpu="16 cores", torch="2", transformers="5", date="2026-12-01 18:00 UTC")
SETTINGS: dict[str, Any] = dict(prompt_tokens=64, new_tokens=128, rounds=3, client_procs=4, stagger_ms=2.0,
                                shared_system_tokens=3000, shared_turn_tokens=24, label=None, baselines=[])


def shared_row(model: str, cache: str, ttft: float) -> dict[str, Any]:
    return dict(model=model, concurrency=64, system=f"shared prefix, prefix cache {cache}", tokens_per_s=1000.0,
                ttft_p50_ms=ttft, ttft_p95_ms=2 * ttft, itl_p50_ms=1.0, server_ttft_p50_ms=ttft - 1,
                server_ttft_p95_ms=2 * ttft, queue_p50_ms=1.0, queue_p95_ms=2.0)


def test_a_run_of_two_models_gives_each_its_own_shared_prefix_ratio() -> None:
    import bench_serve

    rows = [shared_row("135m", "on", 10.0), shared_row("135m", "off", 40.0),
            shared_row("1b", "on", 10.0), shared_row("1b", "off", 80.0)]  # fmt: skip
    _, section = bench_serve.render([dict(meta=META, settings=SETTINGS, rows=rows)])
    assert "- 135m shared prefix: TTFT p50 without the cache over with it: 4.00× (goal ≥ 5×; missed" in section
    assert "- 1b shared prefix: TTFT p50 without the cache over with it: 8.00× (goal ≥ 5×; met)" in section
