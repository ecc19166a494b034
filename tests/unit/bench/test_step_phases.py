"""step_phases: a StepTrace read back step by step, admitting steps apart from the rest."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.unit


def loop_turn(t0: float, admit: bool) -> list[list[Any]]:
    """One engine loop turn's rows as StepTrace writes them (each phase when it ends, inner ones first): take, gather,
    the step (with a prefill and the join where it admits, else a decode), emit. Host times from `t0`, no device."""
    rows = [["take", t0, t0 + 5, None, None], ["gather", t0 + 5, t0 + 6, None, None],
            ["admit", t0 + 7, t0 + 8, None, None]]  # fmt: skip
    if admit:
        rows += [["prefill", t0 + 8, t0 + 108, None, None], ["join", t0 + 108, t0 + 308, None, None]]
    else:
        rows += [["decode", t0 + 8, t0 + 58, None, None]]
    end = t0 + (310 if admit else 60)
    return [*rows, ["step", t0 + 6, end, None, None], ["emit", end, end + 40, None, None]]


def test_a_loops_trace_is_cut_at_each_turn_and_its_emit_stays_with_its_step() -> None:
    import step_phases

    rows = [*loop_turn(0, True), *loop_turn(400, False), *loop_turn(500, False), *loop_turn(600, True)]
    steps = step_phases.steps_of(rows)
    assert [("prefill" in s, s["emit"][1] - s["emit"][0]) for s in steps] == [(True, 40)] * 1 + [(False, 40)] * 2 + [
        (True, 40)
    ]
    lines = step_phases.summary(rows)
    assert lines[0].startswith("phases, admitting steps (2), host µs p50: take 5 gather 1 step 304 admit 1 prefill 100")
    assert lines[1].startswith("phases, plain steps (2), host µs p50: take 5 gather 1 step 54 admit 1 decode 50")


def test_the_engine_core_traced_alone_is_cut_after_each_step() -> None:
    import step_phases

    rows = [row for turn in (loop_turn(0, True), loop_turn(400, False)) for row in turn if row[0] not in
            ("take", "gather", "emit")]  # fmt: skip
    assert [sorted(s) for s in step_phases.steps_of(rows)] == [
        ["admit", "join", "prefill", "step"], ["admit", "decode", "step"]
    ]
