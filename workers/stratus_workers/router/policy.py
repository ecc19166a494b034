"""Routing decisions as pure functions: the edge's confidence signal and the cascade's verdict.

The cascade judges an edge answer by its mean token log-probability, which is known only once the
answer ends. `EdgeWatch` follows the answer token by token and says as soon as the verdict can only
be "escalate", so the router stops the edge there instead of paying for the rest of the answer:

- **Exact** (always on): a log-probability is never positive, so every token still to come can only
  lower the sum, and the answer can hold at most `max_tokens` tokens. With sum S after n tokens, the
  best mean the finished answer can still have is S / max_tokens (all remaining tokens certain, the
  answer as long as allowed). Once that is below the threshold the verdict is settled: stopping there
  gives the decision that waiting for the end would give, on every answer.
- **Probe** (opt-in, `probe_tokens` > 0): the answer must also reach the threshold over its first
  `probe_tokens` tokens; when it does not, it escalates there. This changes decisions, only ever
  towards the cloud (an answer kept under it is kept under the exact rule too), and stops most
  escalated answers after a few tokens, which the exact rule cannot do: a mean is pulled down by
  a token only 1/max_tokens of its log-probability.
- **Window** (opt-in, `window_tokens` = w > 0): a different rule, not a stop for the mean's: the answer
  is judged by its least confident stretch, the lowest mean over any w consecutive tokens (the whole
  answer's mean when it is shorter than w). A stretch below the threshold settles the verdict whatever
  follows, so the edge stops at the first such stretch (and before w tokens, once their sum over w is
  below the threshold: a shorter answer's mean, and the first window's, can only be lower). Stopping
  early keeps every decision of this rule exactly; its decisions differ from the mean's, so its
  threshold is calibrated for it (`stratus calibrate` judges answers by the manifest's rule). The watch
  slides the window's sum in constant time a token (`WindowSum`), deciding as the rule's own sum would.
- **Running mean** (opt-in, `running_mean`): another rule that settles as it goes: the mean over the
  answer's first n tokens must reach the threshold for every n (the whole answer is one of them), so
  the edge stops at the first token where the running mean falls below it. With window and running
  mean both on, the lower of the two confidences decides.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stratus_workers.router.config import CascadeSettings


def logprob_sum(logprobs: Iterable[float]) -> float:
    """The log-probabilities added left to right, one rounding per token, as `EdgeWatch` adds them as they
    stream (`sum` may compensate its rounding on some Pythons, which would make the two disagree)."""
    total = 0.0
    for logprob in logprobs:
        total += logprob
    return total


def mean_logprob(logprobs: Sequence[float]) -> float:
    """The edge answer's mean token log-probability; an empty answer counts as certain (0.0)."""
    return logprob_sum(logprobs) / len(logprobs) if logprobs else 0.0


@dataclass(frozen=True)
class CascadeVerdict:
    escalate: bool
    reason: str
    confidence: float
    threshold: float


TICK_BITS = 1074  # the smallest float is 2**-1074
OVERFLOW_BITS = 1023  # a sum of magnitudes below 2**1023 cannot overflow a float sum (rounding included)
ROUNDING_BITS = 53  # a float's significand: an addition or division is off by at most 2**-53 of its result


def binary_fraction(value: float) -> tuple[int, int]:
    """A finite float exactly, as (n, k): n / 2**k with 0 <= k <= 1074 (every float is a whole number of 2**-1074)."""
    fraction, exponent = math.frexp(value)
    num, bits = int(fraction * 2.0**ROUNDING_BITS), ROUNDING_BITS - exponent
    if bits < 0:
        return num << -bits, 0
    if bits > TICK_BITS:  # a subnormal: its significand's last bits are zeros
        return num >> (bits - TICK_BITS), TICK_BITS
    return num, bits


def rounding_margin(size: int, magnitude: int) -> int:
    """How far the window rule's mean of `size` values can lie from their exact mean, times `size` and in the units
    of `magnitude`, the sum of the values' magnitudes in whole 2**-k (k <= 1074, below 2**1023 in all): 2 u size
    times the magnitudes, rounded up, and half the smallest float `size` times (at most one unit each). Why:
    `WindowSum`."""
    return ((size * magnitude) >> (ROUNDING_BITS - 1)) + 1 + size


