"""`make bench-serve`: our gRPC model server against plain `generate()` baselines, into docs/benchmarks.md.

For each model (random-init weights: speed does not depend on their values) and each concurrency,
in one process and on one device:

- sequential: `generate()` one request at a time (a server that runs `generate` per request);
- static batch: one `generate()` call over a batch of `concurrency` prompts;
- static cache: the same batch with `cache_implementation="static"`, which transformers compiles
  (`torch.compile`, CUDA graphs) on CUDA; on the CPU it runs uncompiled, as transformers decides;
- stratus: the in-process `ModelServer` on a loopback port, loaded by `concurrency` streaming
  clients (GenerateStream) that run in separate processes, each sending its next request as soon
  as the last one finished (requests come and go; starts are staggered).

Aggregate tokens/s counts completion tokens over wall time. TTFT and inter-token latency are
measured by the clients for the server. For `generate()` they are derived from the timings of the
same calls: a batch's first token comes after its prefill (a `max_new_tokens=1` call), its later
ones every (total - prefill) / (n - 1); a sequential server's i-th queued request starts after the
i requests before it. Prompts are text whose tokenization is exactly `--prompt-tokens` tokens.

For a diagnosis, `BENCH_RAW=1` adds every request's timings to each server row (`raw`),
`STRATUS_STEP_SERIES=1` with `--profile` every engine step's (docs/serving.md), `BENCH_LOOP_LAG=1` how late the
frontend's event loop ran a 1 ms timer over each measured load (`loop_lag_ms`: p50, p95, max; the frontend is this
process's event loop), `BENCH_MESSAGE_RATES=4000,1000` the shared-prefix load again under each frontend message
budget (`AsyncEngine.message_rate`), `BENCH_FRONTEND_PROFILE=DIR` the shared-prefix load once more under a
cProfile of this process's main thread (DIR/frontend-N.txt, its top entries by own time), and `BENCH_STEP_TRACE=FILE`
the engine loop's phases over the first `BENCH_STEP_TRACE_STEPS` (300) steps of each cached shared-prefix load
(`phases`: each phase's median host µs in the steps that admit and in the rest, as `step_phases.py` prints them; the
trace itself kept as FILE.N). Every server row records the host's state as its load ended (`host_state`: load
average, CPU clock, the GPU's clocks, power, temperature and throttle reasons), for runs of the same code that differ.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import report  # tests/bench/report.py (scripts run from this folder)
import torch

ROOT = Path(__file__).resolve().parents[2]
SECTION = "bench-serve-{kind}"  # one section of docs/benchmarks.md per kind of device (cpu, gpu)
ARCHS = {"135m": "SMOLLM2_135M", "1b": "SMOLLM2_1B", "tiny": "TINY"}
# Reference and goals from the issue (H200, SmolLM2-135M architecture, bf16, 64-token prompts, 128 new).
GOAL_SINGLE = 1000.0
GOAL_AGGREGATE_64 = 30000.0
GOAL_TTFT_RATIO = 3.0
GOAL_OVER_BASELINE = 1.5  # issue 14: at 64 streams, over the best generate() baseline of the same run
GOAL_PREFIX_TTFT = 5.0  # issue 14: TTFT p50 of the shared-prefix workload, prefix cache off over on
SERVER = "stratus (gRPC, continuous batching)"
TIMES = "\u00d7"  # the multiplication sign, as in "1.5x" written typographically


# -- prompts ----------------------------------------------------------------------------------


def make_prompts(tokenizer: Any, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` distinct texts that each tokenize to exactly `length` tokens."""
    rng = random.Random(seed)
    words = [
        w
        for w in (tokenizer.decode([i]) for i in range(1000, 20000))
        if len(w) > 3 and w.startswith(" ") and w[1:].isalpha() and w.isascii()
    ]
    prompts: list[str] = []
    while len(prompts) < count:
        text = "".join(rng.choice(words) for _ in range(length))
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == length:
            prompts.append(text)
    return prompts


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# -- baselines ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model: Any, ids: torch.Tensor, new_tokens: int, static: bool) -> float:
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if static:
        kwargs["cache_implementation"] = "static"
    _sync(ids.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    _sync(ids.device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - started


def run_sequential(model: Any, prompt_ids: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for a whole request) of `generate()` at batch 1."""
    device = next(model.parameters()).device
    single = torch.tensor(prompt_ids[:1], device=device)
    _generate(model, single, new_tokens, static=False)  # warm-up at full length
    first = statistics.median(_generate(model, single, 1, static=False) for _ in range(3))
    full = statistics.median(_generate(model, single, new_tokens, static=False) for _ in range(3))
    return first, full


BASELINES = ("sequential", "static", "compile")  # --baselines: which generate() baselines run
VARIANTS = (("static", "static batch generate()", False), ("compile", "static cache + compile", True))


def prepare_baselines(
    model: Any, prompt_ids: list[list[int]], concurrency: int, new_tokens: int, which: Sequence[str]
) -> None:
    """The baselines' warm-up: first calls, and on CUDA the static cache's compilation for every cache length."""
    device = next(model.parameters()).device
    batch = torch.tensor(prompt_ids[:concurrency], device=device)
    for key, _, static in VARIANTS:
        if key not in which:
            continue
        _generate(model, batch, 4, static=static)  # warm-up (compiles the static-cache variant)
        if static:
            _generate(model, batch, new_tokens, static=static)  # compiled graphs for every cache length


def run_baselines(
    model: Any, prompt_ids: list[list[int]], concurrency: int, new_tokens: int, sequential: tuple[float, float] | None,
    log: Any, which: Sequence[str] = BASELINES, prepared: bool = False,
) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    rows: list[dict[str, Any]] = []
    batch = torch.tensor(prompt_ids[:concurrency], device=device)
    if sequential is not None:
        # Sequential generate(): its speed does not depend on the queue; the i-th of `concurrency`
        # queued requests gets its first token after the i whole requests before it.
        first, full = sequential
        ttfts = [i * full + first for i in range(concurrency)]
        rows.append(
            _row("sequential generate()", concurrency, new_tokens / full, ttfts, (full - first) / (new_tokens - 1))
        )
        log(rows[-1])
    repeats = 2 if device.type == "cuda" else 1
    for key, name, static in VARIANTS:
        if key not in which:
            continue
        if static and device.type != "cuda":
            name = "static cache (uncompiled on CPU)"
        if not prepared:
            prepare_baselines(model, prompt_ids, concurrency, new_tokens, [key])
        first = _generate(model, batch, 1, static=static)
        full = statistics.median(_generate(model, batch, new_tokens, static=static) for _ in range(repeats))
        itl = (full - first) / (new_tokens - 1)
        rows.append(_row(name, concurrency, concurrency * new_tokens / full, [first] * concurrency, itl))
        log(rows[-1])
    return rows


class BaselineThread(threading.Thread):
    """The generate() baselines in a thread of their own, so that their warm-up (on CUDA, minutes of compiling the
    static cache) overlaps the server's start (graph capture in the engine process), and their measurement waits
    until `measure()` says the device is quiet (the server up, idle). On CUDA a start took 43-76 s and the
    baselines as long again: one after the other they did not fit a call's time (issue 14's first GPU runs).

    Compiling, capturing and measuring happen on this one thread: compiled CUDA graphs are recorded per thread.
    """

    def __init__(self, model: Any, prompt_ids: list[list[int]], args: argparse.Namespace, log: Any,
                 keep: Any) -> None:
        super().__init__(name="bench-baselines", daemon=True)
        self.model, self.prompt_ids, self.args, self.log, self.keep = model, prompt_ids, args, log, keep
        self.quiet = threading.Event()
        self.error: BaseException | None = None
        self.prepare_s = 0.0

    def measure(self) -> None:
        self.quiet.set()

    def run(self) -> None:
        try:
            args = self.args
            concurrencies = args.baseline_concurrency or args.concurrency
            started = time.perf_counter()
            for c in concurrencies:
                prepare_baselines(self.model, self.prompt_ids, c, args.new_tokens, args.baselines)
            self.prepare_s = time.perf_counter() - started
            self.quiet.wait()
            sequential = None
            if "sequential" in args.baselines:
                sequential = run_sequential(self.model, self.prompt_ids, args.new_tokens)
            for c in concurrencies:
                self.keep(run_baselines(self.model, self.prompt_ids, c, args.new_tokens, sequential, self.log,
                                        args.baselines, prepared=True))  # fmt: skip
        except BaseException as exc:  # reported by the caller, which goes on with the server's rows
            self.error = exc


def _row(system: str, concurrency: int, tps: float, ttfts: Sequence[float], itl: float) -> dict[str, Any]:
    return dict(
        system=system,
        concurrency=concurrency,
        tokens_per_s=tps,
        ttft_p50_ms=_percentile(ttfts, 0.5) * 1e3,
        ttft_p95_ms=_percentile(ttfts, 0.95) * 1e3,
        itl_p50_ms=itl * 1e3,
    )


# -- client processes ---------------------------------------------------------------------------


def _client_worker(code: str, conn: Connection) -> None:
    """One client process: runs a load per command until told to exit."""
    sys.path.insert(0, code)
    import gc

    from stratus_workers.client import AsyncClient  # noqa: F401 - loaded before the heap is frozen

    gc.collect()
    gc.freeze()  # a full collection in a client would show up as server latency
    while True:
        command = conn.recv()
        if command[0] == "exit":
            conn.close()
            return
        _, address, prompts, workers, rounds, new_tokens, stagger = command
        conn.send(asyncio.run(_client_main(address, prompts, workers, rounds, new_tokens, stagger, conn)))


async def _client_main(
    address: str, prompts: list[str], workers: list[int], rounds: int, new_tokens: int, stagger: float,
    conn: Connection,
) -> list[dict[str, Any]]:
    from stratus_workers.client import AsyncClient

    results: list[dict[str, Any]] = []
    async with AsyncClient(address, timeout=600) as client:
        # Connect first, then wait for the common start: a slow interpreter start is not load.
        await client.model_info()
        conn.send("ready")
        start_at = await asyncio.get_running_loop().run_in_executor(None, conn.recv)

        async def worker(index: int) -> None:
            await asyncio.sleep(max(0.0, start_at + index * stagger - time.monotonic()))
            for r in range(rounds):
                prompt = prompts[(index * rounds + r) % len(prompts)]
                sent = time.monotonic()
                chunks: list[float] = []
                tokens, server_ttft, queue = 0, 0.0, 0.0
                async for chunk in client.stream(prompt, max_new_tokens=new_tokens):
                    now = time.monotonic()
                    if chunk.text:
                        chunks.append(now)
                    if chunk.HasField("usage"):
                        tokens = chunk.usage.completion_tokens
                        server_ttft, queue = chunk.timing.ttft_ms, chunk.timing.queue_ms
                results.append(dict(sent=sent, chunks=chunks, done=time.monotonic(), tokens=tokens,
                                    server_ttft_ms=server_ttft, queue_ms=queue, late_s=sent - start_at))

        await asyncio.gather(*(worker(i) for i in workers))
    return results


class ClientPool:
    """The load's client processes, started once before any server and reused for every run.

    The first harness started fresh client processes for each run from the process that hosts the
    gRPC server; forking a process with a busy gRPC server makes gRPC's fork handlers wait for its
    threads to idle, with the server stalled meanwhile: at 64 streams the new clients' ModelInfo
    call hit its 10 s deadline (issue 14). Nothing forks the serving process now.
    """

    def __init__(self, procs: int, code: str) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_worker, args=(code, child), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    async def load(
        self, address: str, prompts: list[str], concurrency: int, rounds: int, new_tokens: int, procs: int,
        stagger: float,
    ) -> tuple[float, list[dict[str, Any]]]:
        use = self.conns[: max(1, min(procs, concurrency, len(self.conns)))]
        loop = asyncio.get_running_loop()
        for p, conn in enumerate(use):
            mine = list(range(p, concurrency, len(use)))
            conn.send(("load", address, prompts, mine, rounds, new_tokens, stagger))
        for conn in use:
            ready = await loop.run_in_executor(None, conn.recv)
            assert ready == "ready", ready
        start_at = time.monotonic() + 0.2
        for conn in use:
            conn.send(start_at)
        results: list[dict[str, Any]] = []
        for conn in use:
            results.extend(await loop.run_in_executor(None, conn.recv))
        first = min(r["sent"] for r in results)
        last = max(r["done"] for r in results)
        return last - first, results

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("exit",))
        for proc in self.procs:
            proc.join(10)


# -- host cost ----------------------------------------------------------------------------------


def cpu_seconds(pid: int | None = None, tid: int | None = None) -> float:
    """User plus system CPU time of a process (or of one thread of this process), from /proc."""
    path = f"/proc/self/task/{tid}/stat" if tid is not None else f"/proc/{pid or 'self'}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HostCost:
    """CPU seconds of the frontend (the serving process, less its engine thread) and of the engine loop
    (its process, or its thread in the in-process layout) between `start` and `stop`."""

    def __init__(self, engine_pid: int) -> None:
        self.engine_pid = engine_pid
        self.engine_tid = next(
            (t.native_id for t in threading.enumerate() if t.name == "stratus-engine"), None
        ) if not engine_pid else None

    def _read(self) -> tuple[float, float]:
        own = cpu_seconds()
        if self.engine_pid:
            return own, cpu_seconds(self.engine_pid)
        engine = cpu_seconds(tid=self.engine_tid) if self.engine_tid is not None else 0.0
        return own - engine, engine

    def start(self) -> None:
        self._begin = self._read()

    def stop(self, tokens: int) -> dict[str, float]:
        end = self._read()
        frontend, engine = (b - a for a, b in zip(self._begin, end, strict=True))
        per = 1e6 / max(tokens, 1)
        return dict(frontend_us_per_token=frontend * per, engine_us_per_token=engine * per)


# -- our server --------------------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    """The model under test: the object (for generate() and an in-process engine) and how to rebuild it."""

    loaded: Any
    arch: dict[str, Any]
    device: torch.device


def server_config(**fields: Any) -> Any:
    """ServerSettings with the fields this tree's server has (the bench also measures older trees)."""
    from stratus_workers.serve.server import ServerSettings

    known = {f.name for f in dataclasses.fields(ServerSettings)}
    return ServerSettings(**{k: v for k, v in fields.items() if k in known})


async def start_server(args: argparse.Namespace, bench: Bench, prompt_tokens: int, concurrency: int,
                       **overrides: Any) -> Any:
    """The model server as the bench runs it: its engine in a process (a loader rebuilds the random
    model there from its seed) or in a thread of this process (the model object itself)."""
    from stratus_workers.serve.server import ModelServer

    config = server_config(
        model="bench", name="bench", port=0, http_port=0, max_batch_size=concurrency, max_prompt_tokens=prompt_tokens,
        max_new_tokens=args.new_tokens, max_queue=4 * concurrency, log_level="warning", log_format="text",
        engine=args.engine, threads=args.threads, **overrides,
    )
    if getattr(config, "engine", "thread") == "thread" or (args.engine == "auto" and bench.device.type == "cpu"):
        server = ModelServer(config, loaded=bench.loaded)
    else:
        from stratus_workers.models.tiny import random_loaded

        loader = functools.partial(random_loaded, bench.arch, seed=0, dtype=args.dtype, device=args.device,
                                   name="bench", tokenizer_dir=args.tokenizer)
        server = ModelServer(config, loader=loader)
    started = time.perf_counter()
    await server.start()
    engine = server.engine
    mode = getattr(engine, "mode", "thread")
    seconds = time.perf_counter() - started
    # Where the start went, as the engine timed it (trees before the phases were recorded report none).
    phases = dict(getattr(engine.info, "startup", ()))
    detail = start_phases(phases, unit="s")
    print(f"  server ({mode}) up in {seconds:.1f}s" + (f" ({detail})" if detail else ""), flush=True)
    server.bench_start = dict(server_start_s=round(seconds, 2), server_start_phases=phases)
    return server


def engine_pid(server: Any) -> int:
    return int(getattr(server.engine, "pid", 0))


async def run_server(
    bench: Bench, prompts: list[str], pool: ClientPool, args: argparse.Namespace, log: Any, shared: list[str],
    warm: list[str], keep: Any, baselines: BaselineThread | None = None,
) -> list[dict[str, Any]]:
    """The standard load at each concurrency, then (on the same server, prefix cache on) the shared-prefix one.

    `baselines` (started before) measure once the server is up and idle, before any load; every row is kept
    (`keep`: written to the run's JSON) as soon as it is measured, so a run cut short still has them.
    """
    concurrencies = args.concurrency
    longest = max(args.prompt_tokens, shared_prompt_tokens(args) if shared else 0, args.server_prompt_tokens)
    batch = max(*concurrencies, args.shared_concurrency if shared else 0)
    try:
        server = await start_server(args, bench, longest, batch)
    finally:
        if baselines is not None:  # the device is quiet now: the server is up and idle (or did not start)
            baselines.measure()
            await asyncio.get_running_loop().run_in_executor(None, baselines.join)
            if baselines.error is not None:
                log(f"  generate() baselines failed: {type(baselines.error).__name__}: {baselines.error}")
            else:
                log(f"  generate() baselines prepared in {baselines.prepare_s:.1f}s beside the server's start")
    rows: list[dict[str, Any]] = []
    try:
        # One short pass at every concurrency first so no measured run pays for a first use.
        for c in [1, *concurrencies]:
            await pool.load(server.address, warm, c, 1, min(args.new_tokens, 8), 1, 0.0)
        for c in concurrencies:
            steps_before = server.engine.steps
            row, results = await measured_load(server, pool, args, SERVER, prompts, c)
            row.update(engine_steps=server.engine.steps - steps_before, engine=getattr(server.engine, "mode", "thread"))
            row.update(server.bench_start)
            rows.append(row)
            keep([row])
            log(row)
            worst = max(results, key=lambda r: (r["chunks"] or [r["done"]])[0] - r["sent"])
            first = ((worst["chunks"] or [worst["done"]])[0] - worst["sent"]) * 1e3
            log(f"    slowest first token: client {first:.1f} ms, server {worst['server_ttft_ms']:.1f} ms "
                f"(queue {worst['queue_ms']:.1f}), sent {worst['late_s']:.3f}s after the planned start")
        if shared:
            rows.append(await shared_prefix_load(server, shared, pool, args, log, cached=True))
            keep(rows[-1:])
            for rate in [float(r) for r in os.environ.get("BENCH_MESSAGE_RATES", "").split(",") if r]:
                # A diagnosis: the same load again under another frontend message budget (AsyncEngine.message_rate).
                before, server.engine.message_rate = server.engine.message_rate, rate
                row = await shared_prefix_load(server, shared, pool, args, log, cached=True)
                server.engine.message_rate = before
                row["system"] += f", message rate {rate:.0f}"
                rows.append(row)
                keep(rows[-1:])
            if os.environ.get("BENCH_FRONTEND_PROFILE"):  # once more under cProfile (it slows the frontend)
                row = await shared_prefix_load(server, shared, pool, args, log, cached=True, profile=True)
                row["system"] += ", under cProfile"
                rows.append(row)
                keep(rows[-1:])
    finally:
        await server.stop(0.5)
    return rows


def _arm_step_trace() -> Path | None:
    """BENCH_STEP_TRACE=FILE: have the engine loop trace the measured shared-prefix load's first steps phase by phase
    (BENCH_STEP_TRACE_STEPS of them, 300 by default; serve/loop.py StepTrace, started by a file this run creates
    when the load begins). None where unset, or where the tree under test cannot start a trace that way."""
    trace = os.environ.get("BENCH_STEP_TRACE")
    if not trace:
        return None
    from stratus_workers.serve.loop import StepTrace

    try:
        StepTrace("", "@probe,1").trigger  # noqa: B018  (an older tree reads "@probe" as a step number, and fails)
    except (AttributeError, ValueError):
        print("  BENCH_STEP_TRACE: this tree's StepTrace cannot start on a file; no trace", flush=True)
        return None
    path = Path(trace).resolve()
    path.unlink(missing_ok=True)
    _trace_trigger(path).unlink(missing_ok=True)  # (one an earlier run left would start the trace at once)
    os.environ["STRATUS_STEP_TRACE"] = str(path)
    steps = os.environ.get("BENCH_STEP_TRACE_STEPS", "300")
    os.environ["STRATUS_STEP_TRACE_STEPS"] = f"@{_trace_trigger(path)},{steps}"
    return path


def _trace_trigger(path: Path) -> Path:
    return path.with_name(path.name + ".go")


def _traced(path: Path, row: dict[str, Any], log: Any) -> None:
    """After a traced load: its phases' medians into `row` (`phases`) and the log; the trace kept as
    FILE.N (N: the traced loads so far), the trigger removed so that the next server starts none by itself."""
    _trace_trigger(path).unlink(missing_ok=True)
    deadline = time.monotonic() + 10  # the loop writes it at its range's last step
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not path.exists():
        log("  step trace: none written (fewer steps than BENCH_STEP_TRACE_STEPS?)")
        return
    import step_phases

    kept = path.with_name(f"{path.name}.{len(list(path.parent.glob(path.name + '.*')))}")
    path.rename(kept)
    with open(kept) as f:
        row["phases"] = step_phases.summary(json.load(f)["phases"])
    row["trace_file"] = kept.name
    for line in row["phases"]:
        log(f"  {line}")


_profile_read = 0  # how much of the step profile (--profile) the rows have taken


def _profile_mark() -> None:
    """A measured run starts: what the profile holds so far (warm-ups) is not its."""
    global _profile_read
    path = os.environ.get("STRATUS_STEP_PROFILE")
    time.sleep(0.3 if path else 0.0)  # the loop writes a period when it next finds its inbox empty (<= 0.25 s)
    _profile_read = Path(path).stat().st_size if path and Path(path).exists() else 0


def _attach_profile(row: dict[str, Any]) -> None:
    """The engine loop's busy period that a measured run was (the longest since the last one read), if profiled."""
    global _profile_read
    path = os.environ.get("STRATUS_STEP_PROFILE")
    if not path:
        return
    file = Path(path)
    deadline = time.monotonic() + 1.0  # the loop writes a period when it next finds its inbox empty (<= 0.25 s)
    while time.monotonic() < deadline and (not file.exists() or file.stat().st_size <= _profile_read):
        time.sleep(0.05)
    if not file.exists():
        return
    text = file.read_text()
    periods = [json.loads(line) for line in text[_profile_read:].splitlines() if line.strip()]
    _profile_read = len(text)
    if periods:
        row["profile"] = max(periods, key=lambda p: p["steps"])


class FrontendWatch:
    """The diagnosis switches over one measured load: the event loop's lateness and a cProfile (see the docstring)."""

    count = 0

    def __init__(self, profile: bool = False) -> None:
        self.lags: list[float] = []
        self.profile: Any = None
        self.task: asyncio.Task[None] | None = None
        self.folder = os.environ.get("BENCH_FRONTEND_PROFILE", "") if profile else ""

    async def _probe(self) -> None:
        while True:
            due = time.monotonic() + 1e-3
            await asyncio.sleep(1e-3)
            self.lags.append(time.monotonic() - due)

    def start(self) -> None:
        if os.environ.get("BENCH_LOOP_LAG", "") not in ("", "0"):
            self.task = asyncio.get_running_loop().create_task(self._probe())
        if self.folder:
            import cProfile

            self.profile = cProfile.Profile()
            self.profile.enable()

    def stop(self, row: dict[str, Any]) -> None:
        if self.profile is not None:
            import io
            import pstats

            self.profile.disable()
            FrontendWatch.count += 1
            out = io.StringIO()
            pstats.Stats(self.profile, stream=out).sort_stats("tottime").print_stats(40)
            path = Path(self.folder) / f"frontend-{FrontendWatch.count}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{row['system']} c={row['concurrency']}\n{out.getvalue()}")
        if self.task is not None:
            self.task.cancel()
            lags = sorted(self.lags)
            if lags:
                row["loop_lag_ms"] = [round(_percentile(lags, q) * 1e3, 3) for q in (0.5, 0.95)] + [
                    round(lags[-1] * 1e3, 3)]


