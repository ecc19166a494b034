"""deploy/images' build scripts as modules (they are scripts, not a package): the checks the image build runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

IMAGES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "images"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"images_{name}", IMAGES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load("build")
requirements = _load("requirements")
llama_features = _load("llama_features")
