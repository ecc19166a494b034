"""`make bench-coop-cloud`: the cloud side of speculative decoding alone, against cloud-only streams.

For each concurrency C: C cloud-only streams (greedy, `--new-tokens` each) through the engine a server
runs, then C speculative sessions replaying those streams as drafts: each round sends the next `--draft`
tokens of the session's recorded cloud answer, each token corrupted (replaced by another) with the
probability that makes the share of draft tokens accepted `--acceptance` (the share measured with real
weights by `make bench-coop`), so random weights do not make acceptance meaningless. The edge costs
nothing here: this measures what the cloud's GPU does per generated token. Reported: generated tokens/s
(cloud-only) and accepted tokens/s (speculative: accepted draft tokens plus the cloud's own token per round),
forward passes per token, and the acceptance reached.

Random-init weights (speed does not depend on their values), the bundled tokenizer's vocabulary. The engine's
verify pipeline (docs/serving.md) is on by default in an engine process on CUDA and off in a thread engine (where it
measured slower on an H200 at 64 sessions); `--verify-pipeline on|off` overrides, and the run's meta records which.
On the CPU (a check that it runs, not a measurement):
`--model tiny --device cpu --dtype float32 --concurrency 1,16 --new-tokens 32 --profile`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import inspect
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import report  # tests/bench/report.py (scripts run from this folder)
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SECTION = "bench-coop-cloud"
ENGINES = {"thread": "in a thread of the benchmark's process", "process": "in an engine process of its own"}
ARCHS = {"135m": "SMOLLM2_135M", "1b": "SMOLLM2_1B", "tiny": "TINY"}


def load_random(
    model: str, *, dtype: str, device: str, tf32: bool, embed_std: float = 0.0, tokenizer: str | None = None
) -> Any:
    """The random-init model as a models.LoadedModel, built where it runs (a 1B model's random init on the
    host takes a while); picklable as a partial, so an engine process builds the same one.

    With `embed_std`, the (tied) embedding is drawn at that scale instead: the input token then dominates
    the residual stream, so the model repeats its last token with a wide margin over the next choice, and
    rounding (bfloat16) no longer flips its choices between a decode step and a verification of another
    shape. Speed does not depend on the values."""
    from stratus_workers.models import tiny as tiny_models

    if tf32:  # float32 storage, TensorFloat-32 matrix products (both sides of the comparison alike)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.device(device):
        loaded = tiny_models.random_loaded(
            dict(getattr(tiny_models, ARCHS[model])), dtype=dtype, device=device, tokenizer_dir=tokenizer
        )
    if embed_std:
        with torch.no_grad():
            gen = torch.Generator(device=loaded.model.device).manual_seed(1)
            weight = loaded.model.model.embed_tokens.weight
            weight.copy_(torch.randn(weight.shape, generator=gen, device=weight.device) * embed_std)
    return loaded


def accepted_share(match: float, k: int) -> float:
    """Share of a k-token draft the cloud accepts when each token matches with probability `match`
    (acceptance stops at the first mismatch)."""
    if match >= 1.0:
        return 1.0
    return (match - match ** (k + 1)) / (k * (1.0 - match))


def match_for(acceptance: float, k: int) -> float:
    """The per-token match probability whose accepted share of k-token drafts is `acceptance`."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if accepted_share(mid, k) < acceptance else (low, mid)
    return (low + high) / 2


def corrupt(tokens: Sequence[int], match: float, vocab: int, rng: random.Random) -> list[int]:
    """`tokens`, each replaced by a different random token with probability 1 - match."""
    out = []
    for token in tokens:
        if rng.random() >= match:
            other = rng.randrange(vocab - 1)
            token = other + (other >= token)
        out.append(token)
    return out


async def started(engine: Any) -> None:
    result = engine.start()
    if inspect.isawaitable(result):  # the engine of a later serving core starts asynchronously
        await result


async def stopped(engine: Any) -> None:
    stop = getattr(engine, "stop", None)
    if stop is not None:
        result = stop()
        if inspect.isawaitable(result):
            await result
    else:
        engine.shutdown()


