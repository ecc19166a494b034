"""Fixtures for the harness's own tests: an emulator in-process (no HTTP), and one served on loopback."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import kmock
import pytest
import yaml
from kube_emulator import Emulator
from operator_harness import CRD

# The object builders these tests share (harness_objects.py) are imported by name from here.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture()
async def emu() -> AsyncIterator[Emulator]:
    """The emulator with the LLMDeployment CRD registered, called directly (as tests acting as controllers do)."""
    emulator = Emulator()
    emulator.register_crd(yaml.safe_load(CRD.read_text()))
    yield emulator


@pytest.fixture()
async def served() -> AsyncIterator[Emulator]:
    """The emulator on a loopback port, for what only shows over HTTP (Status bodies, headers, RBAC, apply)."""
    emulator = Emulator()
    async with emulator, kmock.Server(emulator):
        emulator.register_crd(yaml.safe_load(CRD.read_text()))
        yield emulator
