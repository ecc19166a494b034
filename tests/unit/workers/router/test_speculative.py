"""The router's draft length adapts to what the cloud accepted."""

from __future__ import annotations

import pytest

from stratus_workers.router.speculative import next_draft_length

pytestmark = pytest.mark.unit


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
