"""A StepTrace's phases (serve/loop.py) read back: each phase's median host µs in the steps that admit and in the rest.

`python tests/bench/step_phases.py FILE` prints them for a trace an engine loop wrote (STRATUS_STEP_TRACE=FILE,
not a .json name); `gpu_profile_core.py --phases` and `bench_serve.py` (BENCH_STEP_TRACE) print the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

# A traced step: each phase's (host start, host end, device start, device end), µs from the trace's start.
Step = dict[str, list[Any]]


def steps_of(rows: list[list[Any]]) -> list[Step]:
    """The trace's rows ([phase, host start, host end, device start, device end], in the order phases ended) cut
    into steps: a loop's turn (from its `take` on: the step's phases, then its `emit`) where the loop's phases were
    traced, else each `step` and the phases that ended inside it (the engine core traced alone). A phase seen twice
    in a step keeps its first time."""
    turns = any(row[0] == "take" for row in rows)
    steps: list[Step] = []
    current: Step = {}
    for name, h0, h1, d0, d1 in rows:
        if turns and name == "take" and current:
            steps.append(current)
            current = {}
        current.setdefault(name, [h0, h1, d0, d1])
        if not turns and name == "step":
            steps.append(current)
            current = {}
    if turns and current:
        steps.append(current)
    return [s for s in steps if "step" in s]


def summary(rows: list[list[Any]]) -> list[str]:
    """Lines: each phase's median host µs over the steps that admit (a `prefill` in them) and over the rest, phases
    in the order they begin; where the device's times were traced, when it finished the admitting steps' prefill
    against when the host had queued it, handed the first tokens over (`first`) and ended the step."""

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.0f}" if values else "-"

    steps = steps_of(rows)
    admitting = [s for s in steps if "prefill" in s]
    lines = []
    for label, chosen in (("admitting", admitting), ("plain", [s for s in steps if "prefill" not in s])):
        if not chosen:
            continue
        names = sorted({n for s in chosen for n in s}, key=lambda n: min(s[n][0] for s in chosen if n in s))
        line = " ".join(f"{n} {med([s[n][1] - s[n][0] for s in chosen if n in s])}" for n in names)
        lines.append(f"phases, {label} steps ({len(chosen)}), host µs p50: {line}")
    if admitting and admitting[0]["prefill"][3] is not None:
        dev = med([s["prefill"][3] - s["prefill"][2] for s in admitting])
        queued = med([s["prefill"][2] - s["prefill"][0] for s in admitting])
        handed = med([s["first"][1] - s["prefill"][3] for s in admitting if "first" in s])
        ended = med([s["step"][1] - s["prefill"][3] for s in admitting])
        lines.append(f"  device: prefill (load + pass) {dev} µs, begun {queued} µs after the host queued it; first "
                     f"tokens handed over {handed} µs after the device had them, the step ended {ended} µs after")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trace", help="a StepTrace file (JSON of its phases)")
    args = parser.parse_args()
    with open(args.trace) as f:
        rows = json.load(f)["phases"]
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
