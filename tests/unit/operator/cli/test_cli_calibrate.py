"""`stratus calibrate` judges edge answers as the cascade it calibrates for (its probeTokens, windowTokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratus_operator.cli import build_parser
from stratus_operator.cli.calibrate import JudgedAnswer, manifest_cascade, samples_for
from stratus_workers.router.calibration import Sample

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[4]


def test_the_rule_comes_from_the_manifest(tmp_path: Path) -> None:
    assert manifest_cascade(ROOT / "deploy" / "samples" / "smollm2.yaml").get("probeTokens", 0) == 0
    manifest = tmp_path / "m.yaml"
    manifest.write_text("spec:\n  routing:\n    cascade:\n      probeTokens: 6\n      windowTokens: 8\n")
    assert manifest_cascade(manifest).get("probeTokens", 0) == 6
    assert manifest_cascade(manifest).get("windowTokens", 0) == 8
    manifest.write_text("spec: {}\n")
    assert manifest_cascade(manifest).get("windowTokens", 0) == 0


def test_a_negative_probe_is_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    # The target is unreachable: reaching it would fail differently (and slowly).
    args = build_parser().parse_args(["calibrate", "--target", "127.0.0.1:1", "--probe-tokens", "-2"])
    assert args.func(args) == 2
    assert "--probe-tokens is -2; use 0 (off) or more" in capsys.readouterr().out


def test_a_negative_window_is_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["calibrate", "--target", "127.0.0.1:1", "--window-tokens", "-1"])
    assert args.func(args) == 2
    assert "--window-tokens is -1; use 0 (off) or more" in capsys.readouterr().out


def test_one_set_of_answers_gives_each_rule_its_samples() -> None:
    """The edge's answers are collected once; each rule judges them its own way (the bench calibrates several)."""
    answers = [JudgedAnswer("a", (-3.0, -0.1, -0.1, -0.1), 0.9), JudgedAnswer("b", (), 1.0)]
    # The mean (an empty answer: certain), then the running mean's and the window's lowest, and the probe's.
    assert samples_for(answers) == [Sample("a", (-3.0 - 0.1 - 0.1 - 0.1) / 4, 0.9), Sample("b", 0.0, 1.0)]
    assert [s.confidence for s in samples_for(answers, running_mean=True)] == [-3.0, 0.0]  # the first token alone
    assert [s.confidence for s in samples_for(answers, window_tokens=2)] == [-3.1 / 2, 0.0]  # the first two
    assert [s.confidence for s in samples_for(answers, probe_tokens=1)] == [-3.0, 0.0]
