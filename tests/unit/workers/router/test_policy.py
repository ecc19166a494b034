"""Cascade decisions follow the threshold; prompt length rules; router config validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stratus_workers.router.config import CascadeSettings, RouterConfig
from stratus_workers.router.policy import judge_edge_answer, mean_logprob, prompt_fits_edge

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("logprobs", "threshold", "escalate"),
    [
        ([-0.1, -0.2, -0.3], -0.5, False),
        ([-0.25, -0.5, -0.75], -0.5, False),  # equal to the threshold stands
        ([-0.25, -0.5, -0.875], -0.5, True),
        ([-5.0], -1.5, True),
        ([], -1.5, False),  # an immediate end-of-sequence is certain
    ],
)
def test_cascade_follows_threshold(logprobs: list[float], threshold: float, escalate: bool) -> None:
    verdict = judge_edge_answer(logprobs, CascadeSettings(confidence_threshold=threshold))
    assert verdict.escalate is escalate
    assert verdict.reason == ("low-confidence" if escalate else "confident")
    assert verdict.confidence == pytest.approx(mean_logprob(logprobs))
    assert verdict.threshold == threshold


def test_prompt_length_rule() -> None:
    settings = CascadeSettings(max_edge_prompt_tokens=10)
    assert prompt_fits_edge(10, settings) and not prompt_fits_edge(11, settings) and prompt_fits_edge(None, settings)


def test_router_config_rejects_nonsense_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="confidenceThreshold"):
        RouterConfig.model_validate({"routing": {"cascade": {"confidenceThreshold": 0.5}}})
    with pytest.raises(ValidationError, match="policy"):
        RouterConfig.model_validate({"routing": {"policy": "random"}})
    with pytest.raises(ValidationError, match="tier"):
        RouterConfig.model_validate({"backends": [{"name": "a", "address": "h:1", "tier": "fog"}]})
    with pytest.raises(ValidationError, match="extra"):
        RouterConfig.model_validate({"routing": {"polciy": "cascade"}})