async def measured_load(
    server: Any, pool: ClientPool, args: argparse.Namespace, system: str, prompts: list[str], concurrency: int,
    profile: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One measured load on `server`: its row (named `system`) with the host cost, the diagnosis switches' findings,
    the host's state and the engine's step profile; and every request's timings."""
    cost = HostCost(engine_pid(server))
    _profile_mark()
    watch = FrontendWatch(profile)
    cost.start()
    watch.start()
    wall, results = await pool.load(server.address, prompts, concurrency, args.rounds, args.new_tokens,
                                    args.client_procs, args.stagger_ms / 1e3)
    row = _server_row(system, concurrency, wall, results)
    watch.stop(row)
    row.update(cost.stop(row["tokens"]))
    row["host_state"] = host_state()  # (after the host cost: nvidia-smi is no part of it)
    _attach_profile(row)
    return row, results


def shared_prompt_tokens(args: argparse.Namespace) -> int:
    return int(args.shared_system_tokens + args.shared_turn_tokens + 8)


async def shared_prefix_load(server: Any, prompts: list[str], pool: ClientPool, args: argparse.Namespace, log: Any,
                             cached: bool, profile: bool = False) -> dict[str, Any]:
    c = args.shared_concurrency
    await pool.load(server.address, prompts[-8:], 8, 1, 8, 1, 0.0)  # warm-up: the system prompt was seen before
    # (A server's engine traces once: its first cached load, not the diagnosis reruns after it.)
    traced = getattr(server, "bench_traced", False)
    trace = getattr(args, "trace", None) if cached and not profile and not traced else None
    if trace is not None:
        server.bench_traced = True
        _trace_trigger(trace).touch()
    row, _ = await measured_load(server, pool, args, f"shared prefix, prefix cache {'on' if cached else 'off'}",
                                 prompts[:-8], c, profile)
    if trace is not None:
        _traced(trace, row, log)
    row.update(getattr(server, "bench_start", {}), engine=getattr(server.engine, "mode", "thread"))
    prompts_cache = getattr(getattr(server, "servicer", None), "prompts", None)
    if prompts_cache is not None:  # the frontend's token cache (serve/prompts.py): off under STRATUS_PROMPT_CACHE=0
        row["prompt_token_cache"] = bool(prompts_cache.reuse)
    stats = getattr(server.engine, "stats", None)
    if stats is not None and stats.prefix_queried_tokens:
        row["prefix_hit_rate"] = stats.prefix_hit_tokens / stats.prefix_queried_tokens
    log(row)
    return row


def shared_prefix_prompts(tokenizer: Any, count: int, system_tokens: int, turn_tokens: int) -> list[str]:
    """A chat's shape: one long system prompt, then a short user turn that differs per request."""
    system = make_prompts(tokenizer, 1, system_tokens, seed=11)[0]
    return [system + turn for turn in make_prompts(tokenizer, count, turn_tokens, seed=12)]


async def run_shared_prefix_uncached(bench: Bench, prompts: list[str], pool: ClientPool, args: argparse.Namespace,
                                     log: Any) -> list[dict[str, Any]]:
    """The shared-prefix workload on a server with the prefix cache off (run_server measured it on)."""
    c = args.shared_concurrency
    server = await start_server(args, bench, shared_prompt_tokens(args), c, prefix_cache_tokens=0)
    try:
        return [await shared_prefix_load(server, prompts, pool, args, log, cached=False)]
    finally:
        await server.stop(0.5)


def _server_port() -> int:
    """A port for a server process: `stratus_workers.ports.free_port`'s, outside the ephemeral range that the
    process group's own connections draw from; the kernel's choice only where `--code` is a tree without ports.py."""
    try:
        from stratus_workers.ports import free_port
    except ImportError:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    return free_port()


async def run_server_process(
    model: Any, tokenizer: Any, prompts: list[str], pool: ClientPool, args: argparse.Namespace, log: Any
) -> list[dict[str, Any]]:
    """The server as its own process group (`--tensor-parallel N`), loaded like the in-process one."""
    import tempfile

    from stratus_workers.client import AsyncClient

    concurrencies = args.concurrency
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        port = _server_port()
        cmd = [
            sys.executable, "-m", "stratus_workers.serve", "--model", tmp, "--name", "bench", "--port", str(port),
            "--http-port", "0", "--tensor-parallel", str(args.tensor_parallel), "--max-batch-size",
            str(max(concurrencies)), "--max-prompt-tokens", str(args.prompt_tokens), "--max-new-tokens",
            str(args.new_tokens), "--max-queue", str(4 * max(concurrencies)), "--log-level", "warning",
            "--log-format", "text",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*cmd)  # (its PYTHONPATH starts with args.code: main)
        address = f"127.0.0.1:{port}"
        rows: list[dict[str, Any]] = []
        try:
            async with AsyncClient(address) as client:
                deadline = time.monotonic() + 600
                while not await client.healthy():
                    if proc.returncode is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the tensor-parallel server did not come up (exit {proc.returncode})")
                    await asyncio.sleep(0.5)
            for c in [1, *concurrencies]:  # warm-up
                await pool.load(address, prompts, c, 1, min(args.new_tokens, 8), 1, 0.0)
            for c in concurrencies:
                wall, results = await pool.load(address, prompts, c, args.rounds, args.new_tokens, args.client_procs,
                                                args.stagger_ms / 1e3)
                row = _server_row(f"stratus, tensor parallel over {args.tensor_parallel} GPUs", c, wall, results)
                rows.append(row)
                log(row)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 120)
    return rows


