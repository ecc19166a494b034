"""Engine: a continuous-batching scheduler that runs the model runner in its own thread.

Requests join the running batch between decode steps and leave as soon as they finish, so
a long answer never holds a short one back. New arrivals are prefilled before the next
decode step, which keeps time to first token low under load. The engine thread talks to
asyncio callers only through per-request sinks, so the event loop never waits on torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from stratus_workers.serve.runner import ModelRunner

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
    text: str = ""
    emitted: int = 0
    row: int = -1
    generator: torch.Generator | None = None
    cancelled: bool = False
    finished: bool = False


class Engine:
    """Serves one loaded model; thread-safe `submit`, asyncio-friendly `stream`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 8,
        max_len: int = 4096,
        max_queue: int = 256,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.runner = ModelRunner(model, max_rows=max_batch_size, max_len=max_len)
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

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        cancel = self.submit(prompt, params, sink, deadline)
        finished = False
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, FinishEvent):
                    finished = True
                    return
        finally:
            if not finished:
                cancel()

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._admit()
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
        chosen_list = chosen.tolist()
        picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        now = time.monotonic()
        for seq, token, lp in zip(seqs, chosen_list, picked, strict=True):
            if seq.first_token == 0.0:
                seq.first_token = now
            self._advance(seq, int(token), float(lp))

    def _advance(self, seq: _Sequence, token: int, logprob: float) -> None:
        if seq.cancelled:
            self._finish(seq, "cancelled")
            return
        if token in self._eos:
            self._emit_rest(seq)
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        full = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        lp = (TokenLogprob(token, self.tokenizer.decode([token]), logprob),) if seq.params.logprobs else ()
        if full.endswith("\ufffd"):
            # A multi-byte character is split across tokens: wait for the rest of it.
            seq.sink(TokenEvent("", (token,), lp))
        else:
            seq.text = full
            stop_at = _find_stop(full, seq.params.stop, seq.emitted)
            if stop_at is not None:
                seq.text = full[:stop_at]
                self._emit_rest(seq, token, lp)
                self._finish(seq, "stop")
                return
            safe = len(full) - _partial_stop_len(full, seq.params.stop)
            delta = full[seq.emitted : safe]
            seq.emitted = max(seq.emitted, safe)
            seq.sink(TokenEvent(delta, (token,), lp))
        if len(seq.generated) >= seq.params.max_new_tokens or self.runner.lengths[seq.row] + 1 >= self.max_len:
            self._emit_rest(seq)
            self._finish(seq, "length")

    def _emit_rest(self, seq: _Sequence, token: int | None = None, lp: tuple[TokenLogprob, ...] = ()) -> None:
        rest = seq.text[seq.emitted :]
        if rest or token is not None:
            seq.sink(TokenEvent(rest, (token,) if token is not None else (), lp))
        seq.emitted = len(seq.text)

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
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if 0.0 < params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cut = cumulative - sorted_probs > params.top_p
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[0].to(logits.device)


def _find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    best: int | None = None
    for stop in stops:
        idx = text.find(stop, max(0, emitted - len(stop)))
        if idx != -1 and (best is None or idx < best):
            best = idx
    return best


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest


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


with contextlib.suppress(AttributeError):  # fewer intra-op threads than cores leaves room for gRPC
    torch.set_num_interop_threads(1)
