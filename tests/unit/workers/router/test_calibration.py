"""The calibration picks the threshold with the most edge traffic that still meets the retention target."""

from __future__ import annotations

import pytest

from stratus_workers.router.calibration import Sample, answer_quality, choose_threshold, evaluate_threshold

pytestmark = pytest.mark.unit


def test_answer_quality() -> None:
    assert answer_quality("Paris is  the capital.", "Paris is the capital.") == 1.0
    assert 0.0 < answer_quality("Paris", "The capital is Paris") < 1.0
    assert answer_quality("", "x") == 0.0


def test_choose_threshold_meets_target_with_most_edge_traffic() -> None:
    samples = [Sample("a", -0.1, 1.0), Sample("b", -0.3, 1.0), Sample("c", -0.8, 0.5), Sample("d", -1.2, 0.2)]
    result = choose_threshold(samples, 0.85)
    # At -0.8 retention is (1+1+0.5+1)/4 = 0.875 with 75% at the edge; at -1.2 it falls to 0.675.
    assert result.threshold == pytest.approx(-0.8)
    assert result.edge_share == 0.75 and result.retention == pytest.approx(0.875)
    assert choose_threshold(samples, 1.0).threshold == pytest.approx(-0.3)
    assert choose_threshold(samples, 0.5).threshold == pytest.approx(-1.2)
    assert evaluate_threshold(samples, 0.0).retention == 1.0


def test_choose_threshold_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        choose_threshold([], 0.9)
    with pytest.raises(ValueError, match="within"):
        choose_threshold([Sample("a", -1.0, 1.0)], 1.5)


def test_likelihood_quality() -> None:
    from stratus_workers.router.calibration import likelihood_quality

    assert likelihood_quality(-0.5, -0.5) == 1.0
    assert likelihood_quality(-0.2, -0.5) == 1.0  # likelier than the cloud's own answer: capped
    assert likelihood_quality(-1.5, -0.5) == pytest.approx(0.3679, abs=1e-4)  # e^-1
