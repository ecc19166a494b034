"""The router's configuration: routing policy and parameters (shared with the CRD) plus its backends."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from stratus_workers.protocol.names import Policy as Policy
from stratus_workers.protocol.names import Tier as Tier
from stratus_workers.spec_model import SpecModel


class CascadeSettings(SpecModel):
    """When the edge's answer stands and when the cloud is asked instead."""

    confidence_threshold: float = Field(
        -1.5,
        le=0.0,
        description="Escalate when the edge's mean token log-probability (with runningMean or windowTokens, its "
        "lowest running mean or lowest mean over that many consecutive tokens) is below this.",
    )
    max_edge_prompt_tokens: int = Field(512, ge=1, description="Longer prompts go straight to the cloud.")
    edge_timeout_seconds: float = Field(5.0, gt=0.0, le=3600.0, description="Escalate when the edge takes longer.")
    probe_tokens: int = Field(
        0,
        ge=0,
        le=4096,
        description="Also judge the edge's first this-many tokens against the threshold and escalate at once "
        "when they miss it (0: off). Changes decisions, only towards the cloud, and stops most escalated edge "
        "answers after this many tokens; without it the edge is stopped only once its answer can no longer "
        "reach the threshold, which keeps every decision as it is.",
    )
    window_tokens: int = Field(
        0,
        ge=0,
        le=4096,
        description="Judge the edge's answer by its least confident stretch instead of its mean: the lowest mean "
        "token log-probability over any this-many consecutive tokens (the whole answer's mean when it is shorter) "
        "must reach the threshold (0: off, the whole answer's mean). A stretch below it escalates whatever "
        "follows, so the edge is stopped there, and stopping early keeps every decision of this rule. A "
        "different rule from the mean's: calibrate the threshold for it.",
    )
    running_mean: bool = Field(
        False,
        description="Judge the edge's answer by its lowest running mean instead of its mean: the mean over its first "
        "n tokens must reach the threshold for every n (the whole answer is one of them). The edge is stopped at the "
        "first token where it does not, and stopping early keeps every decision of this rule. A different rule "
        "from the mean's: calibrate the threshold for it.",
    )


class SpeculativeSettings(SpecModel):
    """The edge drafts tokens and the cloud verifies them; the output is the cloud's own."""

    draft_tokens: int = Field(4, ge=1, le=16, description="Tokens drafted per round at the start (k).")
    max_draft_tokens: int = Field(8, ge=1, le=16, description="Upper bound for k when it adapts.")
    adaptive: bool = Field(True, description="Adapt k to the acceptance rate seen so far in the request.")
    top_k: int = Field(32, ge=1, le=1024, description="Sampled drafts come from the edge's top-k tokens.")
    draft_ahead: bool = Field(
        True,
        description="Greedy requests: while the cloud verifies a draft, the edge drafts the next one as if all of "
        "it will be accepted, so edge and cloud work at the same time (the answer is the cloud's either way).",
    )


class LinkSettings(SpecModel):
    """Simulated latency on the edge-to-cloud link, for benchmarks (off by default)."""

    delay_ms: float = Field(0.0, ge=0.0, le=10000.0, description="Added to every round trip to the cloud tier.")
    jitter_ms: float = Field(0.0, ge=0.0, le=10000.0, description="Uniform jitter around the delay.")


class CacheSettings(SpecModel):
    """The router's output cache for deterministic requests (greedy, or sampled with a seed)."""

    enabled: bool = True
    max_entries: int = Field(1024, ge=1, le=1_000_000)
    ttl_seconds: float = Field(300.0, gt=0.0, le=604800.0)


class RoutingSpec(SpecModel):
    """The `routing` section of an LLMDeployment."""

    policy: Policy = Field("cascade", description="cloud-only, edge-only, cascade or speculative.")
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)
    speculative: SpeculativeSettings = Field(default_factory=SpeculativeSettings)
    link: LinkSettings = Field(default_factory=LinkSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
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
    stall_timeout_seconds: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="A backend that shows no progress on any call for this long, while a call waits past its "
        "bound (this long for a stream's next message; this plus its token budget at the backend's recent "
        "pace for a unary call), is marked down and its calls are tried elsewhere.",
    )

    @classmethod
    def from_file(cls, path: Path) -> RouterConfig:
        return cls.model_validate(json.loads(path.read_text()))
