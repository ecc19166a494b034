"""Cascade decisions follow the threshold; stopping the edge early keeps them; prompt length rules; config."""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stratus_workers.router.config import CascadeSettings, RouterConfig
from stratus_workers.router.policy import (
    EdgeWatch,
    WindowSum,
    best_reachable_mean,
    binary_fraction,
    judge_edge_answer,
    logprob_sum,
    mean_logprob,
    prompt_fits_edge,
    running_confidence,
    window_confidence,
)

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


# -- stopping the edge early: the decisions must be the ones waiting for the end gives --------------------

logprob_values = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False, width=32).map(float) | st.sampled_from(
    [0.0, -0.0, -1e-7, -0.6931471805599453]
)


Stream = tuple[list[list[float]], int, float, int, int, bool]


@st.composite
def edge_streams(draw: st.DrawFn) -> Stream:
    """An edge answer as the chunks it streams in, its length bound, a threshold, a probe and a window length, and
    whether the running-mean rule is on."""
    logprobs = draw(st.lists(logprob_values, max_size=64))
    max_tokens = len(logprobs) + draw(st.integers(0, 40))
    if max_tokens == 0:
        max_tokens = 1
    cuts = sorted(draw(st.lists(st.integers(0, len(logprobs)), max_size=8)))
    chunks = [logprobs[a:b] for a, b in zip([0, *cuts], [*cuts, len(logprobs)], strict=True)]
    # Thresholds near the answer's own mean (where the decision is close) as well as anywhere.
    near = mean_logprob(logprobs) + draw(st.floats(-0.5, 0.5))
    threshold = min(0.0, draw(st.sampled_from([near, draw(st.floats(-20.0, 0.0))])))
    probe = draw(st.sampled_from([0, 0, 1, 4, 8, 16]))
    window = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8, 16, 80]))
    if window:  # thresholds near the answer's own windows too
        threshold = min(0.0, draw(st.sampled_from([threshold, window_confidence(logprobs, window)])))
    running = draw(st.sampled_from([False, False, True]))
    if running:
        threshold = min(0.0, draw(st.sampled_from([threshold, running_confidence(logprobs)])))
    return chunks, max_tokens, threshold, probe, window, running


def watch_stream(chunks: list[list[float]], settings: CascadeSettings, max_tokens: int | None) -> tuple[EdgeWatch, int]:
    """Feed the chunks as the router does, stopping where the watch says; returns the watch and the tokens read."""
    watch = EdgeWatch(settings, max_tokens)
    read = 0
    for chunk in chunks:
        read += len(chunk)
        if watch.add(chunk):
            break
    return watch, read


@settings(max_examples=2500, deadline=None)
@given(edge_streams())
def test_stopping_early_gives_the_decision_of_the_whole_answer(stream: Stream) -> None:
    chunks, max_tokens, threshold, probe, window, running = stream
    whole = [x for chunk in chunks for x in chunk]
    settings = CascadeSettings(
        confidence_threshold=threshold, probe_tokens=probe, window_tokens=window, running_mean=running
    )
    watch, read = watch_stream(chunks, settings, max_tokens)
    expected = judge_edge_answer(whole, settings)
    got = watch.verdict()
    assert (got.escalate, got.reason, got.threshold) == (expected.escalate, expected.reason, expected.threshold)
    if watch.settled is None:
        assert got == expected and read == len(whole)  # read to the end: the very same verdict
    else:
        assert got.confidence < threshold
        assert watch.logprobs == whole[: len(watch.logprobs)]
        if not window:
            assert got.confidence == pytest.approx(mean_logprob(watch.logprobs))
    exact = judge_edge_answer(whole, CascadeSettings(confidence_threshold=threshold))
    if running and not window:
        # The whole answer's mean is one of the running means: the running-mean rule only moves answers to the cloud.
        assert not (exact.escalate and not expected.escalate)
    if not window and not running:
        # The probe only ever moves answers to the cloud.
        assert not (exact.escalate and not expected.escalate)
        if not probe:
            assert expected == exact


@settings(max_examples=500, deadline=None)
@given(edge_streams())
def test_an_unknown_length_bound_stops_a_mean_rule_answer_only_at_the_probe(stream: Stream) -> None:
    chunks, _, threshold, probe, _, _ = stream
    watch, _ = watch_stream(chunks, CascadeSettings(confidence_threshold=threshold, probe_tokens=probe), None)
    if watch.settled is not None:
        assert probe and len(watch.logprobs) == probe


