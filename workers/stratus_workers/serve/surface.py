"""The engine surface the gRPC servicer depends on: its events, results and the `ServingEngine` protocol.

Torch-free by contract: the servicer, and any engine that is not ours (the llama.cpp edge engine),
meet here. `serve/engine.py`'s `AsyncEngine` implements the protocol over our engine core, run in a
process of its own or in a thread of the server's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

from stratus_workers.protocol.requests import Sampling

_T = TypeVar("_T")


def rebuilt(cls: type[_T], fields: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> _T:
    """A dataclass `cls` with `fields`, made as unpickling makes one (its __dict__ set, no __init__: half the cost):
    what a channel message's plain values become again on the other side (serve/contexts.py, `StepOutput.unpack`)."""
    made = object.__new__(cls)
    made.__dict__.update(fields)
    return made

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
    """New text (possibly empty while a multi-byte character or stop sequence is pending) and the tokens behind it.

    A stream whose reader falls behind receives every token generated since its last event in one.
    """

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
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


Event = TokenEvent | FinishEvent
Alternatives = tuple[tuple[int, float], ...]  # (token id, log-probability) pairs, most likely first


@dataclass(frozen=True)
class SparseDist:
    """A distribution over a few token ids (the rest have probability 0)."""

    token_ids: tuple[int, ...]
    probs: tuple[float, ...]

    def prob(self, token: int) -> float:
        try:
            return self.probs[self.token_ids.index(token)]
        except ValueError:
            return 0.0


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
class EngineInfo:
    """What a loaded engine reports about its model (ModelInfo's answer and the limits requests meet)."""

    name: str
    source: str
    dtype: str
    device: str
    parameters: int
    compression: str
    max_len: int  # tokens a sequence may hold (prompt plus answer)
    vocab_size: int
    runner: str = ""
    prefix_cache_tokens: int = 0
    # Seconds each start phase took in the engine ("load", "build", "warm-up") and the graphs it captured.
    startup: tuple[tuple[str, float], ...] = ()

    def started(self, began: float, loaded: float, built: float, warmed: float, graphs: int) -> EngineInfo:
        """This info with its start phases, from the monotonic times each phase ended (`began`: the start)."""
        phases = (("load", loaded - began), ("build", built - loaded), ("warm-up", warmed - built))
        return replace(self, startup=(*phases, ("graphs", float(graphs))))


class ServingEngine(Protocol):
    """What the servicer needs of an engine: streams of events, the speculative calls, and whether it still works.

    `submit`-side refusals are exceptions from serve/errors.py (EngineOverloaded, EngineStopped,
    EngineFailed) or ValueError for a bad request; a failure during a request arrives as a
    FinishEvent with reason "unavailable" (the engine died) or "error" (the step failed).
    """

    info: EngineInfo
    failure: str | None  # why the engine stopped working; None while it works

    def stream(self, prompt: Sequence[int], params: Sampling, deadline: float | None = None) -> AsyncIterator[Event]:
        """Events of one request; leaving the iterator early cancels it."""
        ...

    async def score(self, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]: ...

    async def prompt_logprobs(self, prompt: Sequence[int], top: int = 0) -> tuple[TokenLogprob, ...]:
        """Each prompt token with its log-probability after the ones before it (0 for the first); with `top`,
        the most likely tokens at each position (a completions request's echo)."""
        ...

    async def draft(
        self, sid: str, context: Sequence[int], max_tokens: int, sampling: Sampling, top_k: int = 32, end: bool = False
    ) -> DraftResult: ...

    async def verify(
        self,
        sid: str,
        context: Sequence[int],
        draft: Sequence[int],
        dists: Sequence[SparseDist],
        sampling: Sampling,
        end: bool = False,
    ) -> VerifyResult: ...

    async def end_session(self, sid: str) -> None: ...


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
