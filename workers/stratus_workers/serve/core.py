"""Engine core: the continuous-batching scheduler over one model runner, one step at a time, no I/O.

The core knows requests by their token ids only: it admits them into runner rows, prefills their
prompts in chunks (reusing cached prefixes), decodes every running row once per step, and says
what happened in one `StepOutput` per step: every row's new token ids (with log-probabilities
when asked), the requests that finished, and the results of speculative calls. Text, stop
sequences, protobuf and asyncio are the frontend's business (serve/engine.py); the loop that
feeds the core and carries its outputs (serve/loop.py) runs it in a process of its own or in a
thread of the server's.

Rows 0..max_batch_size-1 of the runner hold the batch, contiguous from 0: first the rows that
decode, then the rows still prefilling, in the order their prompts get the step's token budget.
A step is: speculative calls (on the session rows above the batch), admissions (each new row
starts with the longest cached prefix of its prompt, copied from the prefix pool; every arrival
waiting is admitted at once), one prefill forward of up to `prefill_chunk` prompt tokens over the
first prefilling rows, all of them together (so a long prompt arriving mid-stream costs running
streams one chunk per step, not the whole prompt; on one GPU, opt-in, it runs beside the decode step
launched ahead where their rows and blocks are apart: `ModelRunner.prefill_beside`), one decode step
of the decoding rows, which the rows whose prefill completed join from the next step on, then
finished rows leave and the last rows move into their places. Where the runner offers it
(`mixed_step`), the prefill chunks and the decoding rows' tokens are one pass instead of two
(`_mixed`; docs/serving.md, "Mixed steps").
Every Verify call of a step runs in one forward pass over the session rows
(`SpeculativeSessions.verify_many`), before the step's decode pass: many edge devices verifying at once
cost one pass of the model, not one each ("verify_alone" keeps one pass per call, for comparison). With the
verify pipeline (on in an engine process on CUDA, else opt-in: `verify_pipeline_on`) a step launches its Verify
calls' pass and then finishes the group an earlier step launched, so the device computes one group while the host
judges, settles and replies to the other, and the loop gathers that group's next calls (docs/serving.md, "The verify
pipeline").
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.errors import EngineFailed, EngineOverloaded, EngineStopped
from stratus_workers.serve.prefix import Cursor, PrefixCache
from stratus_workers.serve.runner import Decoded, ModelRunner, decoded, env_flag, env_int, no_mark, to_device
from stratus_workers.serve.runner.cache import KVCache
from stratus_workers.serve.sampling import Choice, choose_tokens, seeded_generator
from stratus_workers.serve.sessions import PendingVerify, SpeculativeSessions, VerifyCall
from stratus_workers.serve.surface import Alternatives, FinishReason, VerifyResult, rebuilt

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512
PREFIX_BLOCK = 16
# The verify pipeline splits a step's Verify calls into two groups only when each gets at least this many: a
# smaller pass costs about as much as the larger one would (the model's weights are read once either way), so
# splitting a few calls buys little overlap for a second read of the weights. STRATUS_VERIFY_MIN_GROUP overrides.
MIN_VERIFY_GROUP = 8
# Arrivals held back while rows decode (`prefill_hold`) are admitted together once this many wait.
PREFILL_GROUP = 4
# A step mixes its prefill into the decode rows' pass (`runner.mixed_step`) only while no decoding row holds more keys
# than this: the packed pass reads each row's keys on its own, where the decode step's kernel splits long rows and
# reads a shared prefix once for all of them. On an H200 mixing 64 rows after a cached 3,000-token system prompt took
# 12.5 ms a step against 4.3 unmixed (docs/benchmarks.md, "Session 25"); 64-token prompts (~200 keys) gained.
MIX_MAX_KEYS = 512


def verify_pipeline_on(default: bool = False) -> bool:
    """Whether an engine core runs the verify pipeline: STRATUS_VERIFY_PIPELINE, else `default`. The engine process
    of one CUDA device turns it on by default (`loop.pipeline_default`): there the frontend's replies and the next
    calls run in the other process while the device computes, and on an H200 at 64 sessions (~1B, 512 new tokens) it
    measured 2.03x cloud-only against 1.67x without it (means of three runs each; the same 1.42x either way at 128),
    and after the verdict graphs 3.39x against 2.45x and 2.52x (16-token drafts, one machine, session 14).
    Elsewhere it stays off: in a thread engine the frontend and the engine share one interpreter lock, and there it
    measured 4-5% slower (its two half-size passes cost 3.2 ms of device time each against 4.7 ms for one pass of
    all); on the CPU the device is the host and nothing overlaps (docs/benchmarks.md, "the verify pipeline")."""
    return env_flag("STRATUS_VERIFY_PIPELINE", default)


def prefill_grouping(default_hold: int = 0) -> tuple[int, int]:
    """An engine core's prefill grouping, (hold steps, group size): STRATUS_PREFILL_HOLD (0: off) else `default_hold`,
    and STRATUS_PREFILL_GROUP else PREFILL_GROUP (`EngineCore`; docs/serving.md, "Prefill grouping")."""
    hold = env_int("STRATUS_PREFILL_HOLD", default_hold, 0, 1 << 10)
    return hold, env_int("STRATUS_PREFILL_GROUP", PREFILL_GROUP, 1, 1 << 16)


# A group of Verify calls launched (`SpeculativeSessions.launch`), or the error that kept it from launching.
_Group = tuple[list[tuple[int, VerifyCall]], PendingVerify | Exception]


@dataclass(frozen=True)
class EngineRequest:
    """A request as the core sees it: token ids, how to choose the next ones, and a monotonic deadline."""

    seq_id: int
    prompt: Sequence[int]
    params: Sampling
    deadline: float | None = None


@dataclass(frozen=True)
class Finished:
    """A request the core is done with; `admitted` and `first_token` are time.monotonic() stamps (0: never)."""

    seq_id: int
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    admitted: float
    first_token: float
    error: str = ""


@dataclass(frozen=True)
class EngineStats:
    """The core's counters after a step (cumulative where named so)."""

    active: int = 0
    waiting: int = 0
    sessions: int = 0
    steps: int = 0
    prefix_queried_tokens: int = 0  # cumulative: prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # cumulative: prompt tokens whose keys and values were copied, not computed
    prefix_evicted_blocks: int = 0  # cumulative
    prefix_blocks: int = 0  # blocks the prefix pool holds now
    prefill_tokens: int = 0  # cumulative: prompt tokens computed
    forward_passes: int = 0  # cumulative: the model's forward passes (decode steps, prefill chunks, calls)
    forward_positions: int = 0  # cumulative: token positions those passes computed
    mixed_steps: int = 0  # cumulative: steps whose decode rows and prefill chunks ran as one pass
    prefill_steps: int = 0  # cumulative: steps that prefilled prompt tokens (fewer with prefill grouping)
    shared_prefix_rows: int = 0  # rows reading the shared prefix now (runner/cache.py), not a copy of their own
    cascade_steps: int = 0  # cumulative: decode steps that read the shared prefix once for all its rows


