"""Model sources and loading: the bundled SmolLM2, local directories and compressed artifacts."""

from stratus_workers.models.loader import LoadedModel, ModelLoadError, load_model, load_shared_model, load_tokenizer
from stratus_workers.models.source import ModelSource, SourceKind, parse_source

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
