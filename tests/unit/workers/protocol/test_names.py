"""The name tables agree with the proto: every enum value has a name, and names and values round-trip."""

from __future__ import annotations

import typing

import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol import names
from stratus_workers.router.config import RoutingSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("enum", "to_pb", "from_pb", "literal"),
    [
        (pb.Tier, names.TIER_TO_PB, names.TIER_FROM_PB, names.Tier),
        (pb.RoutingPolicy, names.POLICY_TO_PB, names.POLICY_FROM_PB, names.Policy),
        (pb.FinishReason, names.FINISH_TO_PB, names.FINISH_FROM_PB, names.FinishReason),
    ],
)
def test_every_enum_value_has_a_name_both_ways(enum: typing.Any, to_pb: dict, from_pb: dict, literal: object) -> None:
    specified = {value for key, value in enum.items() if not key.endswith("_UNSPECIFIED")}
    assert set(from_pb) == specified, f"{enum.DESCRIPTOR.name} values without a name (or names without a value)"
    assert set(to_pb) == set(typing.get_args(literal))
    for name, value in to_pb.items():
        assert from_pb[value] == name
    for value, name in from_pb.items():
        assert to_pb[name] == value


def test_lookup_helpers_name_the_accepted_values() -> None:
    for policy in names.POLICIES:
        assert names.POLICY_FROM_PB[names.policy_value(policy)] == policy
    for tier in names.TIERS:
        assert names.tier_name(names.tier_value(tier)) == tier
    for reason in names.FINISH_REASONS:
        assert names.finish_name(names.finish_value(reason)) == reason
    assert names.tier_name(pb.TIER_UNSPECIFIED) == "" and names.tier_name(pb.TIER_UNSPECIFIED, "?") == "?"
    assert names.finish_name(pb.FINISH_REASON_UNSPECIFIED, "none") == "none"
    with pytest.raises(ValueError, match="unknown policy 'fastest'; use one of cloud-only, edge-only, cascade, spec"):
        names.policy_value("fastest")
    with pytest.raises(ValueError, match="unknown tier 'fog'; use one of edge, cloud"):
        names.tier_value("fog")
    with pytest.raises(ValueError, match="unknown finish reason 'deadline'"):
        names.finish_value("deadline")


def test_service_name_and_the_routing_spec_share_the_tables() -> None:
    assert names.SERVICE_NAME == "stratus.v1.Inference"
    assert set(typing.get_args(RoutingSpec.model_fields["policy"].annotation)) == set(names.POLICIES)
