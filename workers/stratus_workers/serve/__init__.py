"""Model serving: the runner (forward passes), the engine (continuous batching) and the gRPC server.

This package re-exports nothing: import from its modules (`serve.server`, `serve.engine`), so that
naming one loads only what that one needs.
"""
