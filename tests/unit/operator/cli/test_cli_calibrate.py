"""`stratus calibrate` judges edge answers as the cascade it calibrates for (its probeTokens, windowTokens)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from stratus_operator.cli import build_parser
from stratus_operator.cli.calibrate import JudgedAnswer, cascade_rule, manifest_cascade, samples_for
from stratus_workers.router.calibration import Sample
from stratus_workers.router.config import RouterConfig

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


def calibrate_args(manifest: Path, *flags: str) -> argparse.Namespace:
    """`stratus calibrate`'s arguments for `manifest`, with an unreachable target: reaching it would fail
    differently (and slowly)."""
    return build_parser().parse_args(["calibrate", "--target", "127.0.0.1:1", "-f", str(manifest), *flags])


def cascade_manifest(tmp_path: Path, settings: str) -> Path:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("spec:\n  routing:\n    cascade:\n      " + settings + "\n")
    return manifest


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("windowTokens: 5000", "windowTokens: 5000 in {}: Input should be less than or equal to 4096"),
        ("probeTokens: -3", "probeTokens: -3 in {}: Input should be greater than or equal to 0"),
        ("windowToken: 8", "windowToken: 8 in {}: Extra inputs are not permitted"),
    ],
)
def test_a_manifest_rule_the_router_refuses_is_refused_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, problem: str
) -> None:
    """The manifest's value is blamed, not the flag it did not come from, with how to fix it."""
    manifest = cascade_manifest(tmp_path, setting)
    args = calibrate_args(manifest)
    assert args.func(args) == 2
    out = capsys.readouterr().out
    assert "error: the cascade rule is not one the router accepts:" in out
    assert "spec.routing.cascade." + problem.format(manifest) in out
    fix = "remove it or correct its name (the settings: " if "Extra" in problem else "fix it there or give --"
    assert fix in out and " is -3; use 0" not in out


def test_a_flag_the_router_refuses_is_blamed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = calibrate_args(cascade_manifest(tmp_path, "windowTokens: 8"), "--window-tokens", "5000")
    assert args.func(args) == 2
    assert "--window-tokens 5000: Input should be less than or equal to 4096" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "running"), [('"false"', False), ('"true"', True), ("off", False), ("true", True)])
def test_the_manifest_rule_reads_as_the_router_reads_it(tmp_path: Path, text: str, running: bool) -> None:
    """A quoted "false" is False, as the router takes it (bool() of the string would be True)."""
    manifest = cascade_manifest(tmp_path, f"runningMean: {text}")
    routed = RouterConfig.model_validate({"routing": {"cascade": manifest_cascade(manifest)}}).routing.cascade
    assert cascade_rule(calibrate_args(manifest)) == routed
    assert routed.running_mean is running


def test_a_flag_overrides_the_manifest(tmp_path: Path) -> None:
    manifest = cascade_manifest(tmp_path, "{windowTokens: 5000, probeTokens: 6, runningMean: true}")
    rule = cascade_rule(calibrate_args(manifest, "--window-tokens", "8", "--no-running-mean"))
    # The manifest's windowTokens (one the router refuses) is not the one judged by; its probeTokens stays.
    assert (rule.window_tokens, rule.probe_tokens, rule.running_mean) == (8, 6, False)
    assert cascade_rule(calibrate_args(manifest, "--window-tokens", "0", "--probe-tokens", "0")).running_mean


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- a list\n", "the manifest in {} is a list, not a mapping"),
        ("spec:\n  routing: [1, 2]\n", "spec.routing in {} is a list, not a mapping"),
        ("spec:\n  routing:\n    cascade: 3\n", "spec.routing.cascade in {} is a int, not a mapping"),
        ("spec: {routing: [\n", "cannot read the manifest {}"),
    ],
)
def test_a_manifest_that_is_no_llmdeployment_is_refused_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(text)
    args = calibrate_args(manifest)
    assert args.func(args) == 2
    assert problem.format(manifest) in capsys.readouterr().out


def test_a_threshold_the_router_refuses_does_not_stop_calibrating(tmp_path: Path) -> None:
    # The threshold is what calibrating replaces; the rule is read from the rest.
    manifest = cascade_manifest(tmp_path, "confidenceThreshold: 0.5\n      windowTokens: 8")
    assert cascade_rule(calibrate_args(manifest)).window_tokens == 8
