"""The names of tiers, routing policies and finish reasons, and their protobuf enum values both ways.

The Literal types are the one source: the routing spec (and so the CRD), the router, the model server,
the client and the OpenAI adapter all read these tables, and a test checks that every enum value of
the proto has a name here.
"""

from __future__ import annotations

import typing
from typing import Literal

from stratus_workers.api import inference_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"]
SERVICE_NAME: str = SERVICE.full_name

Tier = Literal["edge", "cloud"]
Policy = Literal["cloud-only", "edge-only", "cascade", "speculative"]
FinishReason = Literal["stop", "length", "cancelled"]

TIERS: tuple[Tier, ...] = typing.get_args(Tier)
POLICIES: tuple[Policy, ...] = typing.get_args(Policy)
FINISH_REASONS: tuple[FinishReason, ...] = typing.get_args(FinishReason)

TIER_TO_PB: dict[Tier, pb.Tier.ValueType] = {"edge": pb.TIER_EDGE, "cloud": pb.TIER_CLOUD}
POLICY_TO_PB: dict[Policy, pb.RoutingPolicy.ValueType] = {
    "cloud-only": pb.ROUTING_POLICY_CLOUD_ONLY,
    "edge-only": pb.ROUTING_POLICY_EDGE_ONLY,
    "cascade": pb.ROUTING_POLICY_CASCADE,
    "speculative": pb.ROUTING_POLICY_SPECULATIVE,
}
FINISH_TO_PB: dict[FinishReason, pb.FinishReason.ValueType] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}

# The reverse tables hold no entry for the UNSPECIFIED values: callers say what "none given" means to them.
TIER_FROM_PB: dict[pb.Tier.ValueType, Tier] = {v: k for k, v in TIER_TO_PB.items()}
POLICY_FROM_PB: dict[pb.RoutingPolicy.ValueType, Policy] = {v: k for k, v in POLICY_TO_PB.items()}
FINISH_FROM_PB: dict[pb.FinishReason.ValueType, FinishReason] = {v: k for k, v in FINISH_TO_PB.items()}


def tier_name(value: int, unspecified: str = "") -> str:
    """The name of a Tier enum value; `unspecified` for TIER_UNSPECIFIED (or a value this build does not know)."""
    return TIER_FROM_PB.get(pb.Tier.ValueType(value), unspecified)


def finish_name(value: int, unspecified: str = "") -> str:
    """The name of a FinishReason enum value; `unspecified` for FINISH_REASON_UNSPECIFIED or an unknown value."""
    return FINISH_FROM_PB.get(pb.FinishReason.ValueType(value), unspecified)


def policy_value(name: str) -> pb.RoutingPolicy.ValueType:
    """The RoutingPolicy enum value of a policy name; ValueError naming the accepted ones otherwise."""
    for policy, value in POLICY_TO_PB.items():
        if policy == name:
            return value
    raise ValueError(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}")


def tier_value(name: str) -> pb.Tier.ValueType:
    """The Tier enum value of a tier name; ValueError naming the accepted ones otherwise."""
    for tier, value in TIER_TO_PB.items():
        if tier == name:
            return value
    raise ValueError(f"unknown tier {name!r}; use one of {', '.join(TIERS)}")


def finish_value(name: str) -> pb.FinishReason.ValueType:
    """The FinishReason enum value of a finish reason name; ValueError naming the accepted ones otherwise."""
    for reason, value in FINISH_TO_PB.items():
        if reason == name:
            return value
    raise ValueError(f"unknown finish reason {name!r}; one of {', '.join(FINISH_REASONS)} was expected")