# An EngineStats as the tuple of its fields, in their order (what `EngineStats(*values)` takes back).
_stats_values = operator.attrgetter(*(f.name for f in dataclasses.fields(EngineStats)))


@dataclass
class StepOutput:
    """What one step produced: entry i of `seq_ids`/`tokens` is one new token of that request.

    A request that got several tokens in a step appears several times, in order. `logprobs` is
    aligned with `tokens` when any row asked for log-probabilities (0.0 where its row did not),
    else None; `top`, likewise, when any row asked for alternatives ((token id, log-probability)
    pairs, most likely first). `results` answer speculative calls: (call id, error kind or "",
    value or message).
    """

    step: int
    seq_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finished: list[Finished] = field(default_factory=list)
    results: list[tuple[int, str, Any]] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
    top: list[Alternatives] | None = None

    def add(self, seq_id: int, token: int, logprob: float | None, top: Alternatives = ()) -> None:
        if logprob is not None and self.logprobs is None:
            self.logprobs = [0.0] * len(self.tokens)
        if top and self.top is None:
            self.top = [()] * len(self.tokens)
        self.seq_ids.append(seq_id)
        self.tokens.append(token)
        if self.logprobs is not None:
            self.logprobs.append(0.0 if logprob is None else logprob)
        if self.top is not None:
            self.top.append(top)

    def pack(self, plain_verdicts: bool = False) -> tuple[Any, ...]:
        """A plain tuple (what goes over the engine channel; cheaper to pickle than dataclasses). With
        `plain_verdicts` (for a channel that pickles it) each Verify call's verdict goes as (call id, accepted,
        next token, log-probabilities, eos) in its place among the results: a step of 64 verdicts packed and pickled
        in 11 µs instead of 42 (`make bench-channel`); `unpack` makes them `VerifyResult`s again."""
        finished = [
            (f.seq_id, f.reason, f.prompt_tokens, f.completion_tokens, f.cached_tokens, f.admitted, f.first_token,
             f.error)
            for f in self.finished
        ]  # fmt: skip
        stats = _stats_values(self.stats)
        results: list[tuple[Any, ...]] = self.results
        if plain_verdicts and results:
            results = [
                (r[0], v.accepted, v.next_token, v.logprobs, v.eos) if type(v := r[2]) is VerifyResult and not r[1]
                else r
                for r in results
            ]  # fmt: skip
        return (self.step, self.seq_ids, self.tokens, self.logprobs, finished, results, stats, self.top)

    @classmethod
    def unpack(cls, packed: tuple[Any, ...]) -> StepOutput:
        step, seq_ids, tokens, logprobs, finished, results, stats, top = packed
        finished_ = [Finished(*f) for f in finished]
        if results:
            results = [r if len(r) == 3 else _verdict(r) for r in results]
        return cls(step, seq_ids, tokens, logprobs, finished_, results, EngineStats(*stats), top)


def _verdict(packed: tuple[Any, ...]) -> tuple[int, str, VerifyResult]:
    """A result `StepOutput.pack` sent as a plain verdict, as the core made it: (call id, "", its VerifyResult)."""
    if len(packed) != 5:
        raise ValueError(
            f"a step message's result is (call id, error kind, value) or a verdict (call id, accepted, next token, "
            f"log-probabilities, eos), not {packed!r}"
        )
    call_id, accepted, next_token, logprobs, eos = packed
    return call_id, "", rebuilt(
        VerifyResult, {"accepted": accepted, "next_token": next_token, "logprobs": logprobs, "eos": eos}
    )


# Error kinds of a speculative call's result, and the exception each becomes again in the frontend.
CALL_ERRORS: dict[str, type[Exception]] = {
    "overloaded": EngineOverloaded,
    "stopped": EngineStopped,
    "invalid": ValueError,
    "error": RuntimeError,
}


def call_error_kind(exc: Exception) -> str:
    if isinstance(exc, EngineOverloaded):
        return "overloaded"
    if isinstance(exc, EngineStopped):
        return "stopped"
    if isinstance(exc, ValueError):
        return "invalid"
    return "error"


