"""`make bench-frontend`: the frontend's CPU per Verify call through an engine process, before and after, one run.

A real `AsyncEngine` over a `ProcessTransport` (the engine loop in a process of its own, as on CUDA) with the tiny
random model (`stratus_workers.models.tiny.TINY` with a 512-token vocabulary, so that a step is short; float32 on the
CPU) and `--sessions` speculative sessions, each a coroutine making greedy Verify calls round after round (an 8-token
draft of random ids, its context growing by what the verdict accepted; with `--sampled`, at temperature 1 with each
draft token's distribution over 32 ids, as the edge sends them). Measured in the frontend's process only, over the
measured rounds: its CPU time (`getrusage`, user and system, every thread of it) per call, less what it spends idle over
as long (measured for a second before: supervision and the engine's heartbeats, a cost per second, not per call). That
is what the H200's rounds spend between engine steps (delivering the verdicts to their callers, taking the next calls
and sending them); the engine process's CPU is not counted (the model's step is most of it). The "before" is another
tree's `stratus_workers` (`--before REF`, by default c406b5e, the tree before the per-call cuts: `git archive` of its
workers/ put first on PYTHONPATH, for this process and the engine process it starts), run by this same script in
turn with this tree's, best of `--repeat` interleaved runs each. `--profile DIR` writes each variant's cProfile of
the measured rounds (its top entries by own time).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import json
import os
import pstats
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import report  # tests/bench/report.py (scripts run from this folder)

ROOT = Path(__file__).resolve().parents[2]
SECTION = "bench-frontend"
VOCAB = 512  # the model's (its tokenizer is the bundled one; every id drawn here is below VOCAB)
TOKENS = 200  # draft ids drawn from these
IDLE_SECONDS = 1.0
TOP = 32  # ids in each draft distribution (--sampled), as the edge's top-k sends them


Round = tuple[list[int], list[Any]]  # a Verify call's draft and its distributions


def inputs(sessions: int, rounds: int, draft: int, seed: int, sampled: bool) -> list[tuple[list[int], list[Round]]]:
    """Each session's first context and its rounds' drafts (with `sampled`, each draft token's distribution over
    TOP ids, the token among them), drawn before the clock runs (they are the client's work)."""
    from stratus_workers.serve.surface import SparseDist

    rng = random.Random(seed)

    def dist(token: int) -> SparseDist:
        ids = [token, *rng.sample([t for t in range(TOKENS) if t != token], TOP - 1)]
        weights = [rng.random() + 0.01 for _ in ids]
        return SparseDist(tuple(ids), tuple(w / sum(weights) for w in weights))

    def one() -> Round:
        tokens = [rng.randrange(TOKENS) for _ in range(draft)]
        return tokens, [dist(t) for t in tokens] if sampled else []

    return [([rng.randrange(TOKENS) for _ in range(64)], [one() for _ in range(rounds)]) for _ in range(sessions)]


async def session(
    engine: Any, sid: str, context: list[int], rounds: list[Round], sampled: bool, counts: list[int]
) -> None:
    from stratus_workers.protocol.requests import Sampling

    sampling = Sampling(temperature=1.0, seed=int(sid[1:])) if sampled else Sampling()
    for guess, dists in rounds:
        verdict = await engine.verify(sid, context, guess, dists, sampling)
        context += guess[: verdict.accepted]
        context.append(verdict.next_token)
        counts[0] += 1
        counts[1] += verdict.accepted
    await engine.end_session(sid)


async def measure(
    model_dir: str, sessions: int, warmup: int, rounds: int, draft: int, sampled: bool, profile: str
) -> dict[str, Any]:
    import stratus_workers
    from stratus_workers.models import load_model
    from stratus_workers.serve.engine import AsyncEngine, ProcessTransport
    from stratus_workers.serve.loop import EngineSettings

    settings = EngineSettings(
        max_batch_size=1, max_sessions=sessions, max_tokens=64 + (warmup + rounds) * (draft + 1) + 16, threads=1,
        warmup=False, log_format="text",
    )  # fmt: skip
    load = functools.partial(load_model, model_dir, dtype="float32", device="cpu")
    engine = AsyncEngine(ProcessTransport(settings, load), max_batch_size=1)
    await engine.start()
    try:
        counts = [0, 0]
        first = inputs(sessions, warmup, draft, 0, sampled)
        await asyncio.gather(*(session(engine, f"w{n}", *first[n], sampled, counts) for n in range(sessions)))
        measured = inputs(sessions, rounds, draft, 1, sampled)
        # What the frontend spends while nothing is asked (supervision, the engine's heartbeats), per second: the
        # table takes it off each call's share of the measured rounds' time.
        usage, idle = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.sleep(IDLE_SECONDS)
        idle_rate = cpu_seconds(usage) / (time.perf_counter() - idle)
        counts = [0, 0]
        profiler = cProfile.Profile() if profile else None
        steps = engine.steps
        usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        await asyncio.gather(*(session(engine, f"s{n}", *measured[n], sampled, counts) for n in range(sessions)))
        if profiler is not None:
            profiler.disable()
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
        user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
        steps = engine.steps - steps
    finally:
        await engine.stop()
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        Path(profile).write_text(text.getvalue())  # noqa: ASYNC240 - after the measurement, the engine stopped
    calls = counts[0] + sessions  # the Verify calls and each session's end_session
    return {
        "package": str(Path(stratus_workers.__file__).parent),
        "calls": calls,
        "steps": steps,
        "cpu_us_per_call": (user + system) / calls * 1e6,
        "net_us_per_call": (user + system - idle_rate * wall) / calls * 1e6,
        "idle_us_per_call": idle_rate * wall / calls * 1e6,
        "wall_us_per_call": wall / calls * 1e6,
        "accepted_per_call": counts[1] / counts[0],
    }


def cpu_seconds(since: Any) -> float:
    """This process's CPU seconds (user and system, every thread) since the `getrusage` reading `since`."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return now.ru_utime - since.ru_utime + now.ru_stime - since.ru_stime


def before_tree(ref: str, into: Path) -> tuple[Path, str]:
    """`ref`'s workers/ unpacked under `into` (its package dir) and the commit it names."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "workers"], check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "workers", commit


def run_variant(args: argparse.Namespace, model_dir: Path, pythonpath: Path | None, profile: str) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH", "")]))
    command = [
        sys.executable, __file__, "--worker", str(model_dir), "--sessions", str(args.sessions), "--rounds",
        str(args.rounds), "--warmup", str(args.warmup), "--draft", str(args.draft), "--profile-to", profile,
        *(["--sampled"] if args.sampled else []),
    ]  # fmt: skip
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds of every session")
    parser.add_argument("--warmup", type=int, default=3, help="rounds before the measured ones (other sessions)")
    parser.add_argument("--draft", type=int, default=8)
    parser.add_argument("--sampled", action="store_true", help=f"temperature 1, each draft token's {TOP}-id dist")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each variant; the best is kept")
    parser.add_argument(
        "--before", default="c406b5e",
        help="the git ref whose stratus_workers is the 'before' (default: the tree before the per-call cuts)",
    )
    parser.add_argument("--profile", default="", help="a folder for each variant's cProfile text")
    parser.add_argument("--write", type=Path, help="put the table in this markdown file (its own section)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = asyncio.run(
            measure(args.worker, args.sessions, args.warmup, args.rounds, args.draft, args.sampled, args.profile_to)
        )
        print(json.dumps(result))
        return
    from stratus_workers.models.tiny import TINY, bundled_tokenizer, random_llama

    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as tmp:
        model_dir = Path(tmp) / "model"  # TINY with a 512-token vocabulary: a short engine step
        random_llama(dict(TINY), vocab_size=VOCAB, seed=0).save_pretrained(model_dir)
        bundled_tokenizer().save_pretrained(model_dir)
        old, commit = before_tree(args.before, Path(tmp) / "before")
        named = args.before if commit.startswith(args.before) else f"{args.before}, {commit}"
        variants: dict[str, Path | None] = {f"before ({named})": old, "after (this tree)": None}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for n in range(args.repeat):
            for name, path in variants.items():
                profile = ""
                if args.profile and n == 0:
                    Path(args.profile).mkdir(parents=True, exist_ok=True)
                    which = f"{'-sampled' if args.sampled else ''}-{'before' if path else 'after'}"
                    profile = str(Path(args.profile) / f"frontend-profile{which}.txt")
                result = run_variant(args, model_dir, path, profile)
                print(f"{name}: {json.dumps(result)}", file=sys.stderr)
                results[name].append(result)
    kind = "sampled (temperature 1)" if args.sampled else "greedy"
    with_dists = f", each token's {TOP}-id distribution" if args.sampled else ""
    lines = [
        f"{report.cpu_name()}; {report.machine()}; {args.sessions} sessions x {args.rounds} rounds of {kind} Verify "
        f"calls ({args.draft}-token drafts{with_dists}) through an engine process (tiny model, vocabulary {VOCAB}, "
        f"CPU); the frontend process's CPU per call, less what it spends idle over as long (supervision, "
        f"heartbeats); best of {args.repeat} interleaved runs by that, and their median (the profiled first run left "
        f"out with --profile)",
        "",
        "| frontend | CPU µs/call, best | median | idle's share (taken off) | wall µs/call | engine steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in results.items():
        kept = [r for i, r in enumerate(runs) if not (args.profile and i == 0)] or runs
        best = min(kept, key=lambda r: r["net_us_per_call"])
        median = statistics.median(r["net_us_per_call"] for r in kept)
        lines.append(
            f"| {name} | {best['net_us_per_call']:.1f} | {median:.1f} | {best['idle_us_per_call']:.1f} | "
            f"{best['wall_us_per_call']:.0f} | {best['steps']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        title = f"## The frontend's CPU per {kind.split()[0]} Verify call (`make bench-frontend`)"
        report.write_section(args.write, SECTION + ("-sampled" if args.sampled else ""), f"{title}\n\n{table}")


if __name__ == "__main__":
    main()
