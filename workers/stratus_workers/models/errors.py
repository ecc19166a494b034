"""The one error model loading raises: what was wrong with a model source and how to fix it."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was wrong and how to fix it."""
