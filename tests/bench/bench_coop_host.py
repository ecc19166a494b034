"""`make bench-coop-host`: the host's (Python's) share of a batched verification round, measured on the CPU.

A tiny random model (`stratus_workers.models.tiny.TINY` with a small vocabulary, so that the model's own work
is small) on the fused runner (STRATUS_FAST_PATH=1: the packed verification pass the GPU runs, on the CPU),
an `EngineCore` with N speculative sessions. Each session's answer is first recorded through verification
(rounds of empty drafts, as `bench_coop_cloud.py --transcript verify`); then every round each session sends
the next `--draft` tokens of it as a Verify call, corrupted so that `--acceptance` of the draft tokens are
accepted, and one engine step verifies them all. Reported per round and per session: the step's host time
split into its parts (each part's own time, its callees' excluded), and the frontend's per-call work that
no engine step shows (the Verify request's protobuf parse and checks, the core's queueing of the call, the
reply's protobuf). Nothing here waits on a device: on a GPU the same host work runs while the device
computes, or before it can start.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import os
import platform
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("STRATUS_FAST_PATH", "1")  # the fused runner, whose packed pass the GPU runs

import report  # tests/bench/report.py (scripts run from this folder)
import torch
from bench_coop_cloud import corrupt, match_for

# The parts of a Verify step, each a method that may exist (the names of the code measured): each part's own
# time, without the parts it calls.
PARTS: dict[str, list[tuple[str, str]]] = {
    "open sessions, check calls": [
        ("sessions", "_open"),
        ("sessions", "_open_many"),
        ("sessions", "_check_verify"),
    ],
    "pack the pass's inputs": [
        ("runner", "forward_rows"),
        ("runner", "forward_rows_greedy"),
        ("runner", "_packed"),
        ("runner", "_packed_hidden"),
        ("runner", "_packed_inputs_for"),
    ],
    "forward (model)": [("runner", "_packed_body"), ("runner", "head")],
    # The acceptance rule's tensor work (the device's, on a GPU; the CPU computes it here): not host cost.
    "acceptance rule's tensor math": [
        ("sessions_module", "greedy_verdicts"),
        ("sessions_module", "sampling_probs_rows"),
        ("runner", "_verdicts"),
    ],
    "acceptance rule, verdicts": [
        ("sessions", "_judge_greedy"),
        ("sessions", "_queue_greedy"),
        ("sessions", "_greedy_plan"),
        ("sessions", "_greedy_judged"),
        ("sessions", "_judge_sampled"),
    ],
    "rollback, lengths": [
        ("sessions", "_settle"),
        ("sessions", "_settle_many"),
        ("sessions", "_cut"),
        ("runner", "truncate"),
        ("runner", "truncate_rows"),
        ("runner", "reset"),
        ("cache", "set_row_lengths"),
        ("cache", "set_length"),
    ],
    "verify_many (rest)": [
        ("sessions", "verify_many"),
        ("sessions", "_verify_rows"),
        ("sessions", "launch"),
        ("sessions", "finish"),
        ("sessions", "_launch_rows"),
        ("sessions", "_finish_rows"),
    ],
    "step (rest)": [("core", "step")],
}


class Parts:
    """Exclusive host time per part: a wrapper around each method, a stack of the parts running; `lap` closes a
    round (its parts' times are kept per round: the table shows medians, steadier than means on a busy host)."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.ns: collections.Counter[str] = collections.Counter()
        self.rounds: list[collections.Counter[str]] = []
        self._stack: list[list[int]] = []  # per running part: [its callees' time]
        for part, methods in PARTS.items():
            for owner, name in methods:
                obj = objects[owner]
                if hasattr(obj, name):
                    setattr(obj, name, self._wrap(part, getattr(obj, name)))

    def _wrap(self, part: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([0])
            t0 = time.perf_counter_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                spent = time.perf_counter_ns() - t0
                children = self._stack.pop()[0]
                self.ns[part] += spent - children
                if self._stack:
                    self._stack[-1][0] += spent

        return timed

    def lap(self) -> None:
        self.rounds.append(self.ns)
        self.ns = collections.Counter()

    def medians_us(self) -> dict[str, float]:
        return {part: statistics.median(r[part] for r in self.rounds) / 1e3 for part in PARTS}


def build(sessions: int, vocab: int, max_len: int, seed: int) -> Any:
    """An engine core of one decode row and `sessions` session rows over a tiny random model."""
    from stratus_workers.models.tiny import TINY, random_llama
    from stratus_workers.serve.core import EngineCore
    from stratus_workers.serve.runner.build import build_runner
    from stratus_workers.serve.sessions import SpeculativeSessions

    model = random_llama(dict(TINY), vocab_size=vocab, seed=seed, init_std=0.3)
    runner = build_runner(model, max_rows=1 + sessions, max_len=max_len, cuda_graphs=False, compile=False)
    eos = frozenset({int(model.config.eos_token_id)})
    # Each round's results from its own step: the verify pipeline moves no host work, it overlaps it with a
    # device's (bench_coop_cloud.py measures that), and a CPU has none.
    pool = SpeculativeSessions(runner, eos, first_row=1)
    return EngineCore(runner, pool, eos, max_batch_size=1, verify_pipeline=False)


def step_results(core: Any) -> dict[int, Any]:
    out = core.step()
    results = {}
    for call_id, error, result in out.results:
        if error:
            raise RuntimeError(f"call {call_id} failed: {error}: {result}")
        results[call_id] = result
    return results


def record(core: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy answer as verification computes it (rounds of empty drafts, all sessions a step)."""
    from stratus_workers.protocol.requests import Sampling

    answers: list[list[int]] = [[] for _ in prompts]
    live = set(range(len(prompts)))
    while live:
        for i in sorted(live):
            core.call(i, "verify", (f"record-{i}", [*prompts[i], *answers[i]], [], (), Sampling(), False))
        for i, verdict in step_results(core).items():
            answers[i].append(verdict.next_token)
            if verdict.eos or len(answers[i]) >= new_tokens:
                live.discard(i)
    for i in range(len(prompts)):
        core.sessions.end(f"record-{i}")
    return answers


@contextmanager
def profiled(enabled: bool, top: int) -> Iterator[None]:
    if not enabled:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(top)


def frontend_call_ns(core: Any, context: list[int], draft: list[int], repeat: int) -> dict[str, float]:
    """ns per Verify call of the frontend's own work around the engine: the request's protobuf parse and the
    servicer's checks and conversions, the core's queueing of the call, the reply's protobuf."""
    from stratus_workers.api import inference_pb2 as pb
    from stratus_workers.serve import server
    from stratus_workers.serve.surface import VerifyResult

    # Before the handler's checks and reply were functions of their own (main at 72e1bb6): the same steps, inline.
    arguments = getattr(server, "verify_arguments", None) or _handler_arguments_72e1bb6
    respond = getattr(server, "verify_response", None) or _handler_response_72e1bb6
    wire = pb.VerifyRequest(session_id="bench-frontend", context=context, draft=draft).SerializeToString()
    result = VerifyResult(len(draft) - 1, 7, tuple(-0.5 for _ in draft), False)
    ns: collections.Counter[str] = collections.Counter()
    for i in range(repeat):
        t0 = time.perf_counter_ns()
        request = pb.VerifyRequest.FromString(wire)
        args = arguments(request)
        t1 = time.perf_counter_ns()
        core.call(i, "verify", (*args[:-1], False))
        t2 = time.perf_counter_ns()
        respond(result).SerializeToString()
        t3 = time.perf_counter_ns()
        ns["request: parse, check, convert"] += t1 - t0
        ns["engine core: queue the call"] += t2 - t1
        ns["reply: build, serialize"] += t3 - t2
    core._verifies.clear()  # queued only to time the queueing
    return {k: v / repeat for k, v in ns.items()}


def _handler_arguments_72e1bb6(request: Any) -> tuple[Any, ...]:
    """What InferenceServicer.Verify did with a request before `server.verify_arguments` (for a "before" run)."""
    from stratus_workers.protocol.requests import MAX_SPECULATIVE_TOKENS, session_sampling
    from stratus_workers.serve.surface import SparseDist

    if len(request.draft) > MAX_SPECULATIVE_TOKENS:
        raise ValueError("too many draft tokens")
    sampling = session_sampling(request.sampling)
    dists = [SparseDist(tuple(d.token_ids), tuple(d.probs)) for d in request.distributions]
    if not sampling.greedy and len(dists) != len(request.draft):
        raise ValueError("a sampled draft needs one distribution per draft token")
    if any(len(d.token_ids) != len(d.probs) for d in dists):
        raise ValueError("each distribution needs one probability per token id")
    return request.session_id, list(request.context), list(request.draft), dists, sampling, request.end_session


def _handler_response_72e1bb6(result: Any) -> Any:
    """The reply InferenceServicer.Verify built before `server.verify_response` (for a "before" run)."""
    from stratus_workers.api import inference_pb2 as pb

    return pb.VerifyResponse(
        accepted=result.accepted, next_token=result.next_token, logprobs=result.logprobs, eos=result.eos
    )


def measure(args: argparse.Namespace, sessions: int) -> dict[str, Any]:
    from stratus_workers.protocol.requests import Sampling

    rng = random.Random(sessions)
    core = build(sessions, args.vocab, args.prompt_tokens + args.new_tokens + args.draft + 8, args.seed)
    vocab = core.runner.vocab_size
    eos = next(iter(core.eos))
    prompts = [[rng.choice([t for t in range(3, vocab)]) for _ in range(args.prompt_tokens)] for _ in range(sessions)]
    answers = record(core, prompts, args.new_tokens)
    # The replayed answers stop short of an eos: every session runs the same number of rounds.
    answers = [a[: a.index(eos)] if eos in a else a for a in answers]
    match = match_for(args.acceptance, args.draft)
    from stratus_workers.serve import sessions as sessions_module

    objects = {"core": core, "sessions": core.sessions, "runner": core.runner, "cache": core.runner.cache}
    parts = Parts(objects | {"sessions_module": sessions_module})
    greedy = Sampling()
    rounds = calls = drafted = accepted = 0
    step_ns: list[int] = []
    same = 0
    with profiled(args.cprofile and sessions == max(args.sessions), args.cprofile_top):
        for repeat in range(args.repeats):  # each replay from a fresh session (its first call sends the prompt)
            out: list[list[int]] = [[] for _ in prompts]
            while True:
                live = [i for i in range(sessions) if len(out[i]) < len(answers[i]) - 1]
                if not live:
                    break
                proposals = {}
                for i in live:
                    n = len(out[i])
                    draft = answers[i][n : n + args.draft][: len(answers[i]) - n - 1]
                    proposals[i] = corrupt(draft, match, vocab, rng)
                    call = (f"s{repeat}-{i}", [*prompts[i], *out[i]], proposals[i], (), greedy, False)
                    core.call(i, "verify", call)
                t0 = time.perf_counter_ns()
                results = step_results(core)
                step_ns.append(time.perf_counter_ns() - t0)
                parts.lap()
                for i, verdict in results.items():
                    out[i] += [*proposals[i][: verdict.accepted], verdict.next_token]
                    drafted += len(proposals[i])
                    accepted += verdict.accepted
                rounds += 1
                calls += len(live)
            for i in range(sessions):
                core.sessions.end(f"s{repeat}-{i}")
            # The verdicts are the recorded answers' (each round's accepted tokens and the cloud's own token).
            same += sum(o[: len(a)] == a[: len(o)] for o, a in zip(out, answers, strict=True))
    same //= args.repeats
    frontend = frontend_call_ns(core, [*prompts[0], *answers[0][:64]], answers[0][64 : 64 + args.draft], 2000)
    return {
        "sessions": sessions,
        "rounds": rounds,
        "calls": calls,
        "acceptance": accepted / max(1, drafted),
        "same_as_recorded": same / sessions,
        "step_us_per_round": statistics.median(step_ns) / 1e3,
        "parts_us_per_round": parts.medians_us(),
        "calls_per_round": calls / rounds,
        "frontend_us_per_call": {k: v / 1e3 for k, v in frontend.items()},
    }


async def between_steps(args: argparse.Namespace, sessions: int) -> dict[str, float]:
    """The engine loop's time between Verify steps, as `bench_coop_cloud.py --profile` measures it on a GPU: the
    same model behind the serving frontend's engine (`AsyncEngine`, the core in a thread), `sessions` sessions
    replaying their recorded answers through `engine.verify` (bench_coop_cloud's own session loop). Between two
    steps: the step's output delivered to the event loop, every caller woken, its next call made (the replay's
    own drafting, a few µs a call, included) and queued to the engine thread, which takes the calls in."""
    import bench_coop_cloud

    from stratus_workers.models.loader import LoadedModel
    from stratus_workers.models.tiny import TINY, bundled_tokenizer, random_llama
    from stratus_workers.serve.engine import AsyncEngine, ThreadTransport
    from stratus_workers.serve.loop import EngineSettings

    model = random_llama(dict(TINY), vocab_size=args.vocab, seed=args.seed, init_std=0.3)
    if args.tokenizer:  # the frontend's engine wants a tokenizer (its end-of-sequence ids); its vocabulary is unused
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = bundled_tokenizer()
    loaded = LoadedModel(model, tokenizer, "tiny", "random-init", torch.float32, torch.device("cpu"))
    settings = EngineSettings(
        max_batch_size=sessions,
        max_tokens=args.prompt_tokens + args.new_tokens + args.draft + 8,
        max_sessions=sessions,
        prefix_cache_tokens=0,
    )
    engine = AsyncEngine(ThreadTransport(settings, loaded=loaded), max_batch_size=sessions, max_queue=4 * sessions)
    await engine.start()
    try:
        rng = random.Random(sessions)
        prompts = [[rng.randrange(3, args.vocab) for _ in range(args.prompt_tokens)] for _ in range(sessions)]
        answers = await bench_coop_cloud.verified(engine, prompts, args.new_tokens)
        profile = bench_coop_cloud.StepProfile(engine.transport.core)  # type: ignore[attr-defined]
        match = match_for(args.acceptance, args.draft)
        for repeat in range(args.repeats):
            await bench_coop_cloud.speculative(
                engine, prompts, answers, draft=args.draft, match=match, vocab=args.vocab, seed=repeat
            )
        took = profile.take()
        profile.close()
    finally:
        await engine.stop()
    per_step = took["per step ms"]
    return {"between steps": per_step.get("between steps", 0.0) * 1e3, "step": per_step.get("step", 0.0) * 1e3}


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"{meta['cpu']}, {meta['threads']} torch threads; tiny random model (vocabulary {meta['vocab']}), fused "
        f"runner on the CPU; prompts of {meta['prompt_tokens']} tokens, {meta['new_tokens']} new tokens, "
        f"{meta['draft']}-token drafts at {meta['acceptance']:.0%} acceptance; torch {meta['torch']}, Python "
        f"{meta['python']}; {meta['date']}{'; ' + meta['label'] if meta['label'] else ''}.",
        "",
        "| part (host µs, median round) | "
        + " | ".join(f"{r['sessions']} sessions: per round | per call" for r in rows)
        + " |",
        "|---|" + "---|---|" * len(rows),
    ]
    names = list(PARTS)

    def cells(values: list[tuple[float, float]]) -> str:
        return " | ".join(f"{a:.0f} | {b:.1f}" for a, b in values)

    for name in names:
        values = [
            (r["parts_us_per_round"].get(name, 0.0), r["parts_us_per_round"].get(name, 0.0) / r["calls_per_round"])
            for r in rows
        ]
        lines.append(f"| {name} | {cells(values)} |")
    total = [(r["step_us_per_round"], r["step_us_per_round"] / r["calls_per_round"]) for r in rows]
    lines.append(f"| **engine step, all** | {cells(total)} |")
    device = ("forward (model)", "acceptance rule's tensor math")  # the device's work on a GPU
    host = [sum(v for k, v in r["parts_us_per_round"].items() if k not in device) for r in rows]
    lines.append(
        "| **engine step, host parts (sum of all but the two device rows)** | "
        + cells([(h, h / r["calls_per_round"]) for h, r in zip(host, rows, strict=True)])
        + " |"
    )
    if all("between_steps_us" in r for r in rows):
        gaps = [(r["between_steps_us"], r["between_steps_us"] / r["calls_per_round"]) for r in rows]
        lines.append(f"| **frontend and engine loop: between two steps (mean)** | {cells(gaps)} |")
    for name in rows[0]["frontend_us_per_call"]:
        values = [
            (r["frontend_us_per_call"][name] * r["calls_per_round"], r["frontend_us_per_call"][name]) for r in rows
        ]
        lines.append(f"| frontend: {name} | {cells(values)} |")
    lines.append(
        "| (rounds, calls a round, acceptance, verdicts as recorded) | "
        + " | ".join(
            f"{r['rounds']}, {r['calls_per_round']:.1f}, {r['acceptance']:.1%} | {r['same_as_recorded']:.0%}"
            for r in rows
        )
        + " |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    parser.add_argument("--vocab", type=int, default=512, help="the tiny model's vocabulary (small: host cost shows)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--draft", type=int, default=8)
    parser.add_argument("--acceptance", type=float, default=0.96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="replays of the answers (rounds measured: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the host's own cost, steadier)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the bundled model's GGUF)")
    parser.add_argument("--no-loop", action="store_true", help="skip the engine loop's time between steps")
    parser.add_argument("--cprofile", action="store_true", help="cProfile the largest run's rounds (stderr)")
    parser.add_argument("--cprofile-top", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--label", default="", help="what was measured (a commit), for the table's caption")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {
        "cpu": report.cpu_name(),
        "threads": args.threads,
        "vocab": args.vocab,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "draft": args.draft,
        "acceptance": args.acceptance,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "label": args.label,
    }
    with torch.inference_mode():
        rows = [measure(args, n) for n in args.sessions]
    if not args.no_loop:
        for row in rows:
            row["between_steps_us"] = asyncio.run(between_steps(args, row["sessions"]))["between steps"]
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
