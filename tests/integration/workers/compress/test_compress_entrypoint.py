"""`python -m stratus_workers.compress` as a Job runs it: exit codes, last-line summary, termination log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EVALUATION = {
    "perplexitySamples": 2,
    "sequenceLength": 32,
    "speedTokens": 4,
    "agreementPrompts": 2,
    "agreementTokens": 4,
}


def _run(spec: dict[str, object], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = tmp_path / "artifact"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stratus_workers.compress",
            "--spec",
            str(spec_file),
            "--out",
            str(out),
            "--termination-log",
            str(tmp_path / "termination-log"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    return proc, out


def test_accepted_variant(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc, out = _run(
        {
            "name": "int8",
            "modelSource": str(tiny_model_dir),
            "evaluation": EVALUATION,
            "compression": {"quantization": {"method": "int8-weight"}},
        },
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "accepted" and summary["name"] == "int8"
    assert json.loads((tmp_path / "termination-log").read_text()) == summary
    assert json.loads((out / "manifest.json").read_text())["status"] == "accepted"
    # One structured log line per stage, with its duration.
    stages = [json.loads(line) for line in proc.stderr.splitlines() if '"stage finished"' in line]
    assert {s["stage"] for s in stages} >= {"load-model", "quantize", "save", "evaluate"}
    assert all(isinstance(s["seconds"], float | int) for s in stages)


def test_unknown_method_exits_non_zero_naming_the_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc, out = _run(
        {"name": "bad", "modelSource": str(tiny_model_dir), "compression": {"quantization": {"method": "int2-weight"}}},
        tmp_path,
    )
    assert proc.returncode == 2
    assert "compression.quantization.method" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "failed"
    assert not out.exists()
