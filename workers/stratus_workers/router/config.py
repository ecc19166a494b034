"""The router's configuration: routing policy and parameters (shared with the CRD) plus its backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from stratus_workers.schema import SpecModel

Policy = Literal["cloud-only", "edge-only", "cascade"]
Tier = Literal["edge", "cloud"]


class CascadeSettings(SpecModel):
    """When the edge's answer stands and when the cloud is asked instead."""

    confidence_threshold: float = Field(
        -1.5, le=0.0, description="Escalate when the edge's mean token log-probability is below this."
    )
    max_edge_prompt_tokens: int = Field(512, ge=1, description="Longer prompts go straight to the cloud.")
    edge_timeout_seconds: float = Field(5.0, gt=0.0, le=3600.0, description="Escalate when the edge takes longer.")


class RoutingSpec(SpecModel):
    """The `routing` section of an LLMDeployment."""

    policy: Policy = Field("cascade", description="cloud-only, edge-only or cascade.")
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)
    allow_fallback: bool = Field(
        True,
        description="When every backend of the policy's tier is down, answer from the other tier "
        "(marked degraded) instead of failing. Turn off when prompts must never leave the edge.",
    )


class Backend(SpecModel):
    """One model server the router may call."""

    name: str = Field(min_length=1)
    address: str = Field(min_length=3, description="host:port of the server's gRPC endpoint.")
    tier: Tier


class RouterConfig(SpecModel):
    """Everything the router process needs; written by the planner, read by `python -m stratus_workers.router`."""

    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    backends: list[Backend] = Field(default_factory=list)
    tokenizer: str | None = Field(
        None, description="Model source whose tokenizer counts prompt tokens for maxEdgePromptTokens."
    )
    health_interval_seconds: float = Field(2.0, gt=0.0, le=3600.0)
    request_timeout_seconds: float = Field(120.0, gt=0.0, le=86400.0)

    @classmethod
    def from_file(cls, path: Path) -> RouterConfig:
        return cls.model_validate(json.loads(path.read_text()))
