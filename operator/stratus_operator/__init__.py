"""Stratus control plane: the LLMDeployment model, planner, placement, kopf operator, local runner and CLI.

The public API, for scripts and notebooks (each name is imported from its module on first use, so the CLI
pays for none of them)::

    from stratus_operator import ClusterView, LLMDeployment, RenderOptions, plan, render_plan

    dep = LLMDeployment.from_manifest(manifest)
    p = plan(dep, ClusterView.local(), results={})       # the logical plan: pure, no I/O
    objects = render_plan(p, dep, RenderOptions())       # bound to Kubernetes objects
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stratus_operator.placement import ClusterView
    from stratus_operator.planner import CompressionResult, Plan, build_status, plan, plan_jobs
    from stratus_operator.render import RenderOptions, render_plan
    from stratus_operator.spec import LLMDeployment

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "ClusterView": "stratus_operator.placement",
    "CompressionResult": "stratus_operator.planner",
    "LLMDeployment": "stratus_operator.spec",
    "Plan": "stratus_operator.planner",
    "RenderOptions": "stratus_operator.render",
    "build_status": "stratus_operator.planner",
    "plan": "stratus_operator.planner",
    "plan_jobs": "stratus_operator.planner",
    "render_plan": "stratus_operator.render",
}

__all__ = [
    "ClusterView",
    "CompressionResult",
    "LLMDeployment",
    "Plan",
    "RenderOptions",
    "__version__",
    "build_status",
    "plan",
    "plan_jobs",
    "render_plan",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
