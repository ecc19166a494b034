"""The local executor: the planner's output as processes on one machine (`stratus up`)."""

from stratus_operator.local.runner import LocalRunError, LocalRunner, load_manifest

__all__ = ["LocalRunError", "LocalRunner", "load_manifest"]
