"""`make fuzz`: the request-mix fuzzer's long run against a live model server; writes its figures.

Runs tests/integration/workers/serve/test_request_mix.py under the `fuzz-soak` hypothesis profile (random,
STRATUS_FUZZ_EXAMPLES sequences of up to 10 waves each) and puts what it did (requests, interleavings,
invariant checks, failures) into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import report  # tests/bench/report.py (scripts run from this folder)

ROOT = Path(__file__).resolve().parents[2]
SECTION = "fuzz"
TEST = "tests/integration/workers/serve/test_request_mix.py::test_request_mix"


def render(figures: dict[str, object], examples: int) -> str:
    codes: dict[str, int] = figures["codes"]  # type: ignore[assignment]
    outcomes = ", ".join(f"{code} {count}" for code, count in sorted(codes.items(), key=lambda kv: -kv[1]))
    return "\n".join(
        [
            "## Request-mix fuzzer (`make fuzz`)",
            "",
            f"`{TEST}` under the `fuzz-soak` profile: {examples} random sequences of up to 10 waves of 1 to 8 "
            "concurrent requests against one live server process (tiny random model; at most 300 prompt tokens, "
            "40 new tokens, a batch of 4, a queue of 3), every invariant checked after every wave. "
            f"Machine: {report.machine()}; ran {float(figures['seconds']) / 60:.1f} min.",  # type: ignore[arg-type]
            "",
            "| requests | interleavings (waves) | invariant checks | greedy answers compared with the unbatched run "
            "| failures |",
            "|---|---|---|---|---|",
            f"| {figures['requests']} | {figures['waves']} | {figures['checks']} | {figures['greedy_compared']} "
            f"| {figures['failures']} |",
            "",
            f"Outcomes: {outcomes}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=int(os.environ.get("STRATUS_FUZZ_EXAMPLES", "200")))
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        figures_file = Path(tmp) / "figures.json"
        env = {
            **os.environ,
            "STRATUS_FUZZ_PROFILE": "fuzz-soak",
            "STRATUS_FUZZ_EXAMPLES": str(args.examples),
            "STRATUS_FUZZ_REPORT": str(figures_file),
        }
        command = [sys.executable, "-m", "pytest", TEST, "-q", "-s", "-p", "no:cacheprovider", "--timeout", "0"]
        code = subprocess.call(command, cwd=ROOT, env=env)
        if not figures_file.exists():
            print("the fuzzer wrote no figures", file=sys.stderr)
            return code or 1
        figures = json.loads(figures_file.read_text())
    body = render(figures, args.examples)
    print(body)
    if code == 0:
        report.write_section(args.write, SECTION, body, "# Reliability")
        print(f"wrote {args.write}")
    return code


if __name__ == "__main__":
    sys.exit(main())
