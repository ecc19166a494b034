"""Compression worker: distill, prune and quantize a model into an edge variant, evaluate and gate it."""
