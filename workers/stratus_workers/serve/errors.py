"""The engine's refusals: full, stopping, or stopped by a failure (the server maps each to a gRPC status)."""

from __future__ import annotations


class EngineOverloaded(RuntimeError):
    """The wait queue (or the speculative session pool) is full; the caller should retry later or go elsewhere."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class EngineFailed(EngineStopped):
    """The engine's loop died; nothing is served until the process restarts."""
