"""Engine: a continuous-batching scheduler that runs its model runner in its own thread.

The engine is given its runner (runner/build.py picks one) and the speculative sessions that
share the runner's rows; `build_engine` wires the three as a server does. Requests join the
running batch between decode steps and leave as soon as they finish, so a long answer never
holds a short one back. New arrivals are prefilled before the next decode step, which keeps time
to first token low under load. The engine thread talks to asyncio callers only through
per-request sinks, so the event loop never waits on torch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from stratus_workers.protocol.requests import Sampling
from stratus_workers.protocol.text import TextAssembler
from stratus_workers.serve.errors import EngineFailed, EngineOverloaded, EngineStopped
from stratus_workers.serve.mailbox import mailbox
from stratus_workers.serve.parallel import ParallelContext
from stratus_workers.serve.runner import ModelRunner
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.sampling import eos_ids, seeded_generator
from stratus_workers.serve.sessions import DraftResult, SpeculativeSessions, VerifyCall, VerifyResult
from stratus_workers.serve.speculative import SparseDist, sampling_probs

log = logging.getLogger(__name__)

# "unavailable": the engine itself failed; the request may succeed on another server.
FinishReason = Literal["stop", "length", "cancelled", "deadline", "error", "unavailable"]


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TokenLogprob, ...] = ()  # the most likely tokens here, when asked for


@dataclass(frozen=True)
class TokenEvent:
    """New text (possibly empty while a multi-byte character or stop sequence is pending)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    ttft_ms: float
    total_ms: float
    error: str = ""


Event = TokenEvent | FinishEvent
Sink = Callable[[Event], None]


@dataclass
class _Sequence:
    seq_id: int
    prompt: list[int]
    params: Sampling
    sink: Sink
    deadline: float | None
    arrived: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    first_token: float = 0.0
    generated: list[int] = field(default_factory=list)
    text: TextAssembler | None = None
    row: int = -1
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated tokens, for the penalties
    cancelled: bool = False
    finished: bool = False


