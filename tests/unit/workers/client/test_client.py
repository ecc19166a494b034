"""Request building in the client library, and settings parsing from flags and the environment."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.client import build_request
from stratus_workers.client.client import FINISH_NAMES, POLICIES, TIER_NAMES
from stratus_workers.protocol.names import POLICY_TO_PB
from stratus_workers.router.config import RoutingSpec
from stratus_workers.settings import parse_config

pytestmark = pytest.mark.unit


def test_build_request_prompt_and_chat() -> None:
    request = build_request("hi", max_new_tokens=5, stop=["\n"], seed=3, logprobs=True, policy="edge-only")
    assert request.WhichOneof("input") == "prompt" and request.seed == 3 and request.return_logprobs
    assert request.policy == pb.ROUTING_POLICY_EDGE_ONLY and list(request.stop) == ["\n"]
    chat = build_request(messages=[{"role": "user", "content": "x"}])
    assert chat.WhichOneof("input") == "chat" and chat.chat.messages[0].content == "x"
    assert not chat.HasField("seed")


def test_build_request_refuses_ambiguity() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        build_request("a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="exactly one"):
        build_request()
    with pytest.raises(ValueError, match="unknown policy"):
        build_request("a", policy="fastest")


def test_build_request_accepts_every_policy_the_router_accepts() -> None:
    """`stratus chat --policy speculative` once failed here: the client kept its own, shorter list."""
    accepted_by_router = RoutingSpec.model_json_schema()["properties"]["policy"]["enum"]
    assert sorted(POLICIES) == sorted(accepted_by_router)
    for policy in accepted_by_router:
        assert build_request("a", policy=policy).policy == POLICY_TO_PB[policy]
    assert build_request("a", policy="speculative").policy == pb.ROUTING_POLICY_SPECULATIVE


def test_display_names_cover_every_enum_value() -> None:
    assert set(TIER_NAMES) == set(pb.Tier.values()) and TIER_NAMES[pb.TIER_UNSPECIFIED] == "?"
    assert set(FINISH_NAMES) == set(pb.FinishReason.values()) and FINISH_NAMES[pb.FINISH_REASON_STOP] == "stop"


@dataclass
class Example:
    model: str = field(metadata={"help": "where"})
    port: int = field(default=1, metadata={"help": "port"})
    verbose: bool = field(default=False, metadata={"help": "talk"})


def test_settings_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATUS_PORT", "7")
    monkeypatch.setenv("STRATUS_VERBOSE", "yes")
    config = parse_config(Example, ["--model", "m"])
    assert (config.model, config.port, config.verbose) == ("m", 7, True)
    assert parse_config(Example, ["--model", "m", "--port", "9", "--no-verbose"]).port == 9
    monkeypatch.setenv("STRATUS_PORT", "seven")
    with pytest.raises(ValueError, match="STRATUS_PORT='seven' is not a valid int"):
        parse_config(Example, ["--model", "m"])


def test_settings_missing_required(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("STRATUS_MODEL", raising=False)
    with pytest.raises(SystemExit):
        parse_config(Example, [])
    assert "--model (or STRATUS_MODEL) is required" in capsys.readouterr().err
