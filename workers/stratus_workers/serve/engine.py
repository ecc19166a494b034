"""Engine: a continuous-batching scheduler that runs the model runner in its own thread.

Requests join the running batch between decode steps and leave as soon as they finish, so
a long answer never holds a short one back. New arrivals are prefilled before the next
decode step, which keeps time to first token low under load. The engine thread talks to
asyncio callers only through per-request sinks, so the event loop never waits on torch.
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

from stratus_workers.serve.mailbox import mailbox
from stratus_workers.serve.runner import ModelRunner
from stratus_workers.serve.speculative import (
    SparseDist,
    draft_distribution,
    sample_sparse,
    sampling_probs,
    verify_greedy,
    verify_sampled,
)
from stratus_workers.serve.text import TextAssembler

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "deadline", "error"]


class EngineOverloaded(RuntimeError):
    """The wait queue is full; the caller should retry later or go elsewhere."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float


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
    params: SamplingParams
    sink: Sink
    deadline: float | None
    arrived: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    first_token: float = 0.0
    generated: list[int] = field(default_factory=list)
    text: TextAssembler | None = None
    row: int = -1
    generator: torch.Generator | None = None
    cancelled: bool = False
    finished: bool = False


@dataclass
class _Session:
    """A speculative-decoding session: one cache row kept between Draft or Verify calls."""

    row: int
    tokens: list[int] = field(default_factory=list)  # whose keys and values sit in the row
    last_used: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class DraftResult:
    tokens: tuple[int, ...]
    distributions: tuple[SparseDist, ...]
    eos: bool


@dataclass(frozen=True)
class VerifyResult:
    accepted: int
    next_token: int
    logprobs: tuple[float, ...]
    eos: bool


