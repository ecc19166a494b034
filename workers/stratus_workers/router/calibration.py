"""Cascade calibration: pick the confidence threshold that keeps quality retention at a target.

Quality of an edge answer is judged by the cloud model itself: the cloud's mean per-token
log-likelihood of the edge's answer, relative to that of its own answer, as a probability ratio
capped at 1 (1.0 when the cloud finds the edge's answer as likely per token as its own; identical
answers score 1.0). An answer the cloud serves has quality 1.0 by definition, so retention at a
threshold t is the mean over prompts of the edge answer's quality where the edge's confidence
reaches t and 1.0 elsewhere. The chosen threshold serves the most prompts at the edge while
retention stays at or above the target. `answer_quality` (textual similarity) is the stricter
alternative, reported beside it by the benchmark.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass


def likelihood_quality(edge_mean_logprob: float, cloud_mean_logprob: float) -> float:
    """The cloud's per-token likelihood of the edge's answer relative to its own answer, capped at 1."""
    return min(1.0, math.exp(edge_mean_logprob - cloud_mean_logprob))


def answer_quality(edge: str, cloud: str) -> float:
    """Similarity of the edge's answer to the cloud's, in [0, 1]."""
    a, b = " ".join(edge.split()), " ".join(cloud.split())
    if a == b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


@dataclass(frozen=True)
class Sample:
    prompt: str
    confidence: float
    quality: float


@dataclass(frozen=True)
class CalibrationPoint:
    threshold: float
    edge_share: float
    retention: float


@dataclass(frozen=True)
class Calibration:
    threshold: float
    edge_share: float
    retention: float
    target: float
    curve: tuple[CalibrationPoint, ...]


def evaluate_threshold(samples: Sequence[Sample], threshold: float) -> CalibrationPoint:
    at_edge = [s for s in samples if s.confidence >= threshold]
    retention = (sum(s.quality for s in at_edge) + (len(samples) - len(at_edge))) / len(samples)
    return CalibrationPoint(threshold, len(at_edge) / len(samples), retention)


def choose_threshold(samples: Sequence[Sample], target: float) -> Calibration:
    """The lowest threshold (most edge traffic) whose retention is at least `target`."""
    if not samples:
        raise ValueError("calibration needs at least one prompt")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target retention {target} must be within (0, 1]")
    # Thresholds only matter at the observed confidences; 0.0 (nothing at the edge but certainties) always works.
    candidates = sorted({round(s.confidence, 6) for s in samples} | {0.0})
    curve = tuple(evaluate_threshold(samples, t) for t in candidates)
    passing = [p for p in curve if p.retention >= target]
    best = min(passing, key=lambda p: p.threshold)
    return Calibration(best.threshold, best.edge_share, best.retention, target, curve)