def window_confidence(logprobs: Sequence[float], window_tokens: int) -> float:
    """The lowest mean log-probability over any `window_tokens` consecutive tokens (each window added left to
    right, as `EdgeWatch` adds it); the whole answer's mean when it is shorter than one window.

    In time linear in the answer: every window's exact sum (integers, as `WindowSum` keeps them) bounds the mean
    the rule computes for it, and only the windows whose bound reaches the lowest one's can hold the lowest mean;
    those alone are added up (one or a few, unless the answer holds an infinity or NaN: then all of them)."""
    size = window_tokens
    if len(logprobs) < size:
        return mean_logprob(logprobs)
    starts = range(len(logprobs) - size + 1)
    candidates: Sequence[int] = starts
    if all(math.isfinite(v) for v in logprobs):
        parts = [binary_fraction(v) for v in logprobs]
        bits = max(k for _, k in parts)
        exact = [n << (bits - k) for n, k in parts]
        sums = list(itertools.accumulate(exact, initial=0))
        magnitudes = list(itertools.accumulate(map(abs, exact), initial=0))
        if magnitudes[-1] < 1 << (OVERFLOW_BITS + bits):
            bounds = [
                (sums[i + size] - sums[i], rounding_margin(size, magnitudes[i + size] - magnitudes[i])) for i in starts
            ]
            # No window whose mean is certainly above some window's can hold the lowest.
            lowest_upper = min(total + margin for total, margin in bounds)
            candidates = [i for i, (total, margin) in enumerate(bounds) if total - margin <= lowest_upper]
    return min(logprob_sum(logprobs[i : i + size]) / size for i in candidates)


def running_confidence(logprobs: Sequence[float]) -> float:
    """The lowest mean over the answer's first n tokens, for any n (added left to right, as `EdgeWatch` adds
    them); an empty answer counts as certain (0.0)."""
    total, lowest = 0.0, math.inf
    for n, logprob in enumerate(logprobs, 1):
        total += logprob
        lowest = min(lowest, total / n)
    return lowest if logprobs else 0.0


def edge_confidence(
    logprobs: Sequence[float], probe_tokens: int = 0, window_tokens: int = 0, running_mean: bool = False
) -> float:
    """The cascade's confidence in an edge answer: its mean token log-probability, or by the rules that replace
    it, the lower of its lowest mean over `window_tokens` consecutive tokens and (`running_mean`) its lowest
    running mean; with `probe_tokens`, the lower of that and the mean over its first `probe_tokens` tokens (an
    answer shorter than the probe is judged as a whole)."""
    rules = []
    if window_tokens:
        rules.append(window_confidence(logprobs, window_tokens))
    if running_mean:
        rules.append(running_confidence(logprobs))
    confidence = min(rules) if rules else mean_logprob(logprobs)
    if probe_tokens and len(logprobs) >= probe_tokens:
        confidence = min(confidence, mean_logprob(logprobs[:probe_tokens]))
    return confidence


def judge_edge_answer(logprobs: Sequence[float], settings: CascadeSettings) -> CascadeVerdict:
    """Keep the edge's answer when its confidence reaches the threshold, else escalate."""
    confidence = edge_confidence(logprobs, settings.probe_tokens, settings.window_tokens, settings.running_mean)
    threshold = settings.confidence_threshold
    if confidence >= threshold:
        return CascadeVerdict(False, "confident", confidence, threshold)
    return CascadeVerdict(True, "low-confidence", confidence, threshold)


class WindowSum:
    """The last `size` log-probabilities of an answer, and whether their mean as the window rule computes it (the
    window added left to right, `logprob_sum`, then divided by its size) is below `threshold`: in constant time a
    token, where adding the window up is `size` additions.

    The window's sum is kept exactly (as a whole number of 2**-bits, `bits` growing to the finest value seen;
    every finite float is a whole number of 2**-1074), so sliding it loses nothing however long the answer. The
    rule's mean differs from the exact one by less than 2 u times the sum of the window's magnitudes (u = 2**-53:
    the rule's sum is off by at most (size - 1) u / (1 - (size - 1) u) times it, recursive summation's bound,
    and the division by `size` rounds once more), plus half the smallest float where the division underflows,
    as long as that sum is below 2**1023 (the rule's sum cannot overflow). When the exact mean is farther than
    that from the threshold, the rule's mean lies on the same side; only closer (or beyond those bounds, or with
    a value of no exact form, an infinity or NaN, in the window) is the window added up as the rule does
    (`resums` counts those): the answer is always the rule's.
    """

    def __init__(self, size: int, threshold: float) -> None:
        self.size = size
        self.threshold = threshold
        # Each value, and exactly in 2**-bits (None: no exact form, an infinity or NaN).
        self._values: collections.deque[tuple[float, int | None]] = collections.deque()
        self._bits = 0  # the sums below are whole numbers of 2**-bits
        self._exact = 0  # the window's sum
        self._magnitude = 0  # the sum of its values' magnitudes
        self._odd = 0  # values without an exact form in the window
        # Nothing is below an infinite or NaN threshold (comparisons with them are false): no limit to test.
        self._threshold = binary_fraction(threshold) if math.isfinite(threshold) else None
        self._limit = 0  # size * threshold, in 2**-bits
        self._huge = 0  # 2**1023, in 2**-bits
        self._rescale(self._threshold[1] if self._threshold else 0)
        self.resums = 0

    def push(self, value: float) -> float | None:
        """Add `value` (the oldest leaves once there are `size`); when the window is full and its mean is below the
        threshold, that mean (as the rule computes it), else None."""
        exact: int | None = None
        if math.isfinite(value):
            num, bits = binary_fraction(value)
            if bits > self._bits:
                self._rescale(bits)
            exact = num << (self._bits - bits)
            self._exact += exact
            self._magnitude += abs(exact)
        else:
            self._odd += 1
        values, size = self._values, self.size
        values.append((value, exact))
        if len(values) > size:
            exact = values.popleft()[1]
            if exact is None:
                self._odd -= 1
            else:
                self._exact -= exact
                self._magnitude -= abs(exact)
        if len(values) < size or self._threshold is None:
            return None
        below = False  # certainly below: the answer settles here, so this adding up comes once an answer
        if not self._odd and self._magnitude < self._huge:
            margin = rounding_margin(size, self._magnitude)  # times `size`, as the sum and the limit are
            if self._exact - margin >= self._limit:
                return None
            below = self._exact + margin < self._limit
        if not below:
            self.resums += 1
        mean = logprob_sum(v for v, _ in values) / size
        return mean if mean < self.threshold else None

    def _rescale(self, bits: int) -> None:
        """Count in 2**-bits from now on (finer than before, so everything stays a whole number): seldom, as the
        finest value seen so far only grows."""
        shift = bits - self._bits
        self._bits = bits
        self._exact <<= shift
        self._magnitude <<= shift
        self._values = collections.deque((v, None if e is None else e << shift) for v, e in self._values)
        self._huge = 1 << (OVERFLOW_BITS + bits)
        if self._threshold is not None:
            num, k = self._threshold
            self._limit = (self.size * num) << (bits - k)


