"""Stage timings: one JSON line per runner call with its marks, numbered in call order; nothing when off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stratus_workers.serve.stagetrace import StageTrace

pytestmark = pytest.mark.unit


def test_each_call_is_one_line_with_its_marks_in_order(tmp_path: Path) -> None:
    trace = StageTrace(1, torch.device("cpu"), str(tmp_path))
    trace.begin("decode", 8)
    trace.set("groups", [4, 4])
    trace.mark("in0")
    trace.mark("computed0")
    trace.end()
    trace.begin("reset")
    trace.close()
    lines = [json.loads(line) for line in (tmp_path / "stage1.jsonl").read_text().splitlines()]
    assert [(r["r"], r["n"], r["m"], r["rows"]) for r in lines] == [(1, 0, "decode", 8), (1, 1, "reset", 0)]
    assert lines[0]["groups"] == [4, 4]
    marks = lines[0]["t"]
    assert list(marks) == ["begin", "in0", "computed0", "end"]
    assert marks["begin"] <= marks["in0"] <= marks["computed0"] <= marks["end"]
    assert "gpu" not in lines[0]  # device times only on CUDA


def test_off_without_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATUS_PP_TRACE", raising=False)
    trace = StageTrace(0, torch.device("cpu"))
    trace.begin("decode", 1)
    trace.mark("in0")
    trace.close()
    assert not trace.enabled and trace.calls == 0


class Counted(int):
    """A micro-batch number that counts how often it is put into a string."""

    formatted = 0

    def __format__(self, spec: str) -> str:
        Counted.formatted += 1
        return super().__format__(spec)


class Ranges(list[tuple[int, int, int]]):
    """Micro-batch row ranges that count how often they are read."""

    reads = 0

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        Ranges.reads += 1
        return super().__iter__()


def mark_a_step(trace: StageTrace) -> None:
    """What a stage's decode step queued ahead does with its trace (pipeline.PipelineRunner._launch)."""
    trace.begin("decode", 5)
    trace.groups(Ranges([(0, 4, 4), (4, 5, 4)]), tag="ahead_")
    for g in (Counted(0), Counted(1)):
        trace.mark("in", g, tag="ahead_")
        trace.mark("sent", g, tag="ahead_")
    trace.mark("waited", tag="ahead_")
    trace.end()


@pytest.mark.parametrize("on", [False, True])
def test_marks_are_put_together_only_while_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Off, a mark's name and a call's micro-batch sizes are never built (a stage marks every micro-batch of
    every step); on, the same calls record them under their full names."""
    monkeypatch.setattr(Counted, "formatted", 0)
    monkeypatch.setattr(Ranges, "reads", 0)
    trace = StageTrace(0, torch.device("cpu"), str(tmp_path) if on else "")
    mark_a_step(trace)
    trace.close()
    if not on:
        assert (Counted.formatted, Ranges.reads) == (0, 0)
        return
    assert Counted.formatted == 4 and Ranges.reads == 1
    (record,) = [json.loads(line) for line in (tmp_path / "stage0.jsonl").read_text().splitlines()]
    assert record["ahead_groups"] == [4, 1]
    assert list(record["t"]) == ["begin", "ahead_in0", "ahead_sent0", "ahead_in1", "ahead_sent1", "ahead_waited", "end"]


def test_a_bad_profile_window_says_what_it_expects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATUS_PP_PROFILE", "soon")
    with pytest.raises(ValueError, match="expected START:COUNT"):
        StageTrace(0, torch.device("cpu"), str(tmp_path))
