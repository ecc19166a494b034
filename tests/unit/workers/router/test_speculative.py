"""The router's draft length adapts to what the cloud accepted."""

from __future__ import annotations

import pytest

from stratus_workers.router.speculative import next_draft_length

pytestmark = pytest.mark.unit


def test_draft_length_adapts() -> None:
    assert next_draft_length(4, 4) == 5
    assert next_draft_length(8, 8, maximum=8) == 8
    assert next_draft_length(6, 1) == 2
    assert next_draft_length(3, 0) == 1
    assert next_draft_length(16, 12, maximum=8) == 8
