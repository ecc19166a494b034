"""Stratus control plane: the LLMDeployment model, planner, placement, kopf operator, local runner and CLI."""

__version__ = "0.1.0"