def passes(engine: Any) -> int | None:
    stats = getattr(engine, "stats", None)  # the serving core's counters, as its last step reported them
    if stats is not None and hasattr(stats, "forward_passes"):
        return int(stats.forward_passes)
    return getattr(getattr(engine, "runner", None), "passes", None)


async def phase_apart() -> None:
    """With STRATUS_STEP_PROFILE (the engine loop's own profile, an engine process's too), idle the engine long
    enough that the phase that follows is a busy period, one line, of its own (`serve.loop.StepProfile.GAP`)."""
    if os.environ.get("STRATUS_STEP_PROFILE"):
        await asyncio.sleep(0.15)


async def cloud_only(engine: Any, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """Every prompt's greedy answer, all at once; the answers and the seconds they took."""
    from stratus_workers.protocol.requests import Sampling

    params = Sampling(max_new_tokens=new_tokens)

    async def one(prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for event in engine.stream(prompt, params):
            tokens.extend(getattr(event, "token_ids", ()))
        return tokens

    t0 = time.perf_counter()
    answers = await asyncio.gather(*(one(p) for p in prompts))
    return list(answers), time.perf_counter() - t0


async def verified(engine: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Every prompt's greedy answer as the cloud's verification computes it: rounds of empty drafts (each
    gives the cloud's next token), all sessions at once."""
    from stratus_workers.protocol.requests import Sampling

    async def one(i: int, prompt: list[int]) -> list[int]:
        out: list[int] = []
        while len(out) < new_tokens:
            verdict = await engine.verify(f"record-{i}", [*prompt, *out], [], [], Sampling())
            out.append(verdict.next_token)
            if verdict.eos:
                break
        await engine.end_session(f"record-{i}")
        return out

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (cloud-only, speculative) seconds of the pair whose ratio is the median (the lower middle of an even
    count): the row's tokens/s then come from one measured pair, not from two medians taken apart."""
    ranked = sorted(pairs, key=lambda p: p[0] / p[1])
    return ranked[(len(ranked) - 1) // 2]


async def speculative(
    engine: Any,
    prompts: list[list[int]],
    transcripts: list[list[int]],
    *,
    draft: int,
    match: float,
    vocab: int,
    seed: int,
) -> dict[str, Any]:
    """Every prompt as a speculative session replaying its transcript as drafts, all at once."""
    from stratus_workers.protocol.requests import Sampling

    greedy = Sampling()
    totals = {"tokens": 0, "drafted": 0, "accepted": 0, "rounds": 0, "matched": 0}

    async def one(i: int, prompt: list[int], transcript: list[int]) -> None:
        rng = random.Random(seed * 100_003 + i)
        sid = f"bench-{seed}-{i}"
        # Every position's corruption drawn once, ahead: a round sees the positions up to its first corrupted one
        # and the next round starts past it, so no draw is seen twice and the drafts are distributed as when each
        # round drew its own; the sessions' own Python between rounds (it shares the server's process) stays small.
        corrupted = corrupt(transcript, match, vocab, rng)
        out: list[int] = []
        while len(out) < len(transcript):
            proposal = corrupted[len(out) : len(out) + draft][: len(transcript) - len(out) - 1]
            verdict = await engine.verify(sid, [*prompt, *out], proposal, [], greedy)
            out += proposal[: verdict.accepted]
            out.append(verdict.next_token)
            totals["drafted"] += len(proposal)
            totals["accepted"] += verdict.accepted
            totals["rounds"] += 1
            if verdict.eos:
                break
        totals["matched"] += sum(a == b for a, b in zip(out, transcript, strict=False))
        totals["tokens"] += len(out)
        await engine.end_session(sid)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p, t) for i, (p, t) in enumerate(zip(prompts, transcripts, strict=True))))
    return {**totals, "seconds": time.perf_counter() - t0}


class StepProfile:
    """Where an in-process engine's time goes, step by step (`--profile`): the engine thread's step, its
    Verify groups' launch (sessions opened, the pass and the verdicts queued: host time, with the pass's own host
    launch and device span inside) and finish (judging, settling: host time, of which the wait for the device's
    verdicts is `finish wait`), its decode steps, and the wait between steps (the event loop's share: replies
    delivered, callers woken, their next calls sent). Without the verify pipeline a step's finish follows its
    launch; with it, a step launches one group and finishes the other (`verify groups`, `overlapped`: groups
    launched while another was in flight). Device spans come from CUDA events read after each phase, so timing
    does not add a wait on the device."""

    def __init__(self, core: Any) -> None:
        from stratus_workers.serve import sessions as sessions_module

        self.core = core
        self.cuda = core.runner.device.type == "cuda"
        self.ns: collections.Counter[str] = collections.Counter()
        self.count: collections.Counter[str] = collections.Counter()
        self.events: list[tuple[str, Any, Any]] = []
        self.last_end = 0
        self.trace_armed = False  # trace the step that launches the third Verify group from now (arm())
        self.traces: list[str] = []
        self.groups = (0, 0)
        self._wrapped: list[tuple[Any, str, Any]] = []  # (owner, name, what it was): `close` puts them back
        self._wrap(core, "step", "step", gap=True)
        self._wrap(core.sessions, "launch", "launch", calls=True)
        self._wrap(core.sessions, "finish", "finish")
        # The wait for the device inside finish (and inside a sampled row's judging): the read-backs'.
        self._wrap(sessions_module.ReadBack, "wait", "finish wait")
        self._wrap(core.runner, "forward", "forward", device=True)
        self._wrap(core.runner, "forward_rows", "forward_rows", device=True)  # the padded one calls forward
        self._wrap(core.runner, "decode", "decode", device=True)
        self.reset()

    def _wrap(
        self, obj: Any, name: str, key: str, *, gap: bool = False, calls: bool = False, device: bool = False
    ) -> None:
        inner = getattr(obj, name)
        self._wrapped.append((obj, name, inner))

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            if gap and self.last_end:
                self.ns["between steps"] += t0 - self.last_end
            if calls:
                self.count["verify calls"] += len(args[0])
            if gap and self.trace_armed and self.core._verifies and self.count["launch"] >= 2:
                self.trace_armed = False
                return self._traced(inner, *args, **kwargs)
            start = end = None
            if device and self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            try:
                return inner(*args, **kwargs)
            finally:
                if end is not None:
                    end.record()
                    self.events.append((key, start, end))
                t1 = time.perf_counter_ns()
                self.ns[key] += t1 - t0
                self.count[key] += 1
                if gap:
                    self.last_end = t1

        setattr(obj, name, timed)

    def _traced(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        try:  # the trace is a look inside, never a reason for the measurement to fail
            prof = profile(activities=activities)
            prof.__enter__()
        except Exception as exc:
            self.traces.append(f"no trace: {type(exc).__name__}: {exc}")
            return inner(*args, **kwargs)
        try:
            result = inner(*args, **kwargs)
        finally:
            try:
                prof.__exit__(None, None, None)
                sort = "cuda_time_total" if self.cuda else "cpu_time_total"
                table = prof.key_averages().table(sort_by=sort, row_limit=25)
                self.traces.append(f"one engine step with Verify calls:\n{table}")
            except Exception as exc:
                self.traces.append(f"no trace: {type(exc).__name__}: {exc}")
        return result

    def close(self) -> None:
        """Unwrap what was wrapped (a class's method too: the next profile in this process starts clean)."""
        for obj, name, original in reversed(self._wrapped):
            setattr(obj, name, original)
        self._wrapped.clear()

    def reset(self) -> None:
        self.ns.clear()
        self.count.clear()
        self.events.clear()
        self.last_end = 0
        self.groups = (self.core.verify_groups, self.core.verify_overlapped)

    def take(self) -> dict[str, Any]:
        """This phase's totals (ms) and per-step means, and a fresh start for the next phase."""
        if self.cuda:
            torch.cuda.synchronize()
        device_ms: collections.Counter[str] = collections.Counter()
        for key, start, end in self.events:
            device_ms[f"{key} device span"] += start.elapsed_time(end)
        steps = max(1, self.count["step"])
        totals = {key: ns / 1e6 for key, ns in self.ns.items()} | dict(device_ms)
        out = {
            "steps": self.count["step"],
            "verify calls": self.count["verify calls"],
            "verify groups": self.core.verify_groups - self.groups[0],
            "overlapped": self.core.verify_overlapped - self.groups[1],
            "forward passes": self.count["forward"],
            "decode steps": self.count["decode"],
            "total ms": totals,
            "per step ms": {key: value / steps for key, value in totals.items()},
        }
        self.reset()
        return out


async def measure(args: argparse.Namespace, log: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from stratus_workers.models.loader import resolve_device
    from stratus_workers.serve.core import verify_pipeline_on
    from stratus_workers.serve.engine import AsyncEngine, ProcessTransport, ThreadTransport
    from stratus_workers.serve.loop import EngineSettings, pipeline_default

    device = resolve_device(args.device)
    if args.verify_pipeline != "auto":  # the engine (thread or process) reads it when it builds its core
        os.environ["STRATUS_VERIFY_PIPELINE"] = "1" if args.verify_pipeline == "on" else "0"
    if args.tf32:
        os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "1"  # the engine process's matrix products too
    if args.engine == "process":  # the engine process imports this script to build the model (load_random)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))
    # By its module's name, not __main__'s (which is the engine process's own entry point there).
    import bench_coop_cloud

    load = functools.partial(
        bench_coop_cloud.load_random,
        args.model,
        dtype=args.dtype,
        device=str(device),
        tf32=args.tf32,
        embed_std=args.embed_std,
        tokenizer=args.tokenizer,
    )
    most = max(args.concurrency)
    settings = EngineSettings(
        max_batch_size=most, max_tokens=args.prompt_tokens + args.new_tokens + args.draft + 8, max_sessions=most
    )
    transport = ProcessTransport(settings, load) if args.engine == "process" else ThreadTransport(settings, load=load)
    engine = AsyncEngine(transport, max_batch_size=most, max_queue=4 * most)
    await started(engine)
    dtype = engine.info.dtype
    params = engine.info.parameters
    tokenizer = engine.tokenizer
    vocab = len(tokenizer)
    profile: StepProfile | None = None
    core = getattr(getattr(engine, "transport", None), "core", None)
    if args.profile:
        if core is None:
            raise SystemExit("--profile needs the engine's core in this process (the thread transport)")
        profile = StepProfile(core)
    # The core's own switch where it runs here; an engine process decides from the same variable and default.
    own = verify_pipeline_on(pipeline_default(True, device, False))
    pipeline = bool(core.verify_pipeline) if core is not None else own
    rng = random.Random(0)
    # The per-token match is the models' property: measured as a share of drafts of --acceptance-draft tokens, it
    # stays the same for drafts of other lengths (longer ones then have a smaller accepted share).
    match = match_for(args.acceptance, args.acceptance_draft)
    meta = {
        "model": args.model,
        "parameters": params,
        "dtype": dtype,
        "engine": args.engine,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else report.cpu_name(),
        "draft": args.draft,
        "acceptance_target": args.acceptance,
        "acceptance_draft": args.acceptance_draft,
        "match": match,
        "new_tokens": args.new_tokens,
        "transcript": args.transcript,
        "tf32": bool(args.tf32),
        "embed_std": args.embed_std,
        "verification": "packed" if os.environ.get("STRATUS_VERIFY_PACKED", "1") != "0" else "padded",
        "verify_pipeline": pipeline,
        "prompt_tokens": args.prompt_tokens,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        # The engine's start as it timed it (load, build, warm-up seconds and the graphs captured).
        "startup": dict(getattr(engine.info, "startup", ())),
    }
    log(
        f"model {args.model}: {params / 1e6:.0f}M parameters, {dtype}, {device}; per-token match {match:.4f}; "
        f"verify pipeline {'on' if pipeline else 'off'}"
    )
    rows: list[dict[str, Any]] = []
    try:
        warm = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(2)]
        transcripts, _ = await cloud_only(engine, warm, 8)
        await speculative(engine, warm, transcripts, draft=args.draft, match=match, vocab=vocab, seed=99)
        for c in args.concurrency:
            prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(c)]
            before = passes(engine)
            if profile is not None:
                profile.reset()
            await phase_apart()
            streamed, seconds = await cloud_only(engine, prompts, args.new_tokens)
            await phase_apart()
            profiled: dict[str, Any] = {}
            if profile is not None:
                profiled["cloud_only"] = profile.take()
            base_passes = None if before is None else passes(engine) - before  # type: ignore[operator]
            tokens = sum(len(t) for t in streamed)
            transcripts = streamed
            agreement = None
            if args.transcript == "verify":
                # Random weights leave near-ties between tokens, which the decode step's kernels and the
                # verification pass's may break differently: record the answer the verifier gives.
                transcripts = await verified(engine, prompts, args.new_tokens)
                same = sum(
                    next((n for n, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
                    for x, y in zip(streamed, transcripts, strict=True)
                )
                agreement = same / max(1, tokens)
                log(f"  C={c:>3}: decode and verification agree on the first {agreement:.1%} of the answers")
            before = passes(engine)
            if profile is not None:
                profile.reset()
                profile.trace_armed = args.trace
            await phase_apart()
            spec = await speculative(engine, prompts, transcripts, draft=args.draft, match=match, vocab=vocab, seed=c)
            if profile is not None:
                profiled["speculative"] = profile.take()
            spec_passes = None if before is None else passes(engine) - before  # type: ignore[operator]
            # Further rounds of both phases on the same engine, interleaved: one phase lasts well under a second
            # on a GPU, so a single pair moves with the machine's moment; the row reports each pair and the median.
            pairs = [(seconds, spec["seconds"])]
            for _ in range(args.repeats - 1):
                await phase_apart()
                _, again = await cloud_only(engine, prompts, args.new_tokens)
                await phase_apart()
                more = await speculative(
                    engine, prompts, transcripts, draft=args.draft, match=match, vocab=vocab, seed=c
                )
                pairs.append((again, more["seconds"]))
            seconds, spec["seconds"] = median_pair(pairs)
            alone: dict[str, Any] = {}
            if args.also_alone and hasattr(engine, "verify_together") and spec["accepted"] > spec["drafted"] / 2:
                engine.verify_together = False  # each Verify call its own forward pass, as before batching
                try:
                    alone = await speculative(
                        engine, prompts, transcripts, draft=args.draft, match=match, vocab=vocab, seed=c
                    )
                finally:
                    engine.verify_together = True
            row = {
                "concurrency": c,
                "cloud_only_tokens": tokens,
                "cloud_only_seconds": seconds,
                "cloud_only_tps": tokens / seconds,
                "cloud_only_passes": base_passes,
                "spec_tokens": spec["tokens"],
                "spec_seconds": spec["seconds"],
                "spec_tps": spec["tokens"] / spec["seconds"],
                "spec_passes": spec_passes,
                "drafted": spec["drafted"],
                "accepted": spec["accepted"],
                "rounds": spec["rounds"],
                "same_as_transcript": spec["matched"] / max(1, spec["tokens"]),
                "alone_tps": alone["tokens"] / alone["seconds"] if alone else None,
                "decode_verify_agreement": agreement,
                "repeats": [
                    {"cloud_only_tps": tokens / a, "spec_tps": spec["tokens"] / b} for a, b in pairs
                ],
                "profile": profiled or None,
            }
            rows.append(row)
            log(
                f"  C={c:>3}: cloud-only {row['cloud_only_tps']:8.0f} tok/s ({base_passes} passes)  "
                f"speculative {row['spec_tps']:8.0f} tok/s ({spec_passes} passes, acceptance "
                f"{spec['accepted'] / max(1, spec['drafted']):.1%}, {spec['tokens'] / max(1, spec['rounds']):.2f} "
                f"tokens/round)  {row['spec_tps'] / row['cloud_only_tps']:.2f}x"
                + (f"; one pass per call: {row['alone_tps']:8.0f} tok/s" if alone else "")
            )
            for phase, p in profiled.items():
                per = p["per step ms"]
                log(
                    f"    {phase}: {p['steps']} steps, {p['verify calls']} verify calls; per step ms: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items()))
                )
    finally:
        await stopped(engine)
        if profile is not None:
            profile.close()
    if profile is not None:
        for trace in profile.traces:
            log(trace)
    return rows, meta


GOAL = 3.0  # issue 15: 64 sessions' accepted tokens/s at least 3x the tokens/s of 64 cloud-only streams


def render(runs: list[tuple[list[dict[str, Any]], dict[str, Any]]]) -> str:
    """The section: each run's setting, table, goal line and (when profiled) where its steps' time went."""
    lines = ["## Speculative decoding, the cloud side alone (`make bench-coop-cloud`)"]
    for rows, meta in runs:
        lines += ["", *render_run(rows, meta)]
    return "\n".join(lines)


def render_run(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    recorded = {
        "stream": "its cloud-only answer",
        "verify": "the cloud's answer recorded through verification (rounds of empty drafts)",
    }[meta.get("transcript", "stream")]
    verification = {"packed": "packed (no padding)", "padded": "padded to the longest row"}.get(
        meta.get("verification", ""), ""
    )
    lines = [
        f"{meta['device']}; random-init `{meta['model']}` ({meta['parameters'] / 1e6:.0f}M parameters, "
        f"{meta['dtype']}{', TensorFloat-32 matrix products' if meta.get('tf32') else ''}"
        + (
            f", the embedding drawn at std {meta['embed_std']:g} so that the model repeats its last token with a "
            "margin rounding cannot flip"
            if meta.get("embed_std")
            else ""
        )
        + "); the server's engine "
        f"{ENGINES[meta.get('engine', 'thread')]}"
        + (f", verification {verification}" if verification else "")
        + (
            f", the verify pipeline {'on' if meta['verify_pipeline'] else 'off'}"
            if meta.get("verify_pipeline") is not None
            else ""
        )
        + f"; prompts of {meta['prompt_tokens']} random tokens, "
        f"{meta['new_tokens']} new tokens each, greedy. Cloud-only: C streams at once. Speculative: C sessions at "
        "once, "
        f"each replaying {recorded} as {meta['draft']}-token drafts, every draft token replaced by another "
        f"with probability {1 - meta['match']:.4f} so that {meta['acceptance_target']:.0%} of "
        f"{meta.get('acceptance_draft', meta['draft'])}-token drafts' tokens are accepted (the share measured with "
        "real weights by `make bench-coop`); drafts cost nothing here. Accepted "
        "tokens/s: accepted draft tokens plus the cloud's own token per round. Forward passes per token: the "
        f"model's passes over the tokens generated. torch {meta['torch']}, Python {meta['python']}; {meta['date']}.",
        "",
        "| sessions | cloud-only tokens/s | speculative accepted tokens/s | ratio | cloud-only passes/token | "
        "speculative passes/token | acceptance | tokens/round | speculative, one pass per Verify call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        alone = f"{r['alone_tps']:.0f} tokens/s" if r["alone_tps"] else "–"

        def per_token(n: int | None, tokens: int) -> str:
            return f"{n / tokens:.3f}" if n is not None and tokens else "–"

        lines.append(
            f"| {r['concurrency']} | {r['cloud_only_tps']:.0f} | {r['spec_tps']:.0f} "
            f"| {r['spec_tps'] / r['cloud_only_tps']:.2f}× "
            f"| {per_token(r['cloud_only_passes'], r['cloud_only_tokens'])} "
            f"| {per_token(r['spec_passes'], r['spec_tokens'])} "
            f"| {r['accepted'] / max(1, r['drafted']):.1%} | {r['spec_tokens'] / max(1, r['rounds']):.2f} "
            f"| {alone} |"
        )
    top = max(rows, key=lambda r: r["concurrency"])
    ratio = top["spec_tps"] / top["cloud_only_tps"]
    verdict = "met" if ratio >= GOAL else f"missed by {GOAL - ratio:.2f}×"
    lines += ["", f"{top['concurrency']} sessions: {ratio:.2f}× cloud-only (goal ≥ {GOAL:g}×: {verdict})."]
    repeats = top.get("repeats") or []
    if len(repeats) > 1:
        each = ", ".join(f"{r['spec_tps'] / r['cloud_only_tps']:.2f}×" for r in repeats)
        lines[-1] += f" The {len(repeats)} interleaved pairs on this engine: {each} (the table: the median pair)."
    agreement = top.get("decode_verify_agreement")
    if agreement is not None:
        lines[-1] += f" Decode and verification agree on {agreement:.1%} of the recorded answers."
    profiled = top.get("profile") or {}
    if profiled:
        lines += ["", f"Where a step's time went at {top['concurrency']} sessions (ms per engine step, `--profile`):"]
        for phase, p in profiled.items():
            per = p["per step ms"]
            calls = f", {p['verify calls'] / max(1, p['steps']):.1f} Verify calls a step" if p["verify calls"] else ""
            if p.get("verify groups"):
                calls += f", {p['verify groups']} Verify groups ({p['overlapped']} launched with another in flight)"
            parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items()))
            lines.append(f"- {phase.replace('_', '-')}: {p['steps']} steps{calls}; {parts}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(ARCHS), default="1b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--draft", type=int, default=8)
    parser.add_argument("--acceptance", type=float, default=0.97, help="share of draft tokens the cloud accepts")
    parser.add_argument(
        "--acceptance-draft", type=int, default=8,
        help="the draft length --acceptance is taken at (8, the router's default max_draft_tokens; bench-coop's "
        "sample manifest drafts 8-12 tokens, so 8 is the conservative end): drafts of --draft tokens keep its "
        "per-token match",
    )
    parser.add_argument(
        "--also-alone", action="store_true", help="also measure one forward pass per Verify call (before batching)"
    )
    parser.add_argument(
        "--transcript",
        choices=["stream", "verify"],
        default="stream",
        help="the recorded answer the drafts replay: the cloud-only stream's, or the verification pass's",
    )
    parser.add_argument(
        "--engine",
        choices=["thread", "process"],
        default="thread",
        help="the engine core in a thread of this process, or in an engine process (a server's default on CUDA)",
    )
    parser.add_argument(
        "--embed-std",
        type=float,
        default=0.0,
        help="draw the embedding at this scale: a random model whose choices rounding cannot flip (see load_random)",
    )
    parser.add_argument(
        "--verify-pipeline",
        choices=["auto", "on", "off"],
        default="auto",
        help="the engine's verify pipeline (STRATUS_VERIFY_PIPELINE; auto: the engine's default, on in an engine "
        "process on CUDA, else off)",
    )
    parser.add_argument("--tf32", action="store_true", help="float32 matrix products in TensorFloat-32 (CUDA)")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="pairs of cloud-only and speculative phases per concurrency on the same engine (the row: the median pair)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="a tokenizer directory (default: the bundled model's, which needs its GGUF)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="time the engine's steps, passes and the waits between them"
    )
    parser.add_argument(
        "--trace", action="store_true", help="with --profile: torch.profiler's table of one Verify step"
    )
    parser.add_argument(
        "--render-from", type=Path, nargs="+", help="render the section from these earlier runs' --json, in order"
    )
    parser.add_argument("--write", type=Path, default=None, help="write the table into this Markdown file")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.render_from:  # the section from earlier runs' --json (a GPU's results, rendered here)
        body = render([(d["rows"], d["meta"]) for d in (json.loads(p.read_text()) for p in args.render_from)])
        print(body)
        if args.write:
            report.write_section(args.write, SECTION, body, "# Benchmarks")
        return 0
    rows, meta = asyncio.run(measure(args, log))
    if args.json:  # first: the measurement survives whatever follows
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    body = render([(rows, meta)])
    print(body)
    if args.write:
        report.write_section(args.write, SECTION, body, "# Benchmarks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