def _server_row(system: str, c: int, wall: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    row = _timings(system, c, wall, results)
    if os.environ.get("BENCH_RAW", "") not in ("", "0"):
        # Every request as [sent, s after the run's first; client TTFT ms; server TTFT ms; queue ms; tokens]
        first = min(r["sent"] for r in results)
        row["raw"] = [
            [round(r["sent"] - first, 4), round((r["chunks"][0] - r["sent"]) * 1e3, 3) if r["chunks"] else None,
             round(r["server_ttft_ms"], 3), round(r["queue_ms"], 3), r["tokens"]]
            for r in sorted(results, key=lambda r: r["sent"])
        ]
    return row


def _timings(system: str, c: int, wall: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["chunks"][0] - r["sent"] for r in results if r["chunks"]]
    gaps = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    # The server's own view (its timing message): arrival to admission, and arrival to the first token it sent.
    server = [r["server_ttft_ms"] for r in results if r.get("server_ttft_ms")]
    queue = [r["queue_ms"] for r in results if r.get("server_ttft_ms")]
    return dict(
        system=system, concurrency=c, tokens_per_s=tokens / wall,
        ttft_p50_ms=_percentile(ttfts, 0.5) * 1e3, ttft_p95_ms=_percentile(ttfts, 0.95) * 1e3,
        itl_p50_ms=_percentile(gaps, 0.5) * 1e3, requests=len(results), tokens=tokens,
        server_ttft_p50_ms=_percentile(server, 0.5), server_ttft_p95_ms=_percentile(server, 0.95),
        queue_p50_ms=_percentile(queue, 0.5), queue_p95_ms=_percentile(queue, 0.95),
    )


def decode_step_times(model: Any, kv_len: int, batches: list[int]) -> dict[str, float]:
    """GPU time of one captured decode step per batch size (median of 50 replays), on a runner of its own."""
    from stratus_workers.serve.runner.build import build_runner

    runner = build_runner(model, max_rows=max(batches), max_len=kv_len + 1)
    decoder = getattr(runner, "decoder", None)
    if decoder is None or not decoder.cuda_graphs:
        return {}
    times: dict[str, float] = {}
    with torch.inference_mode():
        for b in batches:
            graph, _ = decoder.graph(*decoder.buckets(b, kv_len))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            samples = []
            for _ in range(50):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            times[str(b)] = round(statistics.median(samples), 4)
    del runner
    torch.cuda.empty_cache()
    return times


# -- driver ------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, str]:
    cpu = report.cpu_name()
    import transformers

    info = dict(
        cpu=f"{cpu}, {os.cpu_count()} cores visible",
        torch=torch.__version__,
        transformers=transformers.__version__,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        device="cpu",
        kind="cpu",
        # Other work on a shared host slows every row alike; the load average says how much there was.
        load=", ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end (1, 5, 15 min)",
    )
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["kind"] = "gpu"
    return info


def host_state() -> dict[str, Any]:
    """What may make one run's engine slower than another's on the same code (session 17 saw a whole run ~20% slower):
    the load average, the CPUs' mean clock, and the GPU's clocks, power, temperature and throttle reasons."""
    state: dict[str, Any] = dict(load=[round(x, 2) for x in os.getloadavg()])
    with contextlib.suppress(OSError, ValueError):
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]  # fmt: skip
        if mhz:
            state["cpu_mhz"] = round(statistics.mean(mhz))
    if shutil.which("nvidia-smi"):
        fields = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10).stdout.strip().splitlines()
            if out:
                state["gpu"] = dict(zip(fields.split(","), (v.strip() for v in out[0].split(",")), strict=False))
    return state