class Engine:
    """Serves one model through its runner; thread-safe `submit`, asyncio-friendly `stream`.

    Rows 0..max_batch_size-1 of the runner hold the decode batch; the rows above them belong to
    `sessions` (speculative decoding), whose calls run in the engine thread between decode steps.
    If the loop ever dies, `failure` says why, `on_failure` hears it at once, and every waiting,
    running and later request ends with UNAVAILABLE instead of hanging.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        sessions: SpeculativeSessions,
        *,
        max_batch_size: int = 8,
        max_queue: int = 256,
        on_step: Callable[[int, int], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        if sessions.runner is not runner or sessions.first_row < max_batch_size:
            raise ValueError(
                f"the sessions must use rows {max_batch_size} and up of this engine's runner "
                f"(rows 0..{max_batch_size - 1} hold the decode batch)"
            )
        self.runner = runner
        self.tokenizer = tokenizer
        self.sessions = sessions
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_len = runner.max_len
        self.vocab_size = runner.vocab_size
        self._eos = eos_ids(runner.model, tokenizer)
        self._on_step = on_step
        self._on_failure = on_failure
        self._ops: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = collections.deque()
        self._running_ops: list[concurrent.futures.Future[Any]] = []
        # Verify calls wait here, not in _ops: each step runs all of them in one forward pass.
        self._verifies: list[tuple[VerifyCall, concurrent.futures.Future[Any]]] = []
        self.verify_together = True  # False: one forward pass per Verify call (the way it was; benchmarks)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why the loop died; None while it runs
        self.steps = 0

    # -- lifecycle ----------------------------------------------------------------------

    def warmup(self) -> int:
        """Prepare the runner before traffic (decode graphs on CUDA); returns how many graphs exist."""
        return self.runner.warmup()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stratus-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Release the runner after `shutdown` (under tensor parallel: the other ranks stop following)."""
        self.runner.close()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- submission ---------------------------------------------------------------------

    def submit(
        self, prompt: Sequence[int], params: Sampling, sink: Sink, deadline: float | None = None
    ) -> Callable[[], None]:
        """Queue a request; returns a function that cancels it. Events go to `sink` (engine thread)."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this server's context holds {self.max_len - 1}")
        if params.logit_bias and params.logit_bias[-1][0] >= self.vocab_size:
            raise ValueError(f"logit_bias names token ids outside this model's vocabulary of {self.vocab_size}")
        seq = _Sequence(next(self._ids), list(prompt), params, sink, deadline)
        if not params.greedy:
            seq.generator = seeded_generator(params.seed)
        with self._cond:
            self._check_running()
            if len(self._waiting) >= self.max_queue:
                self._drop_abandoned()
            if len(self._waiting) >= self.max_queue:
                raise EngineOverloaded(f"{len(self._waiting)} requests are already waiting; try again later")
            self._waiting.append(seq)
            self._cond.notify()

        def cancel() -> None:
            seq.cancelled = True
            with self._cond:
                self._cond.notify()

        return cancel

    def _drop_abandoned(self) -> None:
        """End waiting requests that were cancelled or ran out of time (caller holds the lock).

        The loop would end them only when a row frees up; until then they would hold places in the queue
        and turn live requests away as overloaded (the request-mix fuzzer found this).
        """
        now = time.monotonic()
        abandoned = [s for s in self._waiting if s.cancelled or (s.deadline is not None and now > s.deadline)]
        for seq in abandoned:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled" if seq.cancelled else "deadline")

    def _check_running(self) -> None:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if self._stopping:
            raise EngineStopped("the server is shutting down")

    async def stream(
        self, prompt: Sequence[int], params: Sampling, deadline: float | None = None
    ) -> AsyncIterator[Event]:
        """Yield events for one request; leaving the iterator early cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        box = mailbox(loop)  # one loop wake-up per decode step, not one per token

        def sink(event: Event) -> None:
            box.post(queue, event)

        cancel = self.submit(prompt, params, sink, deadline)
        finished = False
        try:
            while True:
                event = await queue.get()
                # When the caller falls behind (a busy event loop), send the tokens waiting as one event.
                while isinstance(event, TokenEvent) and not queue.empty():
                    following = queue.get_nowait()
                    if not isinstance(following, TokenEvent):
                        yield event
                        event = following
                        break
                    event = TokenEvent(
                        event.text + following.text,
                        event.token_ids + following.token_ids,
                        event.logprobs + following.logprobs,
                    )
                yield event
                if isinstance(event, FinishEvent):
                    finished = True
                    return
        finally:
            if not finished:
                cancel()

    # -- work between decode steps ------------------------------------------------------

    async def run_op(self, op: Callable[[], Any]) -> Any:
        """Run `op` in the engine thread between decode steps (it may use the runner)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            self._check_running()
            self._ops.append((op, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    async def score(self, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Log-probability of each continuation token after `prompt` (one forward pass)."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        result: tuple[float, ...] = await self.run_op(lambda: self.sessions.score(prompt, continuation))
        return result

    async def prompt_logprobs(self, prompt: Sequence[int], top: int = 0) -> tuple[TokenLogprob, ...]:
        """Each prompt token with its log-probability after the ones before it (Score's forward pass); the
        first token, which nothing predicts, gets 0. With `top`, the most likely tokens at each position."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        scored = await self.run_op(lambda: self.sessions.score_with_alternatives(prompt[:1], prompt[1:], top))
        logprobs, alternatives = scored
        decode = self.tokenizer.decode
        first = TokenLogprob(prompt[0], decode([prompt[0]]), 0.0)
        rest = (
            TokenLogprob(
                token,
                decode([token]),
                logprob,
                tuple(TokenLogprob(i, decode([i]), lp) for i, lp in alternatives[n]) if alternatives else (),
            )
            for n, (token, logprob) in enumerate(zip(prompt[1:], logprobs, strict=True))
        )
        return (first, *rest)

    async def draft(
        self,
        sid: str,
        context: Sequence[int],
        max_tokens: int,
        sampling: Sampling,
        top_k: int = 32,
        end: bool = False,
    ) -> DraftResult:
        result: DraftResult = await self.run_op(
            lambda: self.sessions.draft(sid, context, max_tokens, sampling, top_k, end)
        )
        return result

    async def verify(
        self,
        sid: str,
        context: Sequence[int],
        draft: Sequence[int],
        dists: Sequence[SparseDist],
        sampling: Sampling,
        end: bool = False,
    ) -> VerifyResult:
        if not self.verify_together:
            alone: VerifyResult = await self.run_op(
                lambda: self.sessions.verify(sid, context, draft, dists, sampling, end)
            )
            return alone
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            self._check_running()
            self._verifies.append((VerifyCall(sid, tuple(context), tuple(draft), tuple(dists), sampling, end), future))
            self._cond.notify()
        result: VerifyResult = await asyncio.wrap_future(future)
        return result

    async def end_session(self, sid: str) -> None:
        await self.run_op(lambda: self.sessions.end(sid))

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            # Everything the engine thread does is inference: no autograd bookkeeping, and tensors
            # the runner makes in one call are updated in place by the next without a mode mismatch.
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # the thread must never end quietly behind a serving health
            log.critical("engine loop died; this server stops serving", exc_info=exc)
            self._fail(exc)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active or self._ops or self._verifies):
                    self._cond.wait(timeout=self.sessions.ttl if len(self.sessions) else None)
                    self.sessions.expire()
                if self._stopping:
                    break
                admitted = self._admit()
                verifies, self._verifies = self._verifies, []
                self._running_ops = [future for _, future in (*self._ops, *verifies)]
                ops = list(self._ops)
                self._ops.clear()
            for op, future in ops:  # speculative calls: a few forward passes each
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(op())
                    except Exception as exc:
                        future.set_exception(exc)
            self._verify(verifies)
            self._running_ops = []
            try:
                if admitted:
                    self._prefill(admitted)
                    self._compact()
                if self._active:
                    self._decode()
            except Exception as exc:  # keep serving: fail only the requests in flight
                log.exception("engine step failed")
                for seq in list(self._active):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
            self._expire()
            self._compact()
            self.steps += 1
            if self._on_step is not None:
                self._on_step(len(self._active), len(self._waiting))
        for seq in [*self._active, *self._waiting]:
            self._finish(seq, "cancelled", error="server shutting down")
        for _, future in (*self._ops, *self._verifies):
            future.cancel()
        self._active.clear()
        self._waiting.clear()

    def _fail(self, exc: BaseException) -> None:
        """The loop died: refuse new work, end every request and call in flight, and say so."""
        message = f"the model engine stopped after an internal error ({type(exc).__name__}: {exc})"
        with self._cond:
            self.failure = message
            stranded = [*self._active, *self._waiting]
            futures = [*self._running_ops, *(future for _, future in (*self._ops, *self._verifies))]
            self._active.clear()
            self._waiting.clear()
            self._ops.clear()
            self._verifies.clear()
        if self._on_failure is not None:  # first: health should turn before callers hear of it
            try:
                self._on_failure(message)
            except Exception:
                log.exception("the engine's failure callback failed")
        for seq in stranded:
            self._finish(seq, "unavailable", error=message)
        for future in futures:
            if not future.done():
                future.set_exception(EngineFailed(message))

    def _verify(self, verifies: list[tuple[VerifyCall, concurrent.futures.Future[Any]]]) -> None:
        """This step's Verify calls, their rows in one forward pass (the ones still wanted)."""
        wanted = [(call, future) for call, future in verifies if future.set_running_or_notify_cancel()]
        if not wanted:
            return
        try:
            results = self.sessions.verify_many([call for call, _ in wanted])
        except Exception as exc:
            results = [exc] * len(wanted)
        for (_, future), result in zip(wanted, results, strict=True):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        while self._waiting and len(self._active) < self.max_batch_size:
            seq = self._waiting.popleft()
            if seq.cancelled or (seq.deadline is not None and time.monotonic() > seq.deadline):
                self._finish(seq, "cancelled" if seq.cancelled else "deadline")
                continue
            seq.row = len(self._active)
            seq.admitted = time.monotonic()
            self.runner.reset(seq.row)
            self._active.append(seq)
            admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[_Sequence]) -> None:
        # Rows are contiguous: the admitted ones are the tail of the active list.
        logits = self.runner.forward(seqs[0].row, [s.prompt for s in seqs])
        self._sample_and_emit(seqs, logits)

    def _decode(self) -> None:
        # After compaction the live rows are exactly 0..n-1, each with one token not yet fed.
        logits = self.runner.forward(0, [[s.generated[-1]] for s in self._active])
        self._sample_and_emit(list(self._active), logits)

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        # Log-probabilities are the model's own; penalties and bias change only which token is chosen.
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = _adjusted(seqs, logits)
        chosen = torch.argmax(scores, dim=-1)
        for i, seq in enumerate(seqs):
            if not seq.params.greedy:
                chosen[i] = _sample(scores[i], seq.params, seq.generator)
        # One device-to-host copy for both (ids are exact in float64).
        picked_t = logprobs.gather(1, chosen[:, None])[:, 0]
        chosen_list, picked = torch.stack((chosen.double(), picked_t.double())).tolist()
        tops = self._alternatives(seqs, logprobs)
        now = time.monotonic()
        for seq, token, lp, top in zip(seqs, chosen_list, picked, tops, strict=True):
            if seq.first_token == 0.0:
                seq.first_token = now
            self._advance(seq, int(token), float(lp), top)

    def _alternatives(self, seqs: list[_Sequence], logprobs: torch.Tensor) -> list[tuple[TokenLogprob, ...]]:
        """The `top_logprobs` most likely tokens of each row that asked for them."""
        wanted = max((s.params.top_logprobs for s in seqs if s.params.logprobs), default=0)
        if not wanted:
            return [()] * len(seqs)
        values, ids = (t.tolist() for t in torch.topk(logprobs.float(), wanted, dim=-1))
        decode = self.tokenizer.decode
        return [
            tuple(
                TokenLogprob(i, decode([i]), lp)
                for i, lp in zip(ids[n][: s.params.top_logprobs], values[n][: s.params.top_logprobs], strict=True)
            )
            if s.params.logprobs
            else ()
            for n, s in enumerate(seqs)
        ]

    def _advance(self, seq: _Sequence, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> None:
        if seq.cancelled:
            self._finish(seq, "cancelled")
            return
        text = seq.text
        if text is None:
            text = seq.text = TextAssembler(self.tokenizer, seq.params.stop)
        if token in self._eos:
            self._emit(seq, text.flush())
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        if seq.params.presence_penalty or seq.params.frequency_penalty:
            seq.counts[token] = seq.counts.get(token, 0) + 1
        lp = (TokenLogprob(token, self.tokenizer.decode([token]), logprob, top),) if seq.params.logprobs else ()
        delta = text.add(token)
        seq.sink(TokenEvent(delta, (token,), lp))
        if text.stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.params.max_new_tokens or self.runner.lengths[seq.row] + 1 >= self.max_len:
            self._emit(seq, text.flush())
            self._finish(seq, "length")

    @staticmethod
    def _emit(seq: _Sequence, text: str) -> None:
        if text:
            seq.sink(TokenEvent(text, ()))

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in self._active:
            if seq.finished:
                continue
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "deadline")

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str = "") -> None:
        if seq.finished:
            return
        seq.finished = True
        now = time.monotonic()
        admitted = seq.admitted or now
        seq.sink(
            FinishEvent(
                reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.generated),
                queue_ms=(admitted - seq.arrived) * 1e3,
                ttft_ms=((seq.first_token or now) - seq.arrived) * 1e3,
                total_ms=(now - seq.arrived) * 1e3,
                error=error,
            )
        )

    def _compact(self) -> None:
        # Keep live rows contiguous from 0: move the last live row into each freed one.
        for seq in sorted((s for s in self._active if s.finished), key=lambda s: s.row, reverse=True):
            last = self._active[-1]
            if last is not seq:
                self.runner.move(last.row, seq.row)
                last.row = seq.row
                self._active[seq.row] = last
            self._active.pop()
            self.runner.reset(len(self._active))


