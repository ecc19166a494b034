"""The engine loop: feeds the engine core its inputs and hands on one output per step, in a process or a thread.

`build_core` turns a loaded model and `EngineSettings` into an `EngineCore` (runner, speculative
sessions, prefix cache). `EngineLoop` runs it: take whatever the frontend sent (requests, aborts,
speculative calls), run a step if there is work, emit the step's output, and otherwise wait. The
engine process (serve/worker.py) runs it over the socket channel; the in-process mode runs it in a
thread with a queue. Either way `busy_since` and `steps` say whether the loop is advancing, which
is what the frontend's supervision watches.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from stratus_workers.runtimes import RUNTIME_TORCH
from stratus_workers.serve.contexts import ContextLost, ContextMirror, unpack_call
from stratus_workers.serve.core import (
    PREFIX_BLOCK,
    EngineCore,
    EngineRequest,
    Finished,
    StepOutput,
    prefill_grouping,
    verify_pipeline_on,
)
from stratus_workers.serve.parallel import ParallelContext
from stratus_workers.serve.pipeline import PipelineContext, build_stage_runner, keep_stage
from stratus_workers.serve.prefix import PrefixCache
from stratus_workers.serve.runner import ModelRunner, env_flag, no_mark
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.sampling import eos_ids
from stratus_workers.serve.sessions import ReadBack, SpeculativeSessions
from stratus_workers.serve.surface import EngineInfo

log = logging.getLogger(__name__)

IDLE_WAIT = 0.25  # seconds the idle loop sleeps between looks (it wakes at once on input)
# Seconds a step of Verify calls alone may wait for the rest of the sessions verified in the step before
# (their replies go out together, their next calls come back within about this): one pass for all of
# them, not a pass for whichever arrived first and another for the rest. With the verify pipeline the loop waits
# so for the group it last replied to while the other group's pass runs on the device (`EngineCore.verify_owed`).
VERIFY_GATHER = 0.005
CPU_POOL_BYTES = 256 << 20  # the prefix pool's automatic size on a CPU
GPU_POOL_SHARE = 0.25  # ... and on a GPU: this share of the memory left after the batch's cache


@dataclass(frozen=True)
class EngineSettings:
    """How to build an engine core; picklable, so the frontend can send it to the engine process."""

    max_batch_size: int = 8
    max_tokens: int = 4096  # prompt plus answer; the model's own context may be shorter
    max_sessions: int = 4
    prefill_chunk: int = 512
    prefix_cache_tokens: int = -1  # -1: sized from the device's memory; 0: off
    warmup: bool = True
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    pipeline_microbatches: int = 0  # 0: as many as there are stages
    argv: tuple[str, ...] = ()  # the server's command line (tensor-parallel followers repeat it)
    log_level: str = "info"
    log_format: str = "json"
    threads: int = 0


def _token_bytes(model: Any, dtype: torch.dtype, world: int) -> int:
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads) // world
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    size = torch.empty(0, dtype=dtype).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * size


def prefix_pool_tokens(settings: EngineSettings, model: Any, max_len: int, world: int = 1) -> int:
    """The prefix pool's size in tokens (a multiple of the block size): as asked, or from free memory."""
    if getattr(model, "runtime", RUNTIME_TORCH) != RUNTIME_TORCH:
        return 0  # llama.cpp's runner keeps no prefix pool (docs/serving.md)
    if settings.prefix_cache_tokens >= 0:
        return settings.prefix_cache_tokens // PREFIX_BLOCK * PREFIX_BLOCK
    param = next(model.parameters())
    token_bytes = _token_bytes(model, model.model.norm.weight.dtype, world)
    batch_tokens = settings.max_batch_size * max_len
    if param.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(param.device)
        cache_bytes = (settings.max_batch_size + settings.max_sessions) * (max_len + 1) * token_bytes
        budget = max(0, free - cache_bytes) * GPU_POOL_SHARE
        tokens = min(batch_tokens, int(budget // token_bytes))
    else:
        tokens = min(4 * max_len, CPU_POOL_BYTES // token_bytes)
    return tokens // PREFIX_BLOCK * PREFIX_BLOCK


def start_core(
    load: Callable[[], Any],
    settings: EngineSettings,
    setup: Callable[[], tuple[ParallelContext | None, PipelineContext | None]] = lambda: (None, None),
    *,
    own_process: bool = False,
) -> tuple[EngineCore, EngineInfo, Any]:
    """Load a model (`load`), set up its process group (`setup`, after loading: tensor or pipeline parallel), build
    the engine core and warm it up; the core, its info with each phase's time, and the tokenizer. Both engines (the
    thread and the process) start through here, so their start phases are measured alike; `own_process`: the engine
    process's (`pipeline_default`)."""
    started = time.monotonic()
    loaded = load()
    loaded_at = time.monotonic()
    parallel, pipeline = setup()
    core, info = build_core(loaded, settings, parallel, pipeline, own_process=own_process)
    built_at = time.monotonic()
    graphs = core.warmup() if settings.warmup else 0  # decode graphs on CUDA, before any request pays for them
    return core, info.started(started, loaded_at, built_at, time.monotonic(), graphs), loaded.tokenizer


def pipeline_default(own_process: bool, device: torch.device | None, parallel: bool) -> bool:
    """The verify pipeline's default (`core.verify_pipeline_on`): on in an engine process of its own on one CUDA device,
    where the frontend works in the other process while the device computes; off in a thread engine (one interpreter
    lock), on the CPU (nothing to overlap) and under tensor or pipeline parallel (not measured there)."""
    return own_process and device is not None and device.type == "cuda" and not parallel


def build_core(
    loaded: Any,
    settings: EngineSettings,
    parallel: ParallelContext | None = None,
    pipeline: PipelineContext | None = None,
    *,
    own_process: bool = False,
) -> tuple[EngineCore, EngineInfo]:
    """An engine core over `loaded` (a models.LoadedModel) as `settings` ask, and what it reports about itself.

    Under `pipeline` (stage 0 of a pipeline) the model keeps only the first stage's layers.
    """
    model = loaded.model
    max_len = min(loaded.max_context_tokens, settings.max_tokens)
    world = parallel.world_size if parallel is not None else 1
    rows = settings.max_batch_size + settings.max_sessions
    runner: ModelRunner
    if pipeline is not None:
        keep_stage(model, pipeline.stage, pipeline.stages)
        pool = prefix_pool_tokens(settings, model, max_len, pipeline.tensor_parallel)
        runner = build_stage_runner(model, pipeline, max_rows=rows, max_len=max_len, pool_tokens=pool)
    else:
        pool = prefix_pool_tokens(settings, model, max_len, world)
        runner = build_runner(
            model, max_rows=rows, max_len=max_len, parallel=parallel, pool_tokens=pool, threads=settings.threads
        )
    eos = eos_ids(model, loaded.tokenizer)
    sessions = SpeculativeSessions(runner, eos, first_row=settings.max_batch_size)
    hold, group = prefill_grouping()  # off unless asked for (docs/serving.md, "Prefill grouping")
    prefix = PrefixCache(PREFIX_BLOCK, pool // PREFIX_BLOCK) if pool >= PREFIX_BLOCK else None
    core = EngineCore(
        runner,
        sessions,
        eos,
        max_batch_size=settings.max_batch_size,
        prefill_chunk=settings.prefill_chunk,
        prefix=prefix,
        verify_pipeline=verify_pipeline_on(
            pipeline_default(own_process, loaded.device, parallel is not None or pipeline is not None)
        ),
        prefill_hold=hold,
        prefill_group=group,
    )
    info = EngineInfo(
        name=loaded.name,
        source=loaded.source,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        parameters=loaded.parameters,
        compression=loaded.compression,
        max_len=max_len,
        vocab_size=runner.vocab_size,
        runner=runner.describe(),
        prefix_cache_tokens=pool if prefix is not None else 0,
    )
    return core, info


class Inbox(Protocol):
    """Where the loop's inputs arrive."""

    def take(self, timeout: float | None) -> list[Any]:
        """Every message that arrived, waiting up to `timeout` seconds (None: until one does) when none has."""
        ...


class ThreadInbox:
    """The in-process mode's inbox: a queue the event loop's thread fills."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()

    def put(self, message: Any) -> None:
        with self._cond:
            self._items.append(message)
            self._cond.notify()

    def take(self, timeout: float | None) -> list[Any]:
        with self._cond:
            if not self._items and timeout != 0:
                self._cond.wait(timeout)
            items = list(self._items)
            self._items.clear()
        return items


class StackSampler(threading.Thread):
    """Samples one thread's Python stack every `interval` seconds (STRATUS_STEP_SAMPLE=1 with the step profile): where
    a busy period's wall time went, calls blocked in C (a device wait, a lock, a socket) counted at the line that
    made them, which a tracing profiler's overhead would distort in a loop bound by the host."""

    TOP = 25

    def __init__(self, thread_id: int, interval: float = 0.001) -> None:
        super().__init__(daemon=True, name="step-sampler")
        self.thread_id = thread_id
        self.interval = interval
        self.halt = threading.Event()
        self.take()

    def take(self) -> dict[str, Any]:
        """What was sampled since the last take (samples, the innermost lines and the functions on the stack, each
        as a share of the samples), and start counting anew."""
        # Swapped, not cleared: the sampling thread may be adding to the old ones (a sample lost is no harm).
        samples, lines, functions = getattr(self, "_counts", (0, collections.Counter(), collections.Counter()))
        self._counts: tuple[int, collections.Counter[str], collections.Counter[str]] = (
            0, collections.Counter(), collections.Counter()
        )  # fmt: skip

        def shares(counter: collections.Counter[str]) -> list[tuple[str, float]]:
            return [(key, round(n / samples, 3)) for key, n in counter.most_common(self.TOP)] if samples else []

        return dict(samples=samples, lines=shares(lines), functions=shares(functions))

    def run(self) -> None:
        # A thread holding the interpreter lock gives it up only every switch interval (5 ms by default), and at
        # once where it blocks in C: with the default the samples would come 5x as often from blocked calls as from
        # Python code. At a quarter of the sampling interval they come evenly.
        sys.setswitchinterval(min(sys.getswitchinterval(), self.interval / 4))
        while not self.halt.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            if frame is None:
                continue
            samples, lines, functions = self._counts
            code = frame.f_code
            lines[f"{code.co_name} {os.path.basename(code.co_filename)}:{frame.f_lineno}"] += 1
            seen = set()
            while frame is not None:
                code = frame.f_code
                key = f"{code.co_name} {os.path.basename(code.co_filename)}:{code.co_firstlineno}"
                if key not in seen:  # (a recursive function counts once a sample)
                    seen.add(key)
                    functions[key] += 1
                frame = frame.f_back
            self._counts = (samples + 1, lines, functions)


# The CUDA caching allocators' counters a busy period reports the change of (`StepProfile`): the pinned host pool's
# growth and shrinkage (each a cudaHostAlloc or cudaFreeHost; µs spent in them), the device pool's cudaMalloc and
# cudaFree calls, its retries after a failed allocation and its device-wide synchronisations. A sampled stack shows
# where the loop's thread waits, not on what: these say whether the allocators made it wait.
HOST_ALLOCATOR_KEYS = ("num_host_alloc", "num_host_free", "host_alloc_time.total", "host_free_time.total")
DEVICE_ALLOCATOR_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_counters() -> dict[str, float]:
    """The allocators' counters now ({} until this process has used CUDA; a key torch lacks is left out)."""
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return {}
    host: dict[str, Any] = getattr(torch.cuda, "host_memory_stats", dict)()
    device: dict[str, Any] = torch.cuda.memory_stats()
    found = {f"host.{k}": host[k] for k in HOST_ALLOCATOR_KEYS if k in host}
    found.update({f"device.{k}": device[k] for k in DEVICE_ALLOCATOR_KEYS if k in device})
    return found


class StepTrace:
    """The loop's phases over a range of its steps, beside what the device did (STRATUS_STEP_TRACE=<file>,
    STRATUS_STEP_TRACE_STEPS=START,COUNT: the loop's steps START..START+COUNT-1, counted from its first; off by
    default), to see what the host did while the device idled (tests/bench/gpu_timeline.py reads either form).
    START may be @PATH instead: the COUNT steps from the first one that begins once PATH exists (a benchmark
    creates it when the load it wants traced begins: a server's step count is not known ahead).

    The phases: `take`, `gather`, `step`, `emit`; inside a step `admit`, `prefill` (its `load`, the packed pass's
    `plan` and `pass`, its `head`), `join` (the decode step with the prefill's first tokens: `runner`, `first` with
    the `part` sent, `choose`), `decode`, `store` (into the prefix cache), `settle`, and the verify pipeline's
    `launch` (its `open`, the packed `pass`, the `head`, the `verdicts`) and `reply`. A file ending in
    `.json` gets torch.profiler's Chrome trace (every op and kernel; the profiler slows the host about twice over);
    any other gets one JSON object of the phases' host times and, on CUDA, the device time at which the stream
    reached each phase's start and end (CUDA events: a few µs a phase), so the timeline keeps the host's own pace."""

    def __init__(self, path: str, steps: str) -> None:
        self.path = path
        start, _, count = steps.partition(",")
        self.trigger = start[1:] if start.startswith("@") else ""
        self.count = int(count or 20)
        self.start = -1 if self.trigger else int(start or 0)  # (with a trigger: set when it fires)
        self.stop = self.start + self.count
        self.chrome = path.endswith(".json")
        self.profiler: torch.profiler.profile | None = None
        self.phases: list[tuple[str, float, float, Any, Any]] = []
        self.on = False
        self.cuda = torch.cuda.is_available()
        self.base: tuple[float, Any] = (0.0, None)

    @contextlib.contextmanager
    def _mark(self, name: str) -> Iterator[None]:
        if not self.on:
            yield
            return
        ev0 = ev1 = None
        if self.cuda:
            ev0 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            ev0.record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t1 = time.perf_counter()
            if self.cuda:
                ev1 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                ev1.record()
            self.phases.append((name, t0, t1, ev0, ev1))

    def marker(self) -> Callable[[str], contextlib.AbstractContextManager[Any]]:
        return torch.profiler.record_function if self.chrome else self._mark

    def before(self, step: int) -> None:
        if self.trigger and self.start < 0 and os.path.exists(self.trigger):
            self.start, self.stop = step, step + self.count
        if step != self.start or self.on or self.profiler is not None:  # (an idle loop comes back to the same step)
            return
        if self.chrome:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()  # type: ignore[no-untyped-call]
            return
        base = None
        if self.cuda:  # the device clock's zero, on the host's: an event recorded on an idle stream
            torch.cuda.synchronize()
            base = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            base.record()
            torch.cuda.synchronize()
        self.base = (time.perf_counter(), base)
        self.on = True

    def after(self, step: int) -> None:
        if step + 1 == self.stop:
            self.write()

    def write(self) -> None:
        """Write what was traced (at the range's last step, or when the loop stops inside the range)."""
        if self.profiler is None and not self.on:
            return
        try:  # a look inside, never a reason for the loop to fail
            if self.profiler is not None:
                self.profiler.stop()  # type: ignore[no-untyped-call]
                self.profiler.export_chrome_trace(self.path)
            elif self.on:
                self.on = False
                host0, base = self.base
                if base is not None:
                    torch.cuda.synchronize()

                def device(ev: Any) -> float | None:
                    return None if ev is None else round(base.elapsed_time(ev) * 1e3, 1)

                rows = [
                    [name, round((t0 - host0) * 1e6, 1), round((t1 - host0) * 1e6, 1), device(ev0), device(ev1)]
                    for name, t0, t1, ev0, ev1 in self.phases
                ]
                with open(self.path, "w") as f:
                    json.dump({"columns": ["phase", "host_start_us", "host_end_us", "device_start_us",
                                           "device_end_us"], "phases": rows}, f)
            log.info("step trace written", extra={"path": self.path, "steps": self.stop - self.start})
        except (OSError, RuntimeError) as exc:
            log.warning("step trace not written: %s", exc)
        self.profiler = None
        self.phases = []


class StepProfile:
    """Where the engine loop's time goes, for benchmarks (STRATUS_STEP_PROFILE=<file>; off by default).

    A busy period (steps back to back, from the first work after idleness until the loop goes idle)
    becomes one JSON line appended to the file: its steps, wall time, the time inside steps and
    between them (emitting outputs, taking inputs), step times with and without a prefill, and the
    runner's decode-ahead hits and prefill graph replays over it, and the steps that mixed a prefill into
    the decode rows' pass (a prefill step: a mixed pass and, with decode-ahead, the decode step before it), and
    the time the loop spent blocked on verification's read-backs (`ReadBack.waited`): near none, the device waited
    on the host; most of the steps' time, the host on the device; and the prefills run beside a decode step
    launched ahead (`prefills_beside`). On CUDA also `allocator`: how the caching allocators' counters
    (`allocator_counters`) changed over the period.
    """

    MIN_STEPS = 10  # shorter periods (warm-ups, single calls) are not written
    GAP = 0.05  # seconds without a step that end a busy period

    def __init__(self, path: str, core: EngineCore) -> None:
        self.path = path
        self.core = core
        self.sampler: StackSampler | None = None
        if os.environ.get("STRATUS_STEP_SAMPLE", "") not in ("", "0"):
            self.sampler = StackSampler(threading.get_ident())  # the loop's thread: the one that makes this
            self.sampler.start()
        self._reset()

    def _counters(self) -> tuple[int, int, int, int, int, float, int]:
        runner = self.core.runner
        decoder = getattr(runner, "decoder", None)
        # Steps found computed ahead: the single-GPU decoder counts them, a pipeline's first stage itself.
        ahead = getattr(runner, "ahead_hits", getattr(decoder, "ahead_hits", 0))
        replays = getattr(runner, "prefill_replays", 0)
        joins = getattr(decoder, "device_joins", 0)
        core = self.core
        return ahead, replays, core.prefill_tokens, joins, core.mixed_steps, ReadBack.waited, core.prefills_beside

    def _reset(self) -> None:
        self.plain: list[float] = []
        self.prefill: list[float] = []
        self.batch = 0
        self.first = 0.0
        self.last = 0.0
        self.before = self._counters()
        self.allocator = allocator_counters()
        # STRATUS_STEP_SERIES=1: every step as [start ms into the period, ms, prompt tokens prefilled, rows, waiting]
        self.series: list[tuple[float, float, int, int, int]] | None = (
            [] if os.environ.get("STRATUS_STEP_SERIES", "") not in ("", "0") else None
        )

    def step(self, started: float, ended: float, prefilled: int) -> None:
        """A step ran from `started` to `ended` and prefilled `prefilled` prompt tokens."""
        if self.last and started - self.last > self.GAP:
            self.idle()  # the loop was idle in between without a look at its inbox coming back empty
        if not self.first:
            self.first = started
            if self.sampler is not None:  # the period starts here: not the idle time before it
                self.sampler.take()
        self.last = ended
        (self.prefill if prefilled else self.plain).append(ended - started)
        self.batch += self.core.active
        if self.series is not None:
            core = self.core
            self.series.append((started, ended - started, prefilled, core.active, core.waiting))

    def idle(self) -> None:
        steps = len(self.plain) + len(self.prefill)
        if steps >= self.MIN_STEPS:
            hits, replays, tokens, joins, mixed, waited, beside = (
                b - a for a, b in zip(self.before, self._counters(), strict=True)
            )
            inside = sum(self.plain) + sum(self.prefill)
            wall = self.last - self.first

            def ms(values: list[float], q: float) -> float:
                if len(values) < 2:
                    return round(sum(values) * 1e3, 3)
                return round(statistics.quantiles(values, n=100)[int(q * 100) - 1] * 1e3, 3)

            line: dict[str, Any] = dict(
                steps=steps, wall_ms=round(wall * 1e3, 1), inside_steps_ms=round(inside * 1e3, 1),
                between_steps_ms=round((wall - inside) * 1e3, 1), mean_batch=round(self.batch / steps, 1),
                step_ms_mean=round(wall / steps * 1e3, 3), plain_steps=len(self.plain),
                plain_p50_ms=ms(self.plain, 0.5), plain_p95_ms=ms(self.plain, 0.95), prefill_steps=len(self.prefill),
                prefill_p50_ms=ms(self.prefill, 0.5), prefill_p95_ms=ms(self.prefill, 0.95),
                prefill_tokens=tokens, ahead_hits=hits, prefill_graph_replays=replays, device_joins=joins,
                mixed_steps=mixed, device_wait_ms=round(waited * 1e3, 1), prefills_beside=beside,
            )  # fmt: skip
            now = allocator_counters()
            if now:
                line["allocator"] = {k: round(v - self.allocator.get(k, 0), 1) for k, v in now.items()}
            if self.sampler is not None:
                line["sampled"] = self.sampler.take()
            if self.series is not None:
                line["series"] = [
                    [round((t - self.first) * 1e3, 3), round(d * 1e3, 3), n, rows, waiting]
                    for t, d, n, rows, waiting in self.series
                ]
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        self._reset()


class EngineLoop:
    """Runs `core` until told to stop; `emit` receives ("step", packed StepOutput) once per step, and before it
    ("part", packed StepOutput) where the step chose first tokens of new requests (their callers get them at once).

    Messages in: ("add", seq_id, prompt, params, deadline), ("add_delta", seq_id, anchor, keep, tail, params,
    deadline) (a long prompt as a delta on the last one under its anchor: serve/contexts.py), ("unanchor", anchor)
    (forget that prompt), ("abort", seq_id), ("call", call_id, op, args), ("delta", call_id, op, args, keep) (a
    session's call, its context as a delta and its Sampling as values: serve/contexts.py),
    ("drop", sid) (forget a session's context), ("stop",). Out, besides steps: ("stopped", packed) with what
    stopping ended.
    """

    def __init__(self, core: EngineCore, emit: Callable[[tuple[Any, ...]], None], *, pickled: bool = True) -> None:
        self.core = core
        self.emit = emit
        # Whether `emit` pickles the messages (the engine channel): then verdicts go as plain tuples (StepOutput.pack).
        self.plain = pickled
        self.busy_since = 0.0  # time.monotonic() when the running step began; 0 between steps
        self.steps = 0
        self.contexts = ContextMirror()  # sessions' last contexts, as the frontend remembers them
        self.prompts = ContextMirror()  # the last prompt under each anchor, likewise
        path = os.environ.get("STRATUS_STEP_PROFILE")
        self.profile = StepProfile(path, core) if path else None
        path = os.environ.get("STRATUS_STEP_TRACE")
        self.trace = StepTrace(path, os.environ.get("STRATUS_STEP_TRACE_STEPS", "")) if path else None
        self.mark: Callable[[str], contextlib.AbstractContextManager[Any]] = no_mark
        if self.trace is not None:
            self.mark = core.mark = core.runner.mark = self.trace.marker()
        if env_flag("STRATUS_SEND_FIRST", True):  # (0: first tokens wait for their step's output; A/B runs)
            core.on_part = self._part

    def run(self, inbox: Inbox) -> None:
        # Everything the loop does is inference: no autograd bookkeeping, and tensors the runner
        # makes in one call are updated in place by the next without a mode mismatch.
        with torch.inference_mode():
            while True:
                if self.trace is not None:
                    self.trace.before(self.steps)
                with self.mark("take"):
                    messages = inbox.take(0.0 if self.core.busy else IDLE_WAIT)
                with self.mark("gather"):
                    carry_on = self._apply(messages) and self._gather(inbox)
                if not carry_on:
                    if self.trace is not None:
                        self.trace.write()
                    if self.profile is not None:
                        self.profile.idle()
                    self.emit(("stopped", self.core.shutdown().pack(self.plain)))
                    return
                if self.core.busy:
                    started = self.busy_since = time.monotonic()
                    prefilled = self.core.prefill_tokens
                    with self.mark("step"):
                        out = self.core.step()
                    self.busy_since = 0.0
                    self.steps += 1
                    if self.profile is not None:
                        self.profile.step(started, time.monotonic(), self.core.prefill_tokens - prefilled)
                    with self.mark("emit"):
                        self.emit(("step", out.pack(self.plain)))
                    if self.trace is not None:
                        self.trace.after(self.steps - 1)
                else:
                    if self.profile is not None:
                        self.profile.idle()
                    self.core.idle()

    def _part(self, out: StepOutput) -> None:
        """A step's first tokens, sent before the step ends (`EngineCore.on_part`): no stats, the step's output has
        them."""
        with self.mark("part"):
            self.emit(("part", out.pack(self.plain)))

    def _gather(self, inbox: Inbox) -> bool:
        """Wait up to VERIFY_GATHER for the Verify calls still owed (`EngineCore.verify_owed`); False on stop. A
        verification group in flight makes the core busy, so the loop never sleeps on it past this wait: the next
        step finishes it whether or not anything new arrived."""
        if not self.core.verify_owed():
            return True
        deadline = time.monotonic() + VERIFY_GATHER
        while self.core.verify_owed():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            messages = inbox.take(left)
            if not messages:
                break
            if not self._apply(messages):
                return False
        return True

    def _apply(self, messages: list[Any]) -> bool:
        refused: list[Finished] = []
        for message in messages:
            kind = message[0]
            if kind == "add":
                _, seq_id, prompt, params, deadline = message
                self._add(EngineRequest(seq_id, prompt, params, deadline), refused)
            elif kind == "add_delta":  # a prompt as a delta on the last one under its anchor (serve/contexts.py)
                _, seq_id, anchor, keep, tail, params, deadline = message
                try:
                    prompt = self.prompts.rebuild(anchor, keep, tail, False)
                except ContextLost:  # (the frontend forgets the anchor when told: its next prompt goes whole)
                    error = (f"internal error: the engine lost the prompt this request extends (anchor {anchor}, "
                             f"told to keep {keep} tokens); nothing was generated, and a retry sends the prompt whole")
                    refused.append(Finished(seq_id, "error", keep + len(tail), 0, 0, 0.0, 0.0, error))
                    continue
                self._add(EngineRequest(seq_id, prompt, params, deadline), refused)
            elif kind == "unanchor":
                self.prompts.drop(message[1])
            elif kind == "abort":
                self.core.abort(message[1])
            elif kind == "delta":  # a session's call, its context as a delta on the last one (serve/contexts.py)
                _, call_id, op, args, keep = message
                try:  # (a session call's args are (sid, context, ..., end), its sampling as values: contexts.py)
                    context = self.contexts.rebuild(args[0], keep, args[1], args[-1])
                    args = unpack_call(op, (args[0], context, *args[2:]))
                except (ContextLost, ValueError) as exc:  # the frontend then sends this context whole next time
                    self._reply(call_id, "error", str(exc))
                    continue
                self._call(call_id, op, args)
            elif kind == "call":
                _, call_id, op, args = message
                if op == "end":
                    self.contexts.drop(args[0])
                self._call(call_id, op, args)
            elif kind == "drop":
                self.contexts.drop(message[1])
            elif kind == "stop":
                return False
            else:
                log.error("the engine loop got an unknown message %r", kind)
        if refused:
            self.emit(("step", StepOutput(self.core.steps, finished=refused, stats=self.core.stats()).pack()))
        return True

    def _add(self, request: EngineRequest, refused: list[Finished]) -> None:
        try:
            self.core.add(request)
        except ValueError as exc:  # the frontend checks first; this is the core's own guard
            refused.append(Finished(request.seq_id, "error", len(request.prompt), 0, 0, 0.0, 0.0, str(exc)))

    def _call(self, call_id: int, op: str, args: tuple[Any, ...]) -> None:
        """Queue a call on the core; one it refuses at once (ValueError) is answered now, as the caller's input."""
        try:
            self.core.call(call_id, op, args)
        except ValueError as exc:
            self._reply(call_id, "invalid", str(exc))

    def _reply(self, call_id: int, kind: str, error: str) -> None:
        """A call's error, answered at once, with the core's stats (the frontend takes every step message's)."""
        out = StepOutput(self.core.steps, results=[(call_id, kind, error)], stats=self.core.stats())
        self.emit(("step", out.pack()))
