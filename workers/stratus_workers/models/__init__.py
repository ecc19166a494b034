"""Model sources and loading: the bundled SmolLM2, local directories and compressed artifacts.

Importing the package loads nothing heavy: each name below is imported from its module on first use, so
`stratus_workers.models.source` (what the operator needs) never drags torch in with the loader.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stratus_workers.models.loader import (
        LoadedModel,
        ModelLoadError,
        load_model,
        load_shared_model,
        load_tokenizer,
    )
    from stratus_workers.models.source import ModelSource, SourceKind, parse_source

# name -> the module that defines it
_EXPORTS = {
    "LoadedModel": "stratus_workers.models.loader",
    "ModelLoadError": "stratus_workers.models.loader",
    "load_model": "stratus_workers.models.loader",
    "load_shared_model": "stratus_workers.models.loader",
    "load_tokenizer": "stratus_workers.models.loader",
    "ModelSource": "stratus_workers.models.source",
    "SourceKind": "stratus_workers.models.source",
    "parse_source": "stratus_workers.models.source",
}

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "ModelSource",
    "SourceKind",
    "load_model",
    "load_shared_model",
    "load_tokenizer",
    "parse_source",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