@dataclass(eq=False)
class _Seq:
    seq_id: int
    prompt: list[int]
    params: Sampling
    deadline: float | None
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # generated tokens, for the penalties
    arrived: int = 0  # the step it was added before
    row: int = -1
    prefilled: int = 0  # prompt tokens whose keys and values the row holds
    cached: int = 0  # of those, copied from the prefix cache
    cursor: Cursor | None = None  # how far its tokens are stored in the prefix cache (its inserts start there)
    admitted: float = 0.0
    first_token: float = 0.0
    cancelled: bool = False
    finished: bool = False


class EngineCore:
    """The scheduler and its runner; every method runs on the one thread that owns the runner."""

    def __init__(
        self,
        runner: ModelRunner,
        sessions: SpeculativeSessions,
        eos: frozenset[int],
        *,
        max_batch_size: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix: PrefixCache | None = None,
        verify_pipeline: bool | None = None,
        prefill_hold: int = 0,
        prefill_group: int = PREFILL_GROUP,
    ) -> None:
        if sessions.runner is not runner or sessions.first_row < max_batch_size:
            raise ValueError(
                f"the sessions must use rows {max_batch_size} and up of this engine's runner "
                f"(rows 0..{max_batch_size - 1} hold the decode batch)"
            )
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if prefill_hold < 0 or prefill_group < 1:
            raise ValueError(
                f"prefill_hold must be 0 (off) or more steps and prefill_group at least 1, got {prefill_hold} and "
                f"{prefill_group}"
            )
        if prefix is not None and prefix.capacity * prefix.block_size > runner.pool_tokens:
            raise ValueError(
                f"the prefix cache wants {prefix.capacity * prefix.block_size} tokens; the runner's pool holds "
                f"{runner.pool_tokens}"
            )
        self.runner = runner
        self.sessions = sessions
        self.eos = eos
        self.max_batch_size = max_batch_size
        self.max_len = runner.max_len
        self.prefill_chunk = prefill_chunk
        self.prefix = prefix
        # Prefill grouping (docs/serving.md, "Prefill grouping"): while rows decode, an arrival may wait up to
        # `prefill_hold` steps for others (until `prefill_group` wait), so that several prompts share one prefill
        # pass and fewer steps carry one. On an H200 it bought 2-6% tokens/s at 64 streams for 3-6 ms of TTFT p95
        # (a prefill pass's cost grows with its prompts more than we assumed), so it is off unless asked for.
        self.prefill_hold = prefill_hold
        self.prefill_group = prefill_group
        self.steps = 0
        # Names the verify pipeline's phases on a trace's timeline (serve/loop.py's StepTrace sets a profiler's).
        self.mark: Callable[[str], contextlib.AbstractContextManager[Any]] = no_mark
        # Takes a step's output so far as soon as the step has chosen the first tokens of rows that finished their
        # prompts (their callers' first token should not wait for the decoding rows' tokens and the step's
        # bookkeeping); the step's own output then holds the rest. None: everything goes with the step's output.
        self.on_part: Callable[[StepOutput], None] | None = None
        self.prefill_steps = 0  # steps that ran a prefill chunk
        self.prefill_tokens = 0
        self.mixed_steps = 0
        self.mixed_on_device = 0  # of those, fed the step launched ahead's choices on the device
        self.primed_on_device = 0  # mixed passes the next decode step was queued behind, fed their argmax
        self.prefills_beside = 0  # prefills run beside the decode step launched ahead (runner.prefill_beside)
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._rows: list[_Seq] = []  # row i holds _rows[i]
        self._decoding = 0  # rows 0.._decoding-1 decode; the rest are prefilling
        self._seqs: dict[int, _Seq] = {}
        self._calls: list[tuple[int, Callable[[], Any]]] = []
        self._verifies: list[tuple[int, VerifyCall]] = []  # this step's Verify calls: one pass for all
        self._expecting: set[str] = set()  # sessions last replied to (a Verify step): their next round is due
        self._arrived: set[str] = set()  # ... those of them whose next Verify call is queued (verify_owed: O(1))
        self._replied_at = -1  # the step that last replied to Verify calls (it resets the two sets above)
        # The verify pipeline (docs/serving.md): a step launches its Verify calls' pass, then finishes the group an
        # earlier step launched, so the device computes one group while the host settles and replies to the other.
        # Off unless asked for (STRATUS_VERIFY_PIPELINE); `build_core` passes an engine process's default in.
        if verify_pipeline is None:
            verify_pipeline = verify_pipeline_on()
        self.verify_pipeline = verify_pipeline
        # Read only with the pipeline on: a bad value of a switch that does nothing must not stop an engine starting.
        self.min_verify_group = (
            env_int("STRATUS_VERIFY_MIN_GROUP", MIN_VERIFY_GROUP, 1, 1 << 16) if verify_pipeline else MIN_VERIFY_GROUP
        )
        self._in_flight: _Group | None = None  # the group launched and not yet finished (at most one)
        self.verify_groups = 0  # groups launched
        self.verify_overlapped = 0  # of those, launched while another was in flight (the pipeline's point)
        self._counted = (0, 0)  # the runner's (passes, positions) before serving began
        self._out = StepOutput(0)

    def warmup(self) -> int:
        """Prepare before traffic: the runner's decode graphs (CUDA), then one small prefill and decode
        step, so that the first request does not pay for the libraries' lazy start. Returns the graphs."""
        graphs = self.runner.warmup()
        with torch.inference_mode():
            self.runner.forward(0, [[0, 0]])
            self.runner.decode([0])
            self.runner.reset(0)
        # The compute counters report serving work: the warm-up's passes are not counted.
        self._counted = (getattr(self.runner, "passes", 0), getattr(self.runner, "positions", 0))
        return graphs

    # -- inputs (between steps) ------------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        if not request.prompt:
            raise ValueError("the prompt has no tokens")
        if len(request.prompt) >= self.max_len:
            raise ValueError(
                f"the prompt has {len(request.prompt)} tokens; this server's context holds {self.max_len - 1}"
            )
        bias = request.params.logit_bias
        if bias and bias[-1][0] >= self.runner.vocab_size:
            raise ValueError(f"logit_bias names token ids outside this model's vocabulary of {self.runner.vocab_size}")
        generator = None if request.params.greedy else seeded_generator(request.params.seed)
        seq = _Seq(request.seq_id, list(request.prompt), request.params, request.deadline, generator)
        seq.arrived = self.steps
        self._seqs[seq.seq_id] = seq
        self._waiting.append(seq)

    def abort(self, seq_id: int) -> None:
        """Cancel a request (it leaves at the next step; an unknown id is one that already finished)."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            seq.cancelled = True

    def call(self, call_id: int, op: str, args: tuple[Any, ...]) -> None:
        """Queue a speculative call (`score`, `draft`, `verify`, `end`); its result comes in a step's output."""
        if op == "verify":  # batched: the step runs every Verify call in one pass (or two groups: the pipeline)
            call = VerifyCall(*args)
            self._verifies.append((call_id, call))
            if call.sid in self._expecting:
                self._arrived.add(call.sid)
            return
        methods: dict[str, Callable[..., Any]] = {
            "score": self.sessions.score,
            "score_with_alternatives": self.sessions.score_with_alternatives,
            "draft": self.sessions.draft,
            "verify_alone": self.sessions.verify,  # one pass per call (benchmarks compare)
            "end": self.sessions.end,
        }
        if op == "end":  # a session that ends sends no next round
            self._expecting.discard(args[0])
            self._arrived.discard(args[0])
        method = methods.get(op)
        if method is None:
            raise ValueError(f"unknown engine call {op!r}")
        self._calls.append((call_id, lambda: method(*args)))

    def verify_owed(self) -> int:
        """How many sessions last replied to have not sent their next Verify call yet (nor ended), while this step
        has no request to decode or admit and a Verify call is queued or a group is in flight (the loop may wait a
        moment for them: they share one pass, and a group in flight keeps the device busy meanwhile). 0 whenever a
        request is running or waiting: a decode step is never held back. A session in flight is never owed (its
        call arrived before it was launched)."""
        if (not self._verifies and self._in_flight is None) or self._rows or self._waiting or not self._expecting:
            return 0
        if not self._verifies and self._in_flight is not None and self._in_flight_done():
            return 0  # nothing queued, and the group in flight is computed: waiting would only delay its reply
        # Counted as calls arrive (`call`): the loop asks after every message while it gathers a step's calls.
        return len(self._expecting) - len(self._arrived)

    @property
    def busy(self) -> bool:
        # A group in flight is work: the loop must step again (and finish it), never sleep on it.
        return bool(self._waiting or self._rows or self._calls or self._verifies or self._in_flight is not None)

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> EngineStats:
        p = self.prefix.stats if self.prefix is not None else None
        cache = getattr(self.runner, "cache", None)
        return EngineStats(
            active=len(self._rows),
            waiting=len(self._waiting),
            sessions=len(self.sessions),
            steps=self.steps,
            prefix_queried_tokens=p.queried_tokens if p else 0,
            prefix_hit_tokens=p.hit_tokens if p else 0,
            prefix_evicted_blocks=p.evicted_blocks if p else 0,
            prefix_blocks=len(self.prefix) if self.prefix is not None else 0,
            prefill_tokens=self.prefill_tokens,
            forward_passes=getattr(self.runner, "passes", 0) - self._counted[0],
            forward_positions=getattr(self.runner, "positions", 0) - self._counted[1],
            mixed_steps=self.mixed_steps,
            prefill_steps=self.prefill_steps,
            shared_prefix_rows=cache.sharing(cache.rows) if isinstance(cache, KVCache) else 0,
            cascade_steps=getattr(getattr(self.runner, "decoder", None), "cascade_steps", 0),
        )

    # -- a step ----------------------------------------------------------------------------------

    def step(self) -> StepOutput:
        """Run one step and say what it produced."""
        out = self._out = StepOutput(self.steps)
        calls, self._calls = self._calls, []
        verifies, self._verifies = self._verifies, []
        if self._in_flight is not None and (calls or self._needs_in_flight(verifies)):
            # A Draft, Score or end call, or Verify calls naming the group's sessions (or wanting rows it holds):
            # the group in flight first, so every call sees the sessions as the steps before left them.
            self._reply(self._take_in_flight(), out)
        for call_id, run in calls:  # speculative calls: a few forward passes each, on the session rows
            try:
                out.results.append((call_id, "", run()))
            except EngineFailed:
                raise
            except Exception as exc:
                out.results.append((call_id, call_error_kind(exc), str(exc)))
        if verifies and not self.verify_pipeline:
            self._reply(self._launch(verifies), out)
        elif verifies:
            self._pipeline(verifies, out)
        elif self._in_flight is not None:  # nothing new to queue behind it: finish it now
            self._reply(self._take_in_flight(), out)
        self._drop_abandoned()
        mark = self.mark
        with mark("admit"):
            admitted = self._admit()
        try:
            # Prefill first: its forward queues behind the decode step already running ahead (the GPU's), or
            # runs beside it where the runner does that (`prefill_beside`), and the rows it completes join the
            # decode batch from the next step on, as part of the step launched ahead. Where the runner takes
            # their first tokens on the device (greedy rows, decode-ahead), the next decode step is queued right
            # behind the prefill and the host reads those tokens while it runs; otherwise they are chosen first,
            # then the decode step.
            joined: list[_Seq] = []
            if len(self._rows) > self._decoding and self._decoding and self.runner.mixed_step and self._mixes():
                self._load(admitted)
                joined = self._mixed()
            elif len(self._rows) > self._decoding:
                # Not beside the passes of this step's Verify calls or speculative calls: they share its buffers.
                rows = range(self._decoding, len(self._rows))
                slots = [slot for _, seq_slots, _ in admitted for slot in seq_slots]
                beside = contextlib.nullcontext(False) if calls or verifies else self.runner.prefill_beside(rows, slots)
                with mark("prefill"), beside as aside:
                    with mark("load"):
                        self._load(admitted)
                    ready, logits = self._prefill()
                self.prefills_beside += aside
                with mark("join"):
                    if ready and self._decoding and self._device_join(ready):
                        step = self._run_decode(logits[: len(ready)].argmax(dim=-1))
                        with mark("first"):
                            self._finish_prefill(ready, logits, step.joined)
                            self._send_part()
                        self._advance_decoded(step)
                    else:
                        if ready:
                            self._finish_prefill(ready, logits, None)
                            if self._decoding:  # (with no row decoding the step's output follows at once)
                                self._send_part()
                        if self._decoding:  # a joining row its first token ended leaves at the step's end: any token
                            self._decode([s.generated[-1] if s.generated else 0 for s in ready])
                joined = ready
            elif self._decoding:
                with mark("decode"):
                    self._decode([])
            self._decoding += len(joined)
            if self.prefix is not None and joined:  # after the decode step is launched: the copies queue behind it
                with mark("store"):
                    for seq in joined:  # later requests with the same prompt start from here at once
                        if not seq.finished:  # (one that finished stored its prompt and answer already)
                            self._store(seq, seq.prompt)
        except EngineFailed:  # the runner cannot compute any more (a pipeline stage died): the loop ends
            raise
        except Exception as exc:  # keep serving: fail only the requests in flight
            log.exception("engine step failed")
            if self.prefix is not None:  # a copy into the pool may not have happened: trust nothing in it
                self.prefix = PrefixCache(self.prefix.block_size, self.prefix.capacity)
            for seq in list(self._rows):
                self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        with mark("settle"):
            self._expire()
            self._compact()
        self.steps += 1
        out.stats = self.stats()
        return out

    def _pipeline(self, verifies: list[tuple[int, VerifyCall]], out: StepOutput) -> None:
        """The verify pipeline's step: launch `verifies`, then finish the group in flight (whose pass ran while this
        step's calls were gathered and launched); the group launched last stays in flight, and the two groups
        alternate: one's calls are gathered and launched while the other's pass runs.

        The groups are kept about the same size (a small group's pass hides little of the host's work on the other):
        when the new calls outnumber the group in flight (none: 0) by at least twice `min_verify_group`, the first
        (new - in flight) / 2 of them are a group of their own, launched and finished now, together with the group
        in flight, and the rest stays in flight: the sessions replied to now come back as one group of about the
        other's size. (64 calls with nothing in flight: two groups of 32.)"""
        flying = self._in_flight
        first = (len(verifies) - (len(flying[0]) if flying is not None else 0)) // 2
        groups = [verifies]
        if first >= self.min_verify_group and len({call.sid for _, call in verifies}) == len(verifies):
            groups = [verifies[:first], verifies[first:]]  # (a session named twice stays in one group)
        launched = [self._launch(group) for group in groups]
        self.verify_overlapped += flying is not None
        if flying is not None:
            self._reply(self._take_in_flight(), out)
        for group in launched[:-1]:  # its pass ran behind the group in flight's; the last one's is queued behind it
            self._reply(group, out)
        self._in_flight = launched[-1]

    def _needs_in_flight(self, verifies: list[tuple[int, VerifyCall]]) -> bool:
        """Whether `verifies` name a session of the group in flight, or need more new sessions than there are free
        rows (the group's calls may end sessions: without the pipeline they would have, by now)."""
        assert self._in_flight is not None
        pending = self._in_flight[1]
        flying = pending.sids if isinstance(pending, PendingVerify) else frozenset()
        sids = {call.sid for _, call in verifies}
        if not flying.isdisjoint(sids):
            return True
        sessions = self.sessions
        return sum(sid not in sessions for sid in sids) > sessions.free_rows

    def _in_flight_done(self) -> bool:
        pending = self._in_flight[1] if self._in_flight is not None else None
        return not isinstance(pending, PendingVerify) or pending.ready()

    def _take_in_flight(self) -> _Group:
        group = self._in_flight
        assert group is not None
        self._in_flight = None
        return group

    def _launch(self, verifies: list[tuple[int, VerifyCall]]) -> _Group:
        self.verify_groups += 1
        try:
            with self.mark("launch"):
                return verifies, self.sessions.launch([call for _, call in verifies])
        except EngineFailed:  # the runner cannot compute any more (a pipeline stage died): the loop ends
            raise
        except Exception as exc:  # fails only this group's calls
            return verifies, exc

    def _reply(self, group: _Group, out: StepOutput) -> None:
        """Finish a launched group and put its results in `out`; its sessions' next rounds are due now."""
        verifies, pending = group
        verdicts: list[Any]
        if isinstance(pending, Exception):
            verdicts = [pending] * len(verifies)
        else:
            try:
                with self.mark("reply"):
                    verdicts = self.sessions.finish(pending)
            except EngineFailed:
                raise
            except Exception as exc:  # fails only this group's calls
                verdicts = [exc] * len(verifies)
        if self._replied_at != self.steps:  # the first reply of this step: what was owed before is not now
            self._replied_at = self.steps
            self._expecting = set()
            self._arrived = set()
        for (call_id, call), verdict in zip(verifies, verdicts, strict=True):
            if isinstance(verdict, Exception):
                out.results.append((call_id, call_error_kind(verdict), str(verdict)))
            else:
                out.results.append((call_id, "", verdict))
                if not call.end and not verdict.eos:
                    self._expecting.add(call.sid)

    def idle(self) -> None:
        """Housekeeping while nothing is queued: end speculative sessions idle past their time to live."""
        self.sessions.expire()

    def shutdown(self, reason: str = "server shutting down") -> StepOutput:
        """End every request and call: requests finish cancelled, calls fail as stopped; a verification group in
        flight is finished (its pass was queued: its calls get their results, or its error)."""
        out = self._out = StepOutput(self.steps)
        if self._in_flight is not None:
            self._reply(self._take_in_flight(), out)
        for seq in [*self._rows, *self._waiting]:
            self._finish(seq, "cancelled", error=reason)
        for call_id, _ in [*self._calls, *self._verifies]:
            out.results.append((call_id, "stopped", reason))
        self._calls.clear()
        self._verifies.clear()
        self._rows.clear()
        self._waiting.clear()
        self._decoding = 0
        out.stats = self.stats()
        return out

    def _drop_abandoned(self) -> None:
        """End waiting requests that were cancelled or ran out of time now, not when a row frees: until
        then they would hold places in the queue (the request-mix fuzzer found this)."""
        now = time.monotonic()
        if any(s.cancelled or (s.deadline is not None and now > s.deadline) for s in self._waiting):
            keep: collections.deque[_Seq] = collections.deque()
            for seq in self._waiting:
                if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                    self._finish(seq, "cancelled" if seq.cancelled else "deadline")
                else:
                    keep.append(seq)
            self._waiting = keep

    def _holds(self) -> bool:
        """Whether this step leaves the arrivals waiting (prefill grouping): rows decode and none prefills, a row is
        free, fewer than `prefill_group` wait, and the first of them arrived fewer than `prefill_hold` steps ago."""
        waiting = self._waiting
        return (
            0 < len(waiting) < self.prefill_group
            and 0 < self._decoding == len(self._rows) < self.max_batch_size
            and self.steps - waiting[0].arrived < self.prefill_hold
        )

    def _admit(self) -> list[tuple[_Seq, list[int], list[int]]]:
        """Give waiting requests rows: each with the pool slots and ids of its cached prefix, for `_load` to put
        into its row (on the host only: the device work is `_load`'s, queued where the prefill's goes)."""
        admitted: list[tuple[_Seq, list[int], list[int]]] = []
        if self.prefill_hold and self._holds():
            return admitted
        now = time.monotonic()
        while self._waiting and len(self._rows) < self.max_batch_size:
            seq = self._waiting.popleft()
            if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                self._finish(seq, "cancelled" if seq.cancelled else "deadline")
                continue
            seq.row = len(self._rows)
            seq.admitted = now
            slots: list[int] = []
            ids: list[int] = []
            if self.prefix is not None:
                slots, ids, seq.cursor = self.prefix.lookup(seq.prompt)
                seq.prefilled = seq.cached = len(slots) * self.prefix.block_size
            admitted.append((seq, slots, ids))
            self._rows.append(seq)
        return admitted

    def _load(self, admitted: list[tuple[_Seq, list[int], list[int]]]) -> None:
        """Empty the admitted requests' rows and copy in their cached prefixes."""
        for seq, slots, ids in admitted:
            self.runner.reset(seq.row)
            if slots:
                assert self.prefix is not None
                self.runner.load_prefix(seq.row, slots, self.prefix.block_size, ids)

    def _device_join(self, ready: list[_Seq]) -> bool:
        return bool(getattr(self.runner, "device_join", False)) and all(
            s.params.greedy and not s.params.adjusts_logits and not s.params.logprobs for s in ready
        )

    def _decode(
        self, join: list[int] | torch.Tensor, hold: bool = False, then: Callable[[], None] | None = None
    ) -> list[int] | None:
        """Decode the decoding rows; `join`: the first tokens of the rows joining from the next step (a
        device tensor: their greedy choices, which come back as the result); `hold`, `then`: as `runner.decode`'s."""
        step = self._run_decode(join, hold, then)
        self._advance_decoded(step)
        return step.joined

    def _run_decode(
        self, join: list[int] | torch.Tensor, hold: bool = False, then: Callable[[], None] | None = None
    ) -> Decoded:
        """`_decode`'s first half: the runner's decode step (`joined`: the joining rows' first tokens, where given on
        the device), the rows not advanced yet."""
        seqs = self._rows[: self._decoding]
        with self.mark("runner"):
            return self.runner.decode(
                [s.generated[-1] for s in seqs], logprobs=any(s.params.logprobs for s in seqs), join=join, hold=hold,
                then=then,
            )

    def _advance_decoded(self, step: Decoded) -> None:
        """`_decode`'s second half: the decoding rows' tokens chosen from the step's logits, and added."""
        seqs = self._rows[: self._decoding]
        params = [s.params for s in seqs]
        with self.mark("choose"):
            choice = choose_tokens(step.logits, params, [s.generator for s in seqs], step, [s.counts for s in seqs])
            self._advance_all(seqs, choice)

    def _send_part(self) -> None:
        """Hand what the step's output holds so far to `on_part` (the first tokens just chosen, results and ends before
        them), and keep collecting the rest in it."""
        out = self._out
        if self.on_part is None or not out.tokens:
            return
        part = StepOutput(out.step, out.seq_ids, out.tokens, out.logprobs, out.finished, out.results, top=out.top)
        out.seq_ids, out.tokens, out.finished, out.results = [], [], [], []
        out.logprobs = None if out.logprobs is None else []  # (still aligned with the tokens: `add` fills it)
        out.top = None if out.top is None else []
        self.on_part(part)

    def _mixed(self) -> list[_Seq]:
        """The decoding rows' next tokens and the step's prefill chunks in one pass; the rows whose prompts are
        complete now (their first tokens chosen)."""
        runner = self.runner
        launched: list[tuple[list[_Seq], list[list[int]], torch.Tensor, bool, bool]] = []
        first = self._rows[: self._decoding]
        if runner.ahead_in_flight():
            # The decode step launched ahead is this step's: take it, launch none after it, and mix the tokens
            # after it with the prefill (each decoding row gets two tokens this step). Where those tokens are its
            # greedy choices, the mixed pass is queued right behind it, fed them on the device, before the host
            # waits for it; otherwise once the host has chosen them.

            def launch() -> None:
                # Rows that finish on the step's tokens are in the pass all the same: their extra key lies past what
                # they keep, and the step primed behind the pass writes one more, in the runner's spare slots where
                # a row finishes by length (its capacity). A runner without that room keeps the host path.
                if max(runner.lengths[: len(first)]) + 2 <= runner.capacity:
                    seqs, chunks = self._chunks()
                    rows = [*range(len(first)), *(s.row for s in seqs)]
                    feed = [*([0] for _ in first), *chunks]
                    logits = runner.forward_mixed(rows, feed, from_decode=len(first))
                    primed = self._prime_on_device(first, seqs, chunks, logits)
                    launched.append((seqs, chunks, logits, runner.mixed_step, primed))

            greedy = all(s.params.greedy and not s.params.adjusts_logits for s in first)
            self._decode([], hold=True, then=launch if greedy else None)
        if launched:
            seqs, chunks, logits, mixed, primed = launched[0]
            picked = [i for i, s in enumerate(first) if not s.finished]
            decoding = [first[i] for i in picked]
            n = len(first)
            decode_logits = logits[:n] if len(picked) == n else logits[to_device(picked, logits.device)]
            self.mixed_on_device += mixed
        else:
            decoding = [s for s in first if not s.finished]
            seqs, chunks = self._chunks()
            logits = runner.forward_mixed(
                [s.row for s in (*decoding, *seqs)], [*([s.generated[-1]] for s in decoding), *chunks]
            )
            mixed = runner.mixed_step
            primed = False
            if len(decoding) == len(first):  # rows 0.. in order: the pass's first logits are theirs
                primed = self._prime_on_device(decoding, seqs, chunks, logits)
            n = len(decoding)
            picked = list(range(n))
            decode_logits = logits[:n]
        self.mixed_steps += mixed  # a pass that failed ran apart and turned mixing off (runner.mixed_step): not one
        ready = self._prefilled(seqs, chunks)
        # Where the next decode step was primed on the pass's argmax, that argmax is on its way to the host already:
        # read it there. Reducing the logits again would queue behind the primed step and wait for it too.
        chosen = runner.primed_tokens() if primed and not any(s.params.logprobs for s in (*decoding, *ready)) else None
        if ready:
            first_tokens = None if chosen is None else chosen[n : n + len(ready)]
            self._finish_prefill(ready, logits[n : n + len(ready)], first_tokens)
        if decoding:
            params = [s.params for s in decoding]
            if chosen is not None:
                greedy_choice = Decoded(decode_logits, [chosen[i] for i in picked], None)
            else:
                greedy_choice = decoded(decode_logits, any(p.logprobs for p in params))
            counts = [s.counts for s in decoding]
            choice = choose_tokens(decode_logits, params, [s.generator for s in decoding], greedy_choice, counts)
            self._advance_all(decoding, choice)
        if not self._prefill_due(len(ready)):
            # No prefill is due next step: start its decode step now (unless it was, on the device), while the
            # host streams this one's tokens (rows that finished are fed anything: they leave before it is taken).
            rows = self._rows[: self._decoding + len(ready)]
            runner.prime_decode([s.generated[-1] if s.generated and not s.finished else 0 for s in rows])
        return ready

    def _mixes(self) -> bool:
        """Whether this step's prefill may share the decode rows' pass: none of them holds more than MIX_MAX_KEYS."""
        return max(self.runner.lengths[: self._decoding]) <= MIX_MAX_KEYS

    def _prefill_due(self, ready: int) -> bool:
        """Whether the next step will prefill (rows still prefilling once `ready` more joined, or arrivals)."""
        return len(self._rows) > self._decoding + ready or bool(self._waiting)

    def _prime_on_device(
        self, decoding: list[_Seq], seqs: list[_Seq], chunks: list[list[int]], logits: torch.Tensor
    ) -> bool:
        """Right behind a mixed pass of rows 0..len(decoding)-1 and the chunks of `seqs`, start the next decode step
        fed its argmax, where that is what the host will choose (every row greedy) and no prefill is due next: the
        GPU decodes on while the host reads the pass's choices (`runner.primed_tokens`) and streams its tokens.
        Whether it did."""
        ready = [s for s, chunk in zip(seqs, chunks, strict=True) if s.prefilled + len(chunk) == len(s.prompt)]
        fed = [*decoding, *ready]
        if self._prefill_due(len(ready)) or not all(s.params.greedy and not s.params.adjusts_logits for s in fed):
            return False
        self.runner.prime_decode(logits[: len(fed)].argmax(dim=-1))
        primed = self.runner.ahead_in_flight()  # (a runner that decodes one step at a time: no)
        self.primed_on_device += primed
        return primed

    def _prefill(self) -> tuple[list[_Seq], torch.Tensor]:
        """Prefill the step's chunks: the rows whose prompts are complete now, and the logits (theirs first)."""
        seqs, chunks = self._chunks()
        logits = self.runner.forward(self._decoding, chunks)
        return self._prefilled(seqs, chunks), logits

    def _chunks(self) -> tuple[list[_Seq], list[list[int]]]:
        """The step's prompt chunks and their rows (consecutive, from the first prefilling row)."""
        # Prompt chunks for the first prefilling rows, in row order, within the step's budget; every
        # row but the last one given a chunk gets all that is left of its prompt, so rows finish
        # their prefill in row order and join the decoding rows at the front.
        first = self._decoding
        budget = self.prefill_chunk
        seqs: list[_Seq] = []
        chunks: list[list[int]] = []
        for seq in self._rows[first:]:
            if budget <= 0:
                break
            take = min(len(seq.prompt) - seq.prefilled, budget)
            chunks.append(seq.prompt[seq.prefilled : seq.prefilled + take])
            seqs.append(seq)
            budget -= take
        return seqs, chunks

    def _prefilled(self, seqs: list[_Seq], chunks: list[list[int]]) -> list[_Seq]:
        """Count the chunks computed; the rows whose prompts are complete now (the first ones)."""
        done = 0
        self.prefill_steps += bool(chunks)
        for seq, chunk in zip(seqs, chunks, strict=True):
            seq.prefilled += len(chunk)
            self.prefill_tokens += len(chunk)
            done += seq.prefilled == len(seq.prompt)
        return seqs[:done]

    def _finish_prefill(self, ready: list[_Seq], logits: torch.Tensor | None, greedy: list[int] | None) -> None:
        """The first tokens of rows whose prompts are complete: chosen from `logits`, or the `greedy` ones given."""
        if greedy is not None:
            choice = Choice(greedy, None, None)
        else:
            assert logits is not None
            choice = choose_tokens(logits[: len(ready)], [s.params for s in ready], [s.generator for s in ready])
        now = time.monotonic()
        for seq in ready:
            seq.first_token = now
        self._advance_all(ready, choice)

    def _advance_all(self, seqs: list[_Seq], choice: Choice) -> None:
        out, eos, max_len = self._out, self.eos, self.max_len
        logprobs, alternatives = choice.logprobs, choice.alternatives
        # The common case, no log-probabilities anywhere in this step: straight into the output's lists.
        plain = logprobs is None and out.logprobs is None and out.top is None
        seq_ids, tokens = out.seq_ids, out.tokens
        for i, (seq, token) in enumerate(zip(seqs, choice.tokens, strict=True)):
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            if token in eos:
                self._finish(seq, "stop")
                continue
            seq.generated.append(token)
            params = seq.params
            if params.presence_penalty or params.frequency_penalty:
                seq.counts[token] = seq.counts.get(token, 0) + 1
            if plain:
                seq_ids.append(seq.seq_id)
                tokens.append(token)
            elif params.logprobs and logprobs is not None:
                out.add(seq.seq_id, token, logprobs[i], alternatives[i] if alternatives is not None else ())
            else:
                out.add(seq.seq_id, token, None)
            # The row's length by its tokens, not the runner's: a mixed pass queued behind the step that chose this
            # token holds the row's next key already.
            if len(seq.generated) >= params.max_new_tokens or len(seq.prompt) + len(seq.generated) >= max_len:
                self._finish(seq, "length")

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in self._rows:
            if seq.finished:
                continue
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "deadline")

    def _store(self, seq: _Seq, tokens: Sequence[int]) -> None:
        assert self.prefix is not None
        stored = self.prefix.insert(tokens, seq.cursor)
        seq.cursor = stored.cursor
        if stored.slots:
            self.runner.save_prefix(seq.row, stored.positions, stored.slots, self.prefix.block_size)

    def _finish(self, seq: _Seq, reason: FinishReason, error: str = "") -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.row >= 0 and self.prefix is not None and reason != "error":
            # What the row computed (prompt and answer) stays useful: a chat's next turn starts with it.
            held = self.runner.lengths[seq.row]
            self._store(seq, (seq.prompt + seq.generated)[:held])
        self._seqs.pop(seq.seq_id, None)
        self._out.finished.append(
            Finished(
                seq_id=seq.seq_id,
                reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.generated),
                cached_tokens=seq.cached,
                admitted=seq.admitted,
                first_token=seq.first_token,
                error=error,
            )
        )

    def _compact(self) -> None:
        # Keep the rows contiguous from 0, decoding rows first: a decoding row that left takes the
        # last decoding row, and the hole this leaves at the boundary (or a prefilling row that
        # left) takes the last row of all.
        for seq in sorted((s for s in self._rows if s.finished), key=lambda s: s.row, reverse=True):
            hole = seq.row
            if hole < self._decoding:
                last_decoding = self._decoding - 1
                if last_decoding != hole:
                    self._move(last_decoding, hole)
                hole = last_decoding
                self._decoding -= 1
            last = len(self._rows) - 1
            if last != hole:
                self._move(last, hole)
            self._rows.pop()
            self.runner.reset(last)

    def _move(self, src: int, dst: int) -> None:
        self.runner.move(src, dst)
        moved = self._rows[src]
        moved.row = dst
        self._rows[dst] = moved