@dataclass(frozen=True)
class SpecSampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Engine:
    """Serves one loaded model; thread-safe `submit`, asyncio-friendly `stream`.

    Rows 0..max_batch_size-1 of the runner hold the decode batch; the rows above them hold
    speculative-decoding sessions, whose Draft and Verify calls run in the engine thread
    between decode steps.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 8,
        max_len: int = 4096,
        max_queue: int = 256,
        max_sessions: int = 4,
        session_ttl: float = 60.0,
        on_step: Callable[[int, int], None] | None = None,
        runner: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_sessions = max_sessions
        self.session_ttl = session_ttl
        # A given runner (serve.runtime.runner_for: llama.cpp for a GGUF model) needs this many rows too.
        self.runner = runner or ModelRunner(model, max_rows=max_batch_size + max_sessions, max_len=max_len)
        self.vocab_size = int(model.config.vocab_size)
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._free_rows = list(range(max_batch_size + max_sessions - 1, max_batch_size - 1, -1))
        self._ops: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = collections.deque()
        self.max_len = max_len
        self._eos = _eos_ids(model, tokenizer)
        self._on_step = on_step
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stratus-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- submission ---------------------------------------------------------------------

    def submit(
        self, prompt: Sequence[int], params: SamplingParams, sink: Sink, deadline: float | None = None
    ) -> Callable[[], None]:
        """Queue a request; returns a function that cancels it. Events go to `sink` (engine thread)."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this server's context holds {self.max_len - 1}")
        seq = _Sequence(next(self._ids), list(prompt), params, sink, deadline)
        if not params.greedy:
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() & 0x7FFFFFFF))
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise EngineOverloaded(f"{len(self._waiting)} requests are already waiting; try again later")
            self._waiting.append(seq)
            self._cond.notify()

        def cancel() -> None:
            seq.cancelled = True
            with self._cond:
                self._cond.notify()

        return cancel

    async def stream(
        self, prompt: Sequence[int], params: SamplingParams, deadline: float | None = None
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

    # -- speculative sessions -----------------------------------------------------------

    async def run_op(self, op: Callable[[], Any]) -> Any:
        """Run `op` in the engine thread between decode steps (it may use the runner)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            self._ops.append((op, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > self.session_ttl]:
            self._end_session(sid)

    def _end_session(self, sid: str) -> None:
        session = self._sessions.pop(sid, None)
        if session is not None:
            self.runner.reset(session.row)
            self._free_rows.append(session.row)

    def _session(self, sid: str, context: Sequence[int], sampling: SpecSampling) -> tuple[_Session, list[int]]:
        """The session's row, rolled back to the longest cached prefix of `context`; returns the rest."""
        if not context:
            raise ValueError("context is empty: send the prompt's token ids")
        if len(context) >= self.max_len:
            raise ValueError(f"context of {len(context)} tokens exceeds this server's {self.max_len - 1}")
        if any(t < 0 or t >= self.vocab_size for t in context):
            raise ValueError(f"context holds token ids outside this model's vocabulary of {self.vocab_size}")
        session = self._sessions.get(sid)
        if session is None:
            self._expire_sessions()
            if not self._free_rows:
                idle = next(iter(self._sessions))  # least recently used
                if time.monotonic() - self._sessions[idle].last_used < 1.0:
                    raise EngineOverloaded(f"all {self.max_sessions} speculative sessions are busy; try again")
                self._end_session(idle)
            session = _Session(self._free_rows.pop())
            self.runner.reset(session.row)
            if not sampling.greedy:
                session.generator = torch.Generator(device="cpu")
                session.generator.manual_seed(
                    sampling.seed if sampling.seed is not None else time.time_ns() & 0x7FFFFFFF
                )
            self._sessions[sid] = session
        self._sessions.move_to_end(sid)
        session.last_used = time.monotonic()
        common = 0
        limit = min(len(session.tokens), len(context) - 1)  # keep at least one token to compute logits from
        while common < limit and session.tokens[common] == context[common]:
            common += 1
        self.runner.truncate(session.row, common)
        del session.tokens[common:]
        return session, list(context[common:])

    def _draft_op(
        self, sid: str, context: Sequence[int], max_tokens: int, sampling: SpecSampling, top_k: int, end: bool
    ) -> DraftResult:
        session, pending = self._session(sid, context, sampling)
        tokens: list[int] = []
        dists: list[SparseDist] = []
        eos = False
        try:
            for _ in range(max_tokens):
                if len(session.tokens) + len(pending) + 1 >= self.max_len:
                    break
                logits = self.runner.forward(session.row, [pending])[0]
                session.tokens.extend(pending)
                if sampling.greedy:
                    token = int(torch.argmax(logits))
                else:
                    dist = draft_distribution(logits, sampling.temperature, sampling.top_p, top_k)
                    token = sample_sparse(dist, session.generator)
                    dists.append(dist)
                tokens.append(token)
                if token in self._eos:
                    eos = True
                    break
                pending = [token]
        finally:
            if end:
                self._end_session(sid)
        return DraftResult(tuple(tokens), tuple(dists), eos)

    def _verify_op(
        self,
        sid: str,
        context: Sequence[int],
        draft: Sequence[int],
        dists: Sequence[SparseDist],
        sampling: SpecSampling,
        end: bool,
    ) -> VerifyResult:
        if any(t < 0 or t >= self.vocab_size for t in draft):
            raise ValueError(f"draft holds token ids outside this model's vocabulary of {self.vocab_size}")
        if len(context) + len(draft) >= self.max_len:
            raise ValueError(f"context plus draft ({len(context) + len(draft)} tokens) exceeds {self.max_len - 1}")
        session, pending = self._session(sid, context, sampling)
        try:
            logits = self.runner.forward(session.row, [pending + list(draft)], all_logits=True)[0]
            session.tokens.extend(pending)
            session.tokens.extend(draft)
            # Row j of `scores` predicts the token after context + draft[:j].
            scores = logits[len(pending) - 1 :]
            if sampling.greedy:
                verdict = verify_greedy(scores, draft)
            else:
                verdict = verify_sampled(scores, draft, dists, sampling.temperature, sampling.top_p, session.generator)
            keep = len(context) + verdict.accepted
            self.runner.truncate(session.row, keep)
            del session.tokens[keep:]
            logprobs = torch.log_softmax(scores[: verdict.accepted + 1], dim=-1)
            chosen = [*draft[: verdict.accepted], verdict.next_token]
            picked = logprobs[torch.arange(len(chosen)), torch.tensor(chosen)].tolist()
        finally:
            if end:
                self._end_session(sid)
        eos = verdict.next_token in self._eos or any(t in self._eos for t in draft[: verdict.accepted])
        return VerifyResult(verdict.accepted, verdict.next_token, tuple(float(x) for x in picked), eos)

    def _score_op(self, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        if not continuation:
            return ()
        sid = f"score-{next(self._ids)}"
        session, pending = self._session(sid, [*prompt, *continuation], SpecSampling())
        try:
            logits = self.runner.forward(session.row, [pending], all_logits=True)[0]
            # Position i predicts token i+1: the continuation is predicted from len(prompt)-1 on.
            scores = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(continuation) - 1], dim=-1)
            picked = scores[torch.arange(len(continuation)), torch.tensor(list(continuation))]
            return tuple(float(x) for x in picked.tolist())
        finally:
            self._end_session(sid)

    async def score(self, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Log-probability of each continuation token after `prompt` (one forward pass)."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        result: tuple[float, ...] = await self.run_op(lambda: self._score_op(prompt, continuation))
        return result

    async def draft(
        self,
        sid: str,
        context: Sequence[int],
        max_tokens: int,
        sampling: SpecSampling,
        top_k: int = 32,
        end: bool = False,
    ) -> DraftResult:
        result: DraftResult = await self.run_op(lambda: self._draft_op(sid, context, max_tokens, sampling, top_k, end))
        return result

    async def verify(
        self,
        sid: str,
        context: Sequence[int],
        draft: Sequence[int],
        dists: Sequence[SparseDist],
        sampling: SpecSampling,
        end: bool = False,
    ) -> VerifyResult:
        result: VerifyResult = await self.run_op(lambda: self._verify_op(sid, context, draft, dists, sampling, end))
        return result

    async def end_session(self, sid: str) -> None:
        await self.run_op(lambda: self._end_session(sid))

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active and not self._ops:
                    self._cond.wait(timeout=self.session_ttl if self._sessions else None)
                    self._expire_sessions()
                if self._stopping:
                    break
                admitted = self._admit()
                ops = list(self._ops)
                self._ops.clear()
            for op, future in ops:  # speculative calls: a few forward passes each
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(op())
                    except Exception as exc:
                        future.set_exception(exc)
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
        for _, future in self._ops:
            future.cancel()
        self._active.clear()
        self._waiting.clear()

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
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = torch.argmax(logits, dim=-1)
        for i, seq in enumerate(seqs):
            if not seq.params.greedy:
                chosen[i] = _sample(logits[i], seq.params, seq.generator)
        # One device-to-host copy for both (ids are exact in float64).
        picked_t = logprobs.gather(1, chosen[:, None])[:, 0]
        chosen_list, picked = torch.stack((chosen.double(), picked_t.double())).tolist()
        now = time.monotonic()
        for seq, token, lp in zip(seqs, chosen_list, picked, strict=True):
            if seq.first_token == 0.0:
                seq.first_token = now
            self._advance(seq, int(token), float(lp))

    def _advance(self, seq: _Sequence, token: int, logprob: float) -> None:
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
        lp = (TokenLogprob(token, self.tokenizer.decode([token]), logprob),) if seq.params.logprobs else ()
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


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
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
