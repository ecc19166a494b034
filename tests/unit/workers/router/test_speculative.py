"""The router's draft length adapts to what the cloud accepted."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from stratus_workers.router.speculative import next_draft_length

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[4]


def test_draft_length_adapts() -> None:
    assert next_draft_length(4, 4) == 5
    assert next_draft_length(8, 8, maximum=8) == 8
    # A rejection shortens the draft by one, never below what stuck plus one.
    assert next_draft_length(6, 1) == 5
    assert next_draft_length(6, 5) == 6
    assert next_draft_length(3, 0) == 2
    assert next_draft_length(1, 0) == 1
    assert next_draft_length(2, 0, minimum=2) == 2
    assert next_draft_length(16, 12, maximum=8) == 8


def test_draft_length_follows_a_run_of_rejections_down_and_back_up() -> None:
    k, seen = 8, []
    for accepted in (0, 0, 0, 0, 0, 0, 0, 0):
        k = next_draft_length(k, accepted, maximum=12)
        seen.append(k)
    assert seen == [7, 6, 5, 4, 3, 2, 1, 1]
    for _ in range(3):
        k = next_draft_length(k, k, maximum=12)
    assert k == 4


def test_the_docs_figures_for_the_rule_are_the_stored_runs() -> None:
    """docs/cooperation.md's figures for this rule's stored run are what docs/bench-data/coop-q8.json holds (the
    tokens a round as `make bench-coop` counts them: the accepted ones plus the cloud's own, every round)."""
    answers = json.loads((ROOT / "docs" / "bench-data" / "coop-q8.json").read_text())["answers"]
    runs: dict[tuple[str, float], list[dict[str, float]]] = defaultdict(list)
    for answer in answers:
        runs[answer["label"], answer["delay_ms"]].append(answer)

    def total(run: list[dict[str, float]], key: str) -> float:
        return sum(answer[key] for answer in run)

    speculative = {key: run for key, run in runs.items() if key[0].startswith("speculative")}
    rounds = total(speculative["speculative", 0.0], "rounds")
    accepted = total(speculative["speculative", 0.0], "accepted")
    drafted = total(speculative["speculative", 0.0], "drafted")
    cpu = {key: total(run, "cloud_cpu_ms") / total(run, "tokens") for key, run in runs.items()}
    own = [cpu[key] for key in cpu if key[0].startswith("speculative")]
    cloud = [cpu[key] for key in cpu if key[0] == "cloud-only"]
    ratios = [cpu[key] / cpu["cloud-only", key[1]] for key in speculative]
    stored = (
        f"{(accepted + rounds) / rounds:.2f} tokens a round, {accepted / drafted:.0%} of draft tokens accepted, "
        f"{min(own):.1f}–{max(own):.1f} cloud CPU-ms per token against cloud-only's {min(cloud):.1f}–"
        f"{max(cloud):.1f} ({min(ratios):.2f}–{max(ratios):.2f}×)"
    )
    doc = " ".join((ROOT / "docs" / "cooperation.md").read_text().split())
    assert stored in doc