def best_reachable_mean(logprob_sum: float, max_tokens: int) -> float:
    """The highest mean log-probability an answer whose log-probabilities so far sum to `logprob_sum` can
    end with, when it holds at most `max_tokens` tokens (every later token at best certain: log-prob 0)."""
    return logprob_sum / max_tokens


class EdgeWatch:
    """Follows an edge answer's log-probabilities as they stream and says when escalation is settled.

    `max_tokens` bounds the answer's length (None when unknown: then only the probe can stop a mean-rule
    answer early; the window and running-mean rules need no bound). The running sum adds the log-probabilities as
    `mean_logprob` does, and a window's sum as `window_confidence` does, so the bounds are compared on the
    very numbers the final verdict would use: floating-point addition of non-positive numbers never raises
    the sum, and division by a larger count never lowers a non-positive quotient, rounding included.
    """

    def __init__(self, settings: CascadeSettings, max_tokens: int | None) -> None:
        self.settings = settings
        self.max_tokens = max_tokens
        self.logprobs: list[float] = []
        self.total = 0.0  # `logprob_sum(self.logprobs)`, kept as tokens arrive
        window = settings.window_tokens
        self.window = WindowSum(window, settings.confidence_threshold) if window else None
        self.settled: CascadeVerdict | None = None  # set once escalation can no longer be avoided

    def add(self, logprobs: Iterable[float]) -> bool:
        """Take the answer's next tokens; True once the verdict is settled as "escalate"."""
        if self.settled is not None:
            return True
        threshold = self.settings.confidence_threshold
        probe = self.settings.probe_tokens
        for logprob in logprobs:
            self.logprobs.append(logprob)
            self.total += logprob
            n = len(self.logprobs)
            if probe and n == probe and self.total / n < threshold:
                return self._settle(self.total / n)
            if self.settings.running_mean and self.total / n < threshold:
                return self._settle(self.total / n)
            if self.window is not None:
                # The window rule: the stretch just completed, or before the first one, the bound on it.
                stretch = self.window.push(logprob)
                if stretch is not None:
                    return self._settle(stretch)
                size = self.window.size
                if n < size and self.total / size < threshold:
                    return self._settle(self.total / size)
            elif self.max_tokens is not None and best_reachable_mean(self.total, self.max_tokens) < threshold:
                return self._settle(self.total / n)
        return False

    def _settle(self, confidence: float) -> bool:
        self.settled = CascadeVerdict(True, "low-confidence", confidence, self.settings.confidence_threshold)
        return True

    def verdict(self) -> CascadeVerdict:
        """The verdict on the answer: the settled one if the watch stopped it, else the finished answer's."""
        return self.settled or judge_edge_answer(self.logprobs, self.settings)


def prompt_fits_edge(prompt_tokens: int | None, settings: CascadeSettings) -> bool:
    """Whether the edge should try a prompt of this length (unknown length: let the edge decide)."""
    return prompt_tokens is None or prompt_tokens <= settings.max_edge_prompt_tokens
