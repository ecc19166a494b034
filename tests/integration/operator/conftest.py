"""Fixtures: the API emulator on a loopback port with our CRD, a kubeconfig for it, the operator as a process."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import kmock
import pytest
import yaml

# pytest runs with --import-mode=importlib, which puts no test folder on sys.path; the tests and the
# operator benchmark import the emulator and harness modules from here.
sys.path.insert(0, str(Path(__file__).parent))

from kube_emulator import Emulator
from operator_harness import CRD, OperatorProcess, write_kubeconfig


@pytest.fixture()
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator()
    async with emu, kmock.Server(emu):
        emu.register_crd(yaml.safe_load(CRD.read_text()))
        yield emu


@pytest.fixture()
def kubeconfig(emulator: Emulator, tmp_path: Path) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", str(emulator.url).rstrip("/"))  # type: ignore[no-any-return]


@pytest.fixture()
async def operator(kubeconfig: Path, tmp_path: Path) -> AsyncIterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, tmp_path / "operator.log")
    await op.start()
    try:
        yield op
    finally:
        await op.stop()