def build_engine(
    model: Any,
    tokenizer: Any,
    *,
    max_batch_size: int = 8,
    max_len: int = 4096,
    max_sessions: int = 4,
    max_queue: int = 256,
    parallel: ParallelContext | None = None,
    threads: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> Engine:
    """An engine over `model` as a server runs one: the runner `build_runner` picks, with rows
    0..max_batch_size-1 for the decode batch and `max_sessions` rows above them for speculative sessions."""
    runner = build_runner(
        model, max_rows=max_batch_size + max_sessions, max_len=max_len, parallel=parallel, threads=threads
    )
    sessions = SpeculativeSessions(runner, tokenizer, first_row=max_batch_size)
    return Engine(
        runner,
        tokenizer,
        sessions,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        on_step=on_step,
        on_failure=on_failure,
    )


def _adjusted(seqs: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
    """`logits` with each row's logit bias and penalties applied (`logits` itself when no row has any)."""
    rows = [(i, s) for i, s in enumerate(seqs) if s.params.adjusts_logits]
    if not rows:
        return logits
    scores = logits.clone()
    for i, seq in rows:
        params = seq.params
        if params.logit_bias:
            ids = torch.tensor([t for t, _ in params.logit_bias], device=scores.device)
            bias = torch.tensor([b for _, b in params.logit_bias], dtype=scores.dtype, device=scores.device)
            scores[i].index_add_(0, ids, bias)
        if seq.counts:
            ids = torch.tensor(list(seq.counts), device=scores.device)
            counts = torch.tensor(list(seq.counts.values()), dtype=scores.dtype, device=scores.device)
            scores[i].index_add_(0, ids, -(counts * params.frequency_penalty + params.presence_penalty))
    return scores


def _sample(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    probs = sampling_probs(logits, params.temperature, params.top_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[0].to(logits.device)


async def collect(events: AsyncIterator[Event]) -> tuple[str, list[TokenLogprob], FinishEvent]:
    """Drain a stream into (text, logprobs, finish)."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async for event in events:
        if isinstance(event, FinishEvent):
            return "".join(parts), logprobs, event
        parts.append(event.text)
        logprobs.extend(event.logprobs)
    raise RuntimeError("the stream ended without a finish event")