def server_engine_mode(args: argparse.Namespace, device: torch.device) -> str:
    """Where start_server puts the engine loop: "process" or "thread" (as ModelServer decides for `args.engine`)."""
    if args.engine == "auto":
        return "process" if device.type == "cuda" else "thread"
    return str(args.engine)


def bench_model(
    arch_name: str, args: argparse.Namespace, pool: ClientPool, log: Any, rows: list[dict[str, Any]], save: Any
) -> None:
    from transformers import AutoTokenizer

    from stratus_workers.models import LoadedModel
    from stratus_workers.models import tiny as tiny_models
    from stratus_workers.models.loader import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else tiny_models.bundled_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    arch = dict(getattr(tiny_models, ARCHS[arch_name]))
    model = tiny_models.random_llama(dict(arch), vocab_size=len(tokenizer), seed=0).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    log(f"model {arch_name}: {params / 1e6:.0f}M parameters, {dtype}, {device}")
    count = max(args.concurrency) * max(args.rounds, 1) + 8
    # The warm-up passes get prompts of their own: a measured request must not find its prompt in the prefix cache.
    prompts = make_prompts(tokenizer, count + max(args.concurrency), args.prompt_tokens)
    prompts, warm = prompts[:count], prompts[count:]
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    shared: list[str] = []
    if args.shared_concurrency and args.tensor_parallel == 1 and not args.skip_server:
        shared = shared_prefix_prompts(tokenizer, args.shared_concurrency * args.rounds + 8,
                                       args.shared_system_tokens, args.shared_turn_tokens)
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, name="bench", source="random-init", dtype=dtype, device=device
    )
    bench = Bench(loaded, arch, device)

    def keep(new: list[dict[str, Any]]) -> None:
        for row in new:
            row.update(model=arch_name, parameters=params, dtype=str(dtype).removeprefix("torch."))
        rows.extend(new)
        save()  # as it goes: a run cut short still leaves what it measured

    # The generate() baselines come first, so that a run cut short by its time limit still has them: on CUDA with
    # the engine in a process of its own they prepare (compile) while the server starts and measure once it is up
    # and idle (BaselineThread); otherwise (a CPU, an engine in this process) they run before any server.
    baselines: BaselineThread | None = None
    if not args.skip_baselines:
        overlap = args.tensor_parallel == 1 and not args.skip_server and server_engine_mode(args, device) == "process"
        overlap = overlap and not args.baselines_first
        if overlap:
            baselines = BaselineThread(model, prompt_ids, args, log, keep)
            baselines.start()
        else:
            sequential = run_sequential(model, prompt_ids, args.new_tokens) if "sequential" in args.baselines else None
            for c in args.baseline_concurrency or args.concurrency:
                keep(run_baselines(model, prompt_ids, c, args.new_tokens, sequential, log, args.baselines))
    if args.tensor_parallel > 1:
        keep(asyncio.run(run_server_process(model, tokenizer, prompts, pool, args, log)))
    elif not args.skip_server:
        served = asyncio.run(run_server(bench, prompts, pool, args, log, shared, warm, keep, baselines))
        if device.type == "cuda":  # after the server: its compiled kernels are cached by now
            step_ms = decode_step_times(model, args.prompt_tokens + args.new_tokens, args.concurrency)
            log(f"  decode step (graph replay, kv {args.prompt_tokens + args.new_tokens}): {step_ms}")
            for row in served:
                row["step_ms"] = step_ms.get(str(row["concurrency"]))
            save()
    if shared and not args.skip_uncached:
        keep(asyncio.run(run_shared_prefix_uncached(bench, shared, pool, args, log)))
    del model, loaded, bench
    if device.type == "cuda":
        torch.cuda.empty_cache()


