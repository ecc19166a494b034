"""The router, the client and the protocol load without torch: checked in a fresh interpreter each."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("stratus_workers.router.__main__", ("torch",)),
        ("stratus_workers.client", ("torch",)),
        ("stratus_workers.protocol.servicer", ("torch", "transformers")),
        ("stratus_workers.protocol.requests", ("torch", "transformers")),
        ("stratus_workers.protocol.text", ("torch", "transformers")),
    ],
)
def test_module_loads_without(module: str, forbidden: tuple[str, ...]) -> None:
    code = (
        f"import sys, {module}\n"
        f"loaded = [m for m in {forbidden!r} if m in sys.modules]\n"
        f"assert not loaded, f'importing {module} loaded {{loaded}}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
