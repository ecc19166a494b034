"""The committed generated code matches what `make protos` would write from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]


def test_generated_code_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_generated_files_carry_do_not_edit_header() -> None:
    for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
        head = "\n".join((ROOT / "workers" / "stratus_workers" / "api" / name).read_text().splitlines()[:3])
        assert "DO NOT EDIT" in head
