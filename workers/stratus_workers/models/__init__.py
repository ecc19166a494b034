"""Model sources and loading: the bundled SmolLM2, local directories and compressed artifacts.

The loader imports torch, so its names are re-exported lazily: `from stratus_workers.models import
ModelLoadError` (or any submodule import) does not load it; `load_model` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stratus_workers.models.files import ModelLoadError
from stratus_workers.models.source import ModelSource, SourceKind, parse_source
from stratus_workers.models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from stratus_workers.models.loader import LoadedModel, load_model, load_shared_model

_FROM_LOADER = ("LoadedModel", "load_model", "load_shared_model")

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
    if name in _FROM_LOADER:
        from stratus_workers.models import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
