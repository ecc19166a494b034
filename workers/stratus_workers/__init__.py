"""Stratus data plane: model loading, compression, serving, routing and the client."""

__version__ = "0.1.0"