def test_the_exact_bound_is_the_best_mean_still_reachable() -> None:
    # 3 tokens summing to -6 of at most 10: ten tokens, seven of them certain, give the best mean, -0.6.
    settings = CascadeSettings(confidence_threshold=-0.6)
    watch = EdgeWatch(settings, 10)
    assert not watch.add([-2.0, -2.0, -2.0])  # -0.6 is still reachable
    assert best_reachable_mean(watch.total, 10) == pytest.approx(-0.6)
    assert watch.add([-1e-3])  # now it is not: stopped, and the answer escalates whatever follows
    assert watch.verdict().escalate and watch.verdict().reason == "low-confidence"
    assert judge_edge_answer([-2.0, -2.0, -2.0, -1e-3, *[0.0] * 6], settings).escalate


def test_the_probe_escalates_at_its_length_only() -> None:
    settings = CascadeSettings(confidence_threshold=-1.0, probe_tokens=2)
    watch = EdgeWatch(settings, None)
    assert not watch.add([-3.0])  # one token is not yet the probe
    assert watch.add([0.0])  # mean -1.5 over the first two
    late = EdgeWatch(settings, None)
    assert not late.add([0.0, 0.0, -5.0, -5.0])  # the probe passed; later tokens wait for the end
    assert late.verdict().escalate  # ... where the whole answer's mean decides


def test_the_window_rule_judges_the_least_confident_stretch() -> None:
    settings = CascadeSettings(confidence_threshold=-0.6, window_tokens=2)
    # Mean -0.67 misses the threshold, but no two neighbouring tokens do: kept under the window rule.
    assert window_confidence([-1.0, 0.0, -1.0], 2) == -0.5
    assert not judge_edge_answer([-1.0, 0.0, -1.0], settings).escalate
    assert judge_edge_answer([-1.0, 0.0, -1.0], CascadeSettings(confidence_threshold=-0.6)).escalate
    # ... and the other way: one poor stretch in a confident answer escalates it.
    answer = [0.0] * 10 + [-1.0, -1.0]
    assert judge_edge_answer(answer, settings).escalate
    assert not judge_edge_answer(answer, CascadeSettings(confidence_threshold=-0.6)).escalate
    assert window_confidence([-1.0], 2) == -1.0  # shorter than the window: the whole answer's mean


def test_the_window_rule_stops_at_the_first_poor_stretch_or_before_the_first_window() -> None:
    settings = CascadeSettings(confidence_threshold=-1.0, window_tokens=4)
    watch = EdgeWatch(settings, None)
    assert not watch.add([0.0, 0.0, -0.5, -0.5, -2.0])  # stretches -0.25 and -0.75 reach -1.0
    assert watch.add([-2.0])  # -0.5, -0.5, -2, -2: -1.25
    assert watch.settled is not None and watch.settled.confidence == -1.25 and len(watch.logprobs) == 6
    early = EdgeWatch(settings, None)
    assert not early.add([-3.0])  # -3 over a window of 4 is -0.75: the first window may still reach -1.0
    assert early.add([-1.5])  # -4.5 / 4 < -1.0: the first window, or a shorter answer, misses it whatever follows
    assert judge_edge_answer([-3.0, -1.5], settings).escalate
    assert judge_edge_answer([-3.0, -1.5, 0.0, 0.0, 0.0], settings).escalate


# Any float the edge could send: every magnitude (subnormals and near the largest included), -inf, both zeros,
# small positive values (a log-softmax rounded above 0), and the everyday range with values rounding makes close.
any_logprob = (
    st.floats(max_value=0.0, allow_nan=False)
    | st.floats(min_value=-30.0, max_value=0.0)
    | st.floats(min_value=0.0, max_value=1e-6)
    | st.sampled_from([-0.1, -0.2, -0.3, -1 / 3, -1.0, -1e-16, -5e-324, -1e-323, -1e300, 0.0, -0.0])
)

WindowStream = tuple[list[float], int, float]


@st.composite
def window_streams(draw: st.DrawFn) -> WindowStream:
    """A stream of log-probabilities, a window size, and a threshold, mostly on or next to one of the stream's own
    window means (as the rule adds them up, or exact): where the rule's rounding decides."""
    values = draw(st.lists(any_logprob, max_size=80))
    size = draw(st.sampled_from([1, 2, 3, 4, 7, 16, 64]))
    thresholds = [draw(st.floats(-30.0, 0.0)), -math.inf, math.nan, -0.0]
    start = draw(st.integers(0, len(values)))
    if draw(st.booleans()):
        # The rule's sum at its worst: each later value below half a unit of the first's last place, so every
        # addition rounds back to the first value and the rule's sum misses all of them.
        first = draw(st.floats(-30.0, -1e-300))
        lost = -math.ulp(first) / 2 * draw(st.floats(0.5, 0.999))
        values[start:start] = [first] + [lost] * (size - 1)
    if len(values) >= size:
        start = min(start, len(values) - size)
        window = values[start : start + size]
        mean = logprob_sum(window) / size
        thresholds += [mean, math.nextafter(mean, -math.inf), math.nextafter(mean, math.inf)]
        if all(math.isfinite(v) for v in window):
            exact = float(sum(map(Fraction, window)) / size)
            thresholds += [exact, math.nextafter(exact, -math.inf), math.nextafter(exact, math.inf)]
    return values, size, draw(st.sampled_from(thresholds))


