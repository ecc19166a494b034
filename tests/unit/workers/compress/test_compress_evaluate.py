"""Speed measurement: the clock tokens/s is read on, through the serving runner the Job measures with."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from stratus_workers.compress import evaluate
from stratus_workers.models.loader import load_model

pytestmark = pytest.mark.unit


def test_tokens_per_second_reads_the_given_clock(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    runner = evaluate.runner_for(loaded.model, rows=1, max_len=64)
    ticks = itertools.count()
    # Each decode reads the clock twice (start, end): a clock that advances 1 s per read makes every decode 1 s.
    speed = evaluate.tokens_per_second({"v": runner}, loaded.tokenizer, 8, rounds=2, clock=lambda: float(next(ticks)))
    assert speed["v"] == speed["v_median"] == 8.0
    assert next(ticks) == 2 * (1 + 2)  # the warm-up and two rounds, each timed on that clock

