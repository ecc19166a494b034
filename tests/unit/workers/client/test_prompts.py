"""The built-in prompt sets: a threshold calibrated on one set is measured on prompts it never saw."""

from __future__ import annotations

import pytest

from stratus_workers.client.prompts import CALIBRATION_PROMPTS, EVALUATION_PROMPTS, SAMPLE_PROMPTS

pytestmark = pytest.mark.unit


def test_calibration_and_evaluation_prompts_are_disjoint_and_distinct() -> None:
    assert not set(CALIBRATION_PROMPTS) & set(EVALUATION_PROMPTS)
    assert len(set(EVALUATION_PROMPTS)) == len(EVALUATION_PROMPTS) == 40
    assert len(set(CALIBRATION_PROMPTS)) == len(CALIBRATION_PROMPTS)
    assert EVALUATION_PROMPTS[: len(SAMPLE_PROMPTS)] == SAMPLE_PROMPTS
