"""Liveness probe details: how many deployments this process serves, by phase."""

from __future__ import annotations

from typing import Any

from stratus_operator.runtime import runtime_of


def probe(memo: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for phase in runtime_of(memo).phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    return counts
