"""Shared by the operator's unit tests: the helper modules here (samples, bad_manifests) importable by name."""

from __future__ import annotations

import sys
from pathlib import Path

# pytest imports test modules with --import-mode=importlib, which adds no folder to sys.path.
sys.path.insert(0, str(Path(__file__).parent))
