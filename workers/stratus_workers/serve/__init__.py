"""Model serving: the runner (forward passes), the engine (continuous batching) and the gRPC server."""

from stratus_workers.serve.engine import Engine, SamplingParams
from stratus_workers.serve.server import ModelServer, ServerConfig

__all__ = ["Engine", "ModelServer", "SamplingParams", "ServerConfig"]
