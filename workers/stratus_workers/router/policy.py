"""Routing decisions as pure functions: the edge's confidence signal and the cascade's verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stratus_workers.router.config import CascadeSettings


def mean_logprob(logprobs: Sequence[float]) -> float:
    """The edge answer's mean token log-probability; an empty answer counts as certain (0.0)."""
    return sum(logprobs) / len(logprobs) if logprobs else 0.0


@dataclass(frozen=True)
class CascadeVerdict:
    escalate: bool
    reason: str
    confidence: float
    threshold: float


def judge_edge_answer(logprobs: Sequence[float], settings: CascadeSettings) -> CascadeVerdict:
    """Keep the edge's answer when its confidence reaches the threshold, else escalate."""
    confidence = mean_logprob(logprobs)
    threshold = settings.confidence_threshold
    if confidence >= threshold:
        return CascadeVerdict(False, "confident", confidence, threshold)
    return CascadeVerdict(True, "low-confidence", confidence, threshold)


def prompt_fits_edge(prompt_tokens: int | None, settings: CascadeSettings) -> bool:
    """Whether the edge should try a prompt of this length (unknown length: let the edge decide)."""
    return prompt_tokens is None or prompt_tokens <= settings.max_edge_prompt_tokens