def start_phases(phases: dict[str, float], unit: str = " s") -> str:
    """The engine's start phases as the server reported them: "load 1.2 s, build 0.3 s, warm-up 4.1 s, 12 graphs
    captured" ("" from a tree that reported none)."""
    parts = [f"{k} {v:.1f}{unit}" for k, v in phases.items() if k != "graphs"]
    if phases:
        parts.append(f"{int(phases.get('graphs', 0))} graphs captured")
    return ", ".join(parts)


def frontend_ms_per_request(row: dict[str, Any]) -> float | None:
    """The server process's CPU ms per request (the host cost's figure times a request's tokens); None when the row
    has no host cost or no request count."""
    if "frontend_us_per_token" not in row or not row.get("requests"):
        return None
    return float(row["frontend_us_per_token"] * row["tokens"] / row["requests"] / 1e3)


def _unlabelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of unlabelled runs (this tree's): the only ones the speed-ups and the goals count (see `_label`)."""
    return [r for r in rows if not r.get("label")]


def _label(run: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A row as the table shows it: a server row of a labelled run (another tree, `--label`) says so; every row
    of such a run keeps its label, and only unlabelled rows count for the speed-ups and the goals."""
    label = run["settings"].get("label")
    if not label:
        return row
    return {**row, "system": f"{row['system']}, {label}", "label": label}


def _cache_state(row: dict[str, Any]) -> str:
    """A shared-prefix row's prefix-cache column: on or off (and the run's label)."""
    state = "on" if row["system"].startswith("shared prefix, prefix cache on") else "off"
    return f"{state}, {row['label']}" if row.get("label") else state


def _per_run(runs: list[dict[str, Any]], key: str) -> str:
    """A setting the runs share, or each run's (its models and label) where they differ."""
    values = [run["settings"][key] for run in runs]
    if len(set(values)) == 1:
        return str(values[0])
    parts = []
    for run, value in zip(runs, values, strict=True):
        models = "/".join(dict.fromkeys(str(r.get("model", "?")) for r in run["rows"]))
        label = run["settings"].get("label")
        parts.append(f"{value} ({models}{', ' + label if label else ''})")
    return ", ".join(parts)


def render(runs: list[dict[str, Any]], part: str = "") -> tuple[str, str]:
    """(kind, markdown section) for one or more runs on one kind of device."""
    meta = runs[0]["meta"]
    kind = meta["kind"]
    rows = [_label(run, r) for run in runs for r in run["rows"]]
    settings = runs[0]["settings"]
    dates = ", ".join(dict.fromkeys(run["meta"]["date"] for run in runs))
    # Runs may differ in requests per client (gpu_serve.sh gives the ~1B part 2): say each run's.
    rounds = _per_run(runs, "rounds")
    lines = [
        f"## Serving, {'GPU' if kind == 'gpu' else 'CPU'}{', ' + part if part else ''} "
        f"(`make bench-serve{'-' + part.split()[0].lower() if part else ''}`)",
        "",
        f"Device: **{meta['device']}**; host {meta['cpu']} (load average {meta.get('load', '?')}); "
        f"torch {meta['torch']}, transformers {meta['transformers']}; {dates}. Random-init weights, greedy, "
        f"{settings['prompt_tokens']}-token prompts, {settings['new_tokens']} new tokens; the server's clients run "
        f"{rounds} request(s) each, back to back, in {settings['client_procs']} process(es) started "
        f"before the server, starts staggered by {settings['stagger_ms']} ms. Speed-up: stratus over the best "
        "`generate()` baseline at the same concurrency. Baseline TTFT/ITL are derived from their call timings (see "
        "the script's docstring). TTFT is the clients'; the server's is from a request's arrival in the server to "
        "its first token leaving the engine's frontend (its timing message).",
        "",
        "| model | concurrency | system | tokens/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | speed-up | "
        "server TTFT p50 / p95 ms |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    goals: list[str] = []
    main_rows = [r for r in rows if not r["system"].startswith("shared prefix")]
    for model in dict.fromkeys(r["model"] for r in main_rows):
        for c in sorted(dict.fromkeys(r["concurrency"] for r in main_rows if r["model"] == model)):
            group = [r for r in main_rows if r["model"] == model and r["concurrency"] == c]
            base = [r for r in _unlabelled(group) if not r["system"].startswith("stratus")]
            best = max((r["tokens_per_s"] for r in base), default=0.0)
            for r in sorted(group, key=lambda r: r["system"].startswith("stratus")):
                speed = f"{r['tokens_per_s'] / best:.1f}{TIMES}" if r["system"].startswith("stratus") and best else ""
                server = ""
                if r.get("server_ttft_p50_ms"):
                    server = f"{r['server_ttft_p50_ms']:.1f} / {r['server_ttft_p95_ms']:.1f}"
                lines.append(
                    f"| {model} | {c} | {r['system']} | {r['tokens_per_s']:,.0f} | {r['ttft_p50_ms']:.1f} | "
                    f"{r['ttft_p95_ms']:.1f} | {r['itl_p50_ms']:.2f} | {speed} | {server} |"
                )
        ours = {r["concurrency"]: r for r in main_rows if r["model"] == model and r["system"] == SERVER}
        if 1 in ours:
            goals.append(_goal(f"{model} single stream", ours[1]["tokens_per_s"], GOAL_SINGLE, "tokens/s"))
        if 64 in ours:
            goals.append(_goal(f"{model} aggregate at 64", ours[64]["tokens_per_s"], GOAL_AGGREGATE_64, "tokens/s"))
            at64 = [r for r in main_rows if r["model"] == model and r["concurrency"] == 64
                    and not r["system"].startswith("stratus")]  # fmt: skip
            base = [r["tokens_per_s"] for r in _unlabelled(at64)]
            if base:
                goals.append(_goal(f"{model} at 64 over the best generate() baseline", ours[64]["tokens_per_s"] /
                                   max(base), GOAL_OVER_BASELINE, TIMES))  # fmt: skip
            elif at64:  # none in this run: an earlier run's, and the goal line says so
                best = max(at64, key=lambda r: r["tokens_per_s"])
                goals.append(_goal(f"{model} at 64 over the best generate() baseline of another run ({best['system']})",
                                   ours[64]["tokens_per_s"] / best["tokens_per_s"], GOAL_OVER_BASELINE, TIMES)
                             + "; the goal asks for the same run, which did not measure one")  # fmt: skip
        if 1 in ours and 64 in ours:
            ratio = ours[64]["ttft_p95_ms"] / ours[1]["ttft_p50_ms"]
            verdict = "met" if ratio <= GOAL_TTFT_RATIO else f"missed ({ratio / GOAL_TTFT_RATIO:.1f}{TIMES} over)"
            goal = f"{GOAL_TTFT_RATIO:.0f}{TIMES}"
            goals.append(f"- {model} TTFT p95 at 64 / idle TTFT: {ratio:.1f}{TIMES} (goal ≤ {goal}; {verdict})")
    steps = {(r["model"], r["concurrency"]): r.get("step_ms") for r in _unlabelled(rows) if r.get("step_ms")}
    if steps:
        lines += ["", "GPU time of one captured decode step (CUDA graph replay, idle server): " + "; ".join(
            f"{m} batch {c}: {ms:.3f} ms" for (m, c), ms in steps.items()
        ) + "."]
    costs = [r for r in rows if "engine_us_per_token" in r and r["system"].startswith(("stratus", "shared"))]
    if costs:
        lines += [
            "",
            "Host cost per generated token: CPU time (user + system, from /proc) over the run divided by the tokens "
            "generated, for the server's frontend (gRPC, tokenization, text, protobuf) and for its engine loop (its "
            "own process, or its thread inside the server's). The engine's figure includes the time it spins "
            "waiting for the GPU (CUDA synchronisation busy-waits), so at one stream it is about the wall time.",
            "",
            "| model | concurrency | system | engine runs in | frontend µs/token | engine µs/token | tokens/s |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: |",
        ]
        for r in costs:
            where = "its own process" if r.get("engine") == "process" else "a thread of the server"
            if r["system"].startswith("shared") and "engine" not in r:  # rows of runs before the field: as measured
                where = "its own process" if kind == "gpu" else where
            lines.append(
                f"| {r['model']} | {r['concurrency']} | {r['system']} | {where} | {r['frontend_us_per_token']:.0f} | "
                f"{r['engine_us_per_token']:.0f} | {r['tokens_per_s']:,.0f} |"
            )
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += [
            "",
            "The engine loop, step by step (`STRATUS_STEP_PROFILE`, the measured run's busy period): mean wall time "
            "per step, the median step without and with a prefill in it, time between steps (emitting the output, "
            "taking inputs) per step, the share of steps whose decode result was already computed by the step "
            "launched ahead, and how many prefills ran as CUDA graphs.",
            "",
            "| model | concurrency | system | steps | mean batch | ms/step | step p50, no prefill | "
            "step p50, prefill | between steps | decode-ahead hits | prefill graph replays |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in profiled:
            p = r["profile"]
            hits = p["ahead_hits"] / max(p["steps"], 1)
            lines.append(
                f"| {r['model']} | {r['concurrency']} | {r['system']} | {p['steps']} | {p['mean_batch']:.1f} | "
                f"{p['step_ms_mean']:.2f} | "
                f"{p['plain_p50_ms']:.2f} | {p['prefill_p50_ms']:.2f} | {p['between_steps_ms'] / p['steps']:.2f} | "
                f"{hits:.0%} | {p['prefill_graph_replays']} |"
            )
    shared = [r for r in rows if r["system"].startswith("shared prefix")]
    if shared:
        lines += [
            "",
            f"Shared-prefix workload: a {settings.get('shared_system_tokens', '?')}-token system prompt followed by "
            f"{settings.get('shared_turn_tokens', '?')}-token user turns that differ per request (a chat's shape), "
            f"{settings['new_tokens']} new tokens, clients as above; the same server with its prefix cache on, and "
            "one with `--prefix-cache-tokens 0`. The system prompt was seen once before the measured run.",
            "",
            "Frontend ms/request: the server process's CPU time (gRPC, tokenizing the long prompts, text, "
            "protobuf) per request, the host cost table's figure times the tokens of a request.",
            "",
            "| model | concurrency | prefix cache | tokens/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | hit rate | "
            "server TTFT p50 / p95 ms | queue p50 / p95 ms | frontend ms/request |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in shared:
            hit = f"{r['prefix_hit_rate']:.0%}" if "prefix_hit_rate" in r else "–"
            server = queue = ""
            if r.get("server_ttft_p50_ms"):
                server = f"{r['server_ttft_p50_ms']:.1f} / {r['server_ttft_p95_ms']:.1f}"
                queue = f"{r['queue_p50_ms']:.1f} / {r['queue_p95_ms']:.1f}"
            ms = frontend_ms_per_request(r)
            per_request = "" if ms is None else f"{ms:.2f}"
            lines.append(
                f"| {r['model']} | {r['concurrency']} | {_cache_state(r)} | {r['tokens_per_s']:,.0f} | "
                f"{r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} | {r['itl_p50_ms']:.2f} | {hit} | {server} | "
                f"{queue} | {per_request} |"
            )
        models = list(dict.fromkeys(r["model"] for r in shared))
        for model in models:  # each model's on and off rows (a run of two models has a ratio for each)
            by = {_cache_state(r): r for r in _unlabelled(shared) if r["model"] == model}
            if "on" not in by or "off" not in by:
                continue
            ratio = by["off"]["ttft_p50_ms"] / by["on"]["ttft_p50_ms"]
            goals.append(_goal(f"{model} shared prefix: TTFT p50 without the cache over with it", ratio,
                               GOAL_PREFIX_TTFT, TIMES))  # fmt: skip
            if by["on"].get("server_ttft_p50_ms") and by["off"].get("server_ttft_p50_ms"):
                server = by["off"]["server_ttft_p50_ms"] / by["on"]["server_ttft_p50_ms"]
                goals.append(f"  (measured in the server, arrival to first token: {server:.2f}{TIMES})")
            if kind != "gpu":  # the CPU section lists no goals, but the ratio is what the workload is for
                lines += ["", f"TTFT p50 without the prefix cache over with it, at the clients ({model}): "
                          f"{ratio:.2f}{TIMES}."]  # fmt: skip
    starts = {}
    for r in _unlabelled(rows):
        if r.get("server_start_s"):
            detail = start_phases(r.get("server_start_phases") or {})
            starts[(r["model"], r["server_start_s"])] = f"{r['model']} {r['server_start_s']:.1f} s" + (
                f" ({detail})" if detail else ""
            )
    if starts:
        lines += ["", "Server starts (call to ready; in brackets the engine's own phases; the rest is its process's "
                  "start and imports): " + "; ".join(starts.values()) + "."]  # fmt: skip
    if any("tensor parallel" in r["system"] for r in rows):
        lines += ["", (
            "Tensor-parallel rows: `python -m stratus_workers.serve --tensor-parallel 2` as its own process group on "
            "a machine with two H200s (NVLink), measured in a separate run against the same kind of load; their "
            "speed-up is against the single-GPU baselines above."
        )]
    if kind == "gpu":
        lines += ["", "Goals (issues 8 and 14; set for an H200):", "", *goals]
    else:
        lines += ["", "The CPU run checks that the whole path works and how it ranks against `generate()` on a small "
                  "machine; the issue's goals are for an H200 and are judged in the GPU section. On a host shared "
                  "with other work, rows measured minutes apart can differ more than the systems do."]
    return kind, "\n".join(lines)


def section_name(kind: str, part: str) -> str:
    """The docs/benchmarks.md marker a run renders into: one per kind of device, or a part of its own."""
    return SECTION.format(kind=kind) + (f"-{part.split()[0].lower()}" if part else "")


def summary_line(r: dict[str, Any]) -> str:
    """A row in one short line (a GPU call's output tail)."""
    name = r["system"].replace(SERVER, "srv").replace("shared prefix, prefix cache ", "pfx-")
    line = f"{r['model']} c{r['concurrency']} {name[:22]}: {r['tokens_per_s']:,.0f} t/s ttft {r['ttft_p50_ms']:.1f}/"
    line += f"{r['ttft_p95_ms']:.1f}"
    if r.get("server_ttft_p50_ms"):
        line += f" srv {r['server_ttft_p50_ms']:.1f}/{r['server_ttft_p95_ms']:.1f} q {r['queue_p50_ms']:.1f}"
    line += f" itl {r['itl_p50_ms']:.2f}"
    if "engine_us_per_token" in r:
        line += f" us fe {r['frontend_us_per_token']:.0f} en {r['engine_us_per_token']:.0f}"
        if (ms := frontend_ms_per_request(r)) is not None:
            line += f" fe/req {ms:.2f}ms"
    if r.get("server_start_s"):
        line += f" start {r['server_start_s']:.0f}s"
    return line


def _goal(label: str, value: float, goal: float, unit: str) -> str:
    verdict = "met" if value >= goal else f"missed, at {value / goal:.0%} of it"
    if unit == TIMES:
        return f"- {label}: {value:.2f}{TIMES} (goal ≥ {goal:g}{TIMES}; {verdict})"
    return f"- {label}: {value:,.0f} {unit} (goal ≥ {goal:,.0f}; {verdict})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(ARCHS), default=None,
                        help="default: 135m and 1b on CUDA, 135m on the CPU")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 64 on CUDA, 32 on the CPU")
    parser.add_argument("--server-prompt-tokens", type=int, default=0,
                        help="size the server for prompts this long at least (the whole table's server takes the "
                        "shared-prefix prompts: an A/B of the standard load alone on that server)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 on CUDA, 16 on the CPU")
    parser.add_argument("--rounds", type=int, default=None, help="requests per client (default 3 CUDA, 1 CPU)")
    parser.add_argument("--client-procs", type=int, default=None, help="client processes (default 4 CUDA, 1 CPU)")
    parser.add_argument("--stagger-ms", type=float, default=2.0, help="delay between client starts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the bundled SmolLM2 tokenizer)")
    parser.add_argument("--tensor-parallel", type=int, default=1,
                        help="N > 1: serve from a separate `--tensor-parallel N` process group instead")
    parser.add_argument("--engine", default="auto", choices=["auto", "process", "thread"],
                        help="where the server's engine loop runs (auto: a process of its own on CUDA)")
    parser.add_argument("--shared-concurrency", type=int, default=None,
                        help="streams of the shared-prefix workload (0 skips it; default 64 CUDA, 8 CPU)")
    parser.add_argument("--shared-system-tokens", type=int, default=None, help="its system prompt (default 1000)")
    parser.add_argument("--shared-turn-tokens", type=int, default=24, help="its user turns")
    parser.add_argument("--skip-uncached", action="store_true",
                        help="skip the shared-prefix workload's run with the prefix cache off (a diagnosis run)")
    parser.add_argument("--code", default=str(ROOT / "workers"),
                        help="the stratus_workers tree to measure (another checkout: before and after)")
    parser.add_argument("--baseline-concurrency", nargs="+", type=int, default=None,
                        help="concurrencies of the generate() baselines (default: those of the server)")
    parser.add_argument("--label", help="name the server rows of this run (e.g. the tree --code measures)")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--baselines", nargs="+", choices=BASELINES, default=list(BASELINES),
                        help="which generate() baselines run (the goals compare with the best of those that ran)")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--baselines-first", action="store_true",
                        help="run the generate() baselines before the server starts, not beside its start")
    parser.add_argument("--json", type=Path, help="also dump the raw rows here")
    parser.add_argument("--profile", type=Path, help="profile the engine loop's steps into this file (a row each)")
    parser.add_argument("--from-json", type=Path, nargs="+", help="render and write earlier --json dumps instead")
    parser.add_argument("--section", default="", help="a section of its own beside the kind's (its name, e.g. "
                        "'shared prefix through the frontend'; the marker is bench-serve-KIND-FIRSTWORD)")
    parser.add_argument("--summary", action="store_true", help="with --from-json: one short line per row")
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    if args.from_json:
        runs = [json.loads(p.read_text()) for p in args.from_json if p.exists()]
        if args.summary:
            for run in runs:
                for row in run["rows"]:
                    print(summary_line(row))
            return 0
        kind, section = render(runs, args.section)
        print(section)
        if not args.no_write:
            report.write_section(args.write, section_name(kind, args.section), section)
        return 0

    # Here and in every process the run starts (the engine's, the clients'), which inherit the environment.
    args.code = str(Path(args.code).resolve())
    sys.path.insert(0, args.code)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (args.code, os.environ.get("PYTHONPATH")) if p)
    if args.profile:  # read by the engine loop (serve/loop.py StepProfile), in its process or thread
        args.profile.unlink(missing_ok=True)
        os.environ["STRATUS_STEP_PROFILE"] = str(args.profile.resolve())
    args.trace = _arm_step_trace()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.models = args.models or (["135m", "1b"] if cuda else ["135m"])
    args.prompt_tokens = args.prompt_tokens or (64 if cuda else 32)
    args.new_tokens = args.new_tokens or (128 if cuda else 16)
    args.rounds = args.rounds or (3 if cuda else 1)
    args.client_procs = args.client_procs or (4 if cuda else 1)
    if args.shared_concurrency is None:
        args.shared_concurrency = 64 if cuda else 8
    args.shared_system_tokens = args.shared_system_tokens or (1000 if cuda else 256)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(item: Any) -> None:
        if isinstance(item, dict):
            item = "  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in item.items())
        print(item, flush=True)

    from stratus_workers.models.loader import resolve_device

    rows: list[dict[str, Any]] = []
    run = dict(
        meta=machine(resolve_device(args.device)),
        settings=dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, rounds=args.rounds,
                      client_procs=args.client_procs, stagger_ms=args.stagger_ms, engine=args.engine,
                      shared_system_tokens=args.shared_system_tokens, shared_turn_tokens=args.shared_turn_tokens,
                      label=args.label, baselines=[] if args.skip_baselines else args.baselines),
        rows=rows,
    )

    def save() -> None:
        """The run so far into --json (whole: a run cut short by a time limit renders with --from-json)."""
        if not args.json:
            return
        run["meta"]["load"] = ", ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the end (1, 5, 15 min)"
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_suffix(".writing")
        partial.write_text(json.dumps(run, indent=1))
        partial.replace(args.json)

    pool = ClientPool(args.client_procs, args.code)  # before any server: see ClientPool
    try:
        for name in args.models:
            bench_model(name, args, pool, log, rows, save)
    finally:
        pool.close()
    save()
    kind, section = render([run], args.section)
    print(section)
    if not args.no_write:
        report.write_section(args.write, section_name(kind, args.section), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
