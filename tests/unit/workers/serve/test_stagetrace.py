"""Stage timings: one JSON line per runner call with its marks, numbered in call order; nothing when off."""

from __future__ import annotations

import json
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


def test_a_bad_profile_window_says_what_it_expects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATUS_PP_PROFILE", "soon")
    with pytest.raises(ValueError, match="expected START:COUNT"):
        StageTrace(0, torch.device("cpu"), str(tmp_path))