@settings(max_examples=3000, deadline=None)
@given(window_streams())
def test_the_sliding_window_decides_as_adding_each_window_up(stream: WindowStream) -> None:
    """`WindowSum`, in constant time a token, answers at every token what adding the last `size` values up left to
    right and dividing does (the rule's definition, `window_confidence`'s): the same decision and the same mean."""
    values, size, threshold = stream
    window = WindowSum(size, threshold)
    for n, value in enumerate(values, 1):
        if math.isfinite(value):
            num, bits = binary_fraction(value)
            assert Fraction(num, 2**bits) == Fraction(value)
        expected = None
        if n >= size:
            mean = logprob_sum(values[n - size : n]) / size
            expected = mean if mean < threshold else None
        assert window.push(value) == expected, (n, expected)


@settings(max_examples=2000, deadline=None)
@given(window_streams())
def test_the_lowest_window_is_the_one_adding_every_window_up_finds(stream: WindowStream) -> None:
    """`window_confidence` adds up only the windows whose exact sums leave them a chance to be the lowest: the very
    value (and sign of zero) that adding every window up and taking the least gives."""
    values, size, _ = stream
    if len(values) < size:
        return
    expected = min(logprob_sum(values[i : i + size]) / size for i in range(len(values) - size + 1))
    got = window_confidence(values, size)
    assert got == expected and math.copysign(1, got) == math.copysign(1, expected), (got, expected)


def test_the_sliding_window_adds_a_window_up_only_next_to_the_threshold() -> None:
    """Far from the threshold the exact sum decides alone, however long the answer; next to it the window is added
    up as the rule does."""
    far = WindowSum(16, -1.0)
    answer = [-0.1 * (i % 7) for i in range(10_000)] + [-2.0] * 16
    means = [None if n < 16 else logprob_sum(answer[n - 16 : n]) / 16 for n in range(1, len(answer) + 1)]
    settles = [i for i, mean in enumerate(means) if mean is not None and mean < -1.0]
    assert [far.push(v) for v in answer[: settles[0] + 1]] == [None] * settles[0] + [means[settles[0]]]
    assert settles[0] == 10_006 and far.resums == 0  # seven -2s and nine others (-2.7): -16.7 / 16, found exactly
    # The exact mean of these three floats reaches -0.2, but the rule's sum rounds to -0.6000000000000001:
    # next to the threshold, the window is added up and the rule's verdict given.
    assert sum(map(Fraction, (-0.1, -0.2, -0.3))) / 3 > Fraction(-0.2)
    near = WindowSum(3, -0.2)
    assert [near.push(v) for v in (-0.1, -0.2, -0.3)] == [None, None, -0.6000000000000001 / 3] and near.resums == 1
    # Five values of 2, 2, 1, 1, 1 times the smallest float: the exact mean, 1.4 of it, is below one of it, but the
    # rule's division rounds to 1 (it underflows: no relative bound there), which is not below.
    tiny = WindowSum(5, -5e-324)
    assert [tiny.push(v) for v in (-1e-323, -1e-323, -5e-324, -5e-324, -5e-324)] == [None] * 5
    # ... and where the rule's sum overflows (no bound there either): -inf, though the exact mean is -1e308.
    huge = WindowSum(2, -sys.float_info.max)
    assert [huge.push(v) for v in (-1e308, -1e308)] == [None, -math.inf]
    odd = WindowSum(2, -1.0)
    assert [odd.push(v) for v in (0.0, -math.inf, 0.0, 0.0)] == [None, -math.inf, -math.inf, None]
    assert odd.resums == 2  # the windows holding -inf have no exact sum


def test_the_running_mean_rule_stops_at_the_first_token_where_the_mean_so_far_misses() -> None:
    assert running_confidence([]) == 0.0
    assert running_confidence([-2.0, 0.0, 0.0, 0.0]) == -2.0  # the first token alone, whatever the whole mean (-0.5)
    settings = CascadeSettings(confidence_threshold=-1.0, running_mean=True)
    watch = EdgeWatch(settings, None)
    assert not watch.add([-0.5, -1.0])  # running means -0.5, -0.75
    assert watch.add([-2.0, 0.0])  # -3.5 / 3 < -1.0: settled at the third token
    assert len(watch.logprobs) == 3 and watch.verdict().escalate
    assert judge_edge_answer([-0.5, -1.0, -2.0, 0.0, 0.0, 0.0], settings).escalate
    assert not judge_edge_answer([-0.5, -1.0, -2.0, 0.0, 0.0, 0.0], CascadeSettings(confidence_threshold=-1.0)).escalate
