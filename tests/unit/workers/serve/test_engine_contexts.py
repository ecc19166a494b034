"""Speculative calls' contexts sent as deltas (serve/contexts.py) answer exactly as whole contexts do: through an
engine process of its own (greedy rounds of many sessions at once, shrunk and diverged contexts, refused calls and
good ones after them, end, evicted mirrors; random concurrent clients whose calls and streams are cancelled in
flight) and, for random sequences of calls, through engines in a thread whose mirrors and sessions the test can
read."""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus_workers.models import load_model
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.contexts import (
    MIN_ANCHORED_PROMPT,
    PROMPT_ANCHOR_TOKENS,
    PROMPT_ANCHORS,
    ContextSender,
    prompt_anchor,
)
from stratus_workers.serve.engine import AsyncEngine, ProcessTransport, ThreadTransport, build_engine
from stratus_workers.serve.loop import EngineSettings
from stratus_workers.serve.surface import FinishEvent

pytestmark = pytest.mark.unit

GREEDY = Sampling()
MAX_LEN = 256
TOKENS = 200  # the ids the scripts use: well inside the vocabulary


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


class Recording(ProcessTransport):
    """The process transport, keeping what the frontend sent (to show that deltas went, and how small)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)
        super().send(message)


def essence(result: Any) -> Any:
    """What a call decided, without log-probabilities: calls that share a step run as one pass, and which calls
    share one differs from run to run (the last bits of a float may too; the tokens do not)."""
    if hasattr(result, "accepted"):
        return ("verdict", result.accepted, result.next_token, result.eos)
    if hasattr(result, "tokens"):
        return ("draft", result.tokens, result.eos)
    return result


async def outcome(call: Any) -> Any:
    """A call's result, or its error (type and message): both sides must refuse alike."""
    try:
        return await call
    except Exception as exc:
        return (type(exc).__name__, str(exc))


async def rounds(engine: AsyncEngine, sid: str, seed: int, vocab: int) -> list[Any]:
    """A session's calls: greedy rounds (drafts from the engine itself, some tokens corrupted so that not all are
    accepted), a shrunk context, a diverged one, a refused call and good ones after it, Draft and Verify with
    `end`, the same id starting over, an empty context, and `end_session`."""
    rng = random.Random(seed)
    prompt = [rng.randrange(TOKENS) for _ in range(rng.randrange(5, 40))]
    context = list(prompt)
    out: list[Any] = []
    for r in range(8):
        drafted = await outcome(engine.draft(sid, context, 4, GREEDY))
        out.append(drafted)
        draft = [t if rng.random() < 0.7 else rng.randrange(TOKENS) for t in drafted.tokens]
        op = engine.verify(sid, context, draft, [], GREEDY)
        verdict = await outcome(op)
        out.append(verdict)
        context = context + draft[: verdict.accepted] + [verdict.next_token]
        if r == 2:
            context = context[:-5]  # shrunk: the round is taken back
        elif r == 4:
            context[len(context) // 2] = (context[len(context) // 2] + 1) % TOKENS  # diverged in the middle
        elif r == 5:  # refused (a token outside the vocabulary), then the rounds go on with the good context
            out.append(await outcome(engine.verify(sid, context + [vocab + 3], [1], [], GREEDY)))
            out.append(await outcome(engine.verify(sid, context[:-1] + [vocab], [], [], GREEDY)))
    out.append(await outcome(engine.draft(sid, context, 3, GREEDY, end=True)))
    out.append(await outcome(engine.verify(sid, context[:-2], [7, 8], [], GREEDY)))  # a new session under the id
    out.append(await outcome(engine.verify(sid, context, [1, 2], [], GREEDY, end=True)))
    out.append(await outcome(engine.verify(sid, prompt, [], [], GREEDY)))
    out.append(await outcome(engine.verify(sid, [], [1], [], GREEDY)))  # the core's own error comes back
    await engine.end_session(sid)
    out.append(await outcome(engine.verify(sid, prompt + [5], [], [], GREEDY)))
    await engine.end_session(sid)
    return out


async def process_engine(tiny_model_dir: Path, sessions: int, mirrors: int, delta: bool) -> AsyncEngine:
    settings = EngineSettings(max_batch_size=1, max_sessions=sessions, max_tokens=MAX_LEN, threads=1,
                              log_format="text")  # fmt: skip
    load = functools.partial(load_model, str(tiny_model_dir), dtype="float32", device="cpu")
    engine = AsyncEngine(Recording(settings, load), max_batch_size=1, context_mirrors=mirrors)
    engine.delta_contexts = delta
    await engine.start()
    return engine


async def test_deltas_through_an_engine_process_answer_as_whole_contexts(tiny_model_dir: Path) -> None:
    """Many sessions at once (their Verify calls share steps), against an engine sent whole contexts; then more
    sessions than the frontend remembers, so every round evicts one (a drop message) and some go whole."""
    sessions = 10
    delta, whole = await asyncio.gather(
        process_engine(tiny_model_dir, sessions, 6, True), process_engine(tiny_model_dir, sessions, 6, False)
    )
    try:
        vocab = delta.vocab_size
        sent: list[tuple[Any, ...]] = delta.transport.sent  # type: ignore[attr-defined]
        for count in (4, sessions):  # 4: each session's context remembered; 10: the least recently used evicted
            first = len(sent)
            got = await asyncio.gather(*(rounds(delta, f"s{n}", n, vocab) for n in range(count)))
            expected = await asyncio.gather(*(rounds(whole, f"s{n}", n, vocab) for n in range(count)))
            assert [[essence(r) for r in calls] for calls in got] == [[essence(r) for r in calls] for calls in expected]
            assert len(delta.contexts) == 0  # every session ended: both sides forgot it
            deltas = [m for m in sent[first:] if m[0] == "delta"]
            kept = [m for m in deltas if m[4]]
            if count == 4:
                assert len(kept) > len(deltas) * 3 / 4  # most calls kept the last context ...
                assert sum(len(m[3][1]) for m in kept) < sum(m[4] for m in kept) / 4  # ... and sent a short tail
                assert not any(m[0] == "drop" for m in sent[first:])
            else:
                assert any(m[0] == "drop" for m in sent[first:])  # ten sessions, six remembered
        assert delta.failure is None and whole.failure is None
        assert not any(m[0] == "delta" for m in whole.transport.sent)  # type: ignore[attr-defined]
        verdicts = [r for r in got[0] if hasattr(r, "accepted")]
        assert any(0 < v.accepted < 4 for v in verdicts)  # rounds that were partly rejected came up
        assert [r for r in got[0] if isinstance(r, tuple)]  # ... and refused calls (compared above)
        # An engine that dies takes its mirror with it: the frontend forgets its side (a new one starts empty).
        await delta.verify("kept", list(range(50)), [1, 2], [], GREEDY)
        assert delta.contexts.last("kept") == list(range(50))
        os.kill(delta.pid, signal.SIGKILL)
        for _ in range(100):
            if delta.failure is not None:
                break
            await asyncio.sleep(0.05)
        assert delta.failure is not None and len(delta.contexts) == 0
    finally:
        await asyncio.gather(delta.stop(), whole.stop())


# One call of a random script: (session, change, tokens, op, end). A change makes the call's context from the
# session's last one: its next round (what the last verdict kept), grown, shrunk, diverged, replaced, emptied, or
# holding a token outside the vocabulary (refused).
CHANGES = ["next", "next", "next", "grow", "shrink", "diverge", "replace", "empty", "bad"]
script = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from(CHANGES),
        st.lists(st.integers(0, TOKENS - 1), min_size=1, max_size=6),
        st.sampled_from(["verify", "verify", "verify_alone", "draft", "end_session"]),
        st.booleans(),
    ),
    min_size=4,
    max_size=20,
)


async def play(engine: AsyncEngine, calls: list[tuple[str, str, list[int], str, bool]]) -> list[Any]:
    contexts: dict[str, list[int]] = {}
    out: list[Any] = []
    vocab = engine.vocab_size
    for sid, change, tokens, op, end in calls:
        last = contexts.get(sid) or [(7 * n + ord(sid)) % TOKENS for n in range(30)]  # a prompt of its own
        context = {
            "next": last,
            "grow": last + tokens,
            "shrink": last[: max(1, len(last) - len(tokens))],
            "diverge": last[: max(1, len(last) - len(tokens))] + tokens[::-1],
            "replace": tokens,
            "empty": [],
            "bad": last + [vocab],
        }[change][: MAX_LEN // 2]
        if op == "end_session":
            await engine.end_session(sid)
            contexts.pop(sid, None)
            out.append(None)
            continue
        if op == "draft":
            result = await outcome(engine.draft(sid, context, len(tokens), GREEDY, end=end))
            kept = context + list(result.tokens) if hasattr(result, "tokens") else last
        else:
            engine.verify_together = op == "verify"
            result = await outcome(engine.verify(sid, context, tokens, [], GREEDY, end=end))
            kept = context + tokens[: result.accepted] + [result.next_token] if hasattr(result, "accepted") else last
        out.append(result)
        if end:
            contexts.pop(sid, None)
        else:
            contexts[sid] = kept
        if engine.delta_contexts:  # the engine's mirror is the frontend's, call by call
            mirror = engine.transport.loop.contexts  # type: ignore[attr-defined]
            assert len(mirror) == len(engine.contexts)
            for name in "abcde":
                assert mirror.last(name) == engine.contexts.last(name)
    return out


async def test_random_calls_answer_alike_with_and_without_deltas(loaded: Any) -> None:
    """Engines in a thread (the test reads the engine's mirror): the same random calls, deltas forced on in one.
    Three sessions' contexts remembered of five: the frontend's memory evicts. Hypothesis runs in a thread of its
    own, each example's calls in this test's event loop."""
    loop = asyncio.get_running_loop()
    engines = []
    for delta_on in (True, False):
        built = build_engine(loaded.model, loaded.tokenizer, max_len=MAX_LEN, max_batch_size=1, max_sessions=5)
        assert isinstance(built.transport, ThreadTransport) and not built.delta_contexts  # off by default here
        engine = AsyncEngine(built.transport, max_batch_size=1, context_mirrors=3)
        engine.delta_contexts = delta_on
        await engine.start()
        engines.append(engine)
    delta, whole = engines
    cores = [e.transport.core for e in engines if isinstance(e.transport, ThreadTransport) and e.transport.core]
    assert len(cores) == 2

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(script)
    def check(calls: list[tuple[str, str, list[int], str, bool]]) -> None:
        try:
            assert run(play(delta, calls)) == run(play(whole, calls))
            # The core saw the same contexts: each session's row holds the same tokens.
            held = [{sid: s.tokens for sid, s in core.sessions._sessions.items()} for core in cores]
            assert held[0] == held[1]
        finally:
            for engine in engines:
                run(ended(engine))

    try:
        await loop.run_in_executor(None, check)
    finally:
        await asyncio.gather(delta.stop(), whole.stop())


async def ended(engine: AsyncEngine) -> None:
    for sid in "abcde":
        await engine.end_session(sid)


async def lose_a(loaded: Any) -> tuple[AsyncEngine, list[int]]:
    """A thread engine with deltas forced on, session "a" verified once, then the engine's mirror of "a" dropped (in
    channel order) while the frontend still remembers it: the drift `ContextLost` reports."""
    built = build_engine(loaded.model, loaded.tokenizer, max_len=MAX_LEN, max_batch_size=1, max_sessions=2)
    engine = AsyncEngine(built.transport, max_batch_size=1)
    engine.delta_contexts = True
    await engine.start()
    context = list(range(1, 40))
    await engine.verify("a", context, [1], [], GREEDY)
    engine.transport.send(("drop", "a"))
    return engine, context


async def test_a_session_whose_context_the_engine_lost_recovers_on_its_next_call(loaded: Any) -> None:
    """Review (emu): the engine answers a delta it cannot rebuild with ContextLost and forgets the session, but the
    frontend keeps its side, so every later call on that session sends a delta again and fails again until the client
    ends the session. One lost call should be enough: the next one should go whole."""
    engine, context = await lose_a(loaded)
    try:
        with pytest.raises(RuntimeError, match="lost session 'a'"):
            await engine.verify("a", [*context, 5], [1], [], GREEDY)
        result = await outcome(engine.verify("a", [*context, 5, 6], [1], [], GREEDY))
        assert hasattr(result, "accepted"), result
    finally:
        await engine.stop()


async def test_a_refused_delta_does_not_reset_the_frontends_stats(loaded: Any) -> None:
    """Review (emu): the step message that carries a ContextLost (or "invalid") result alone has no stats
    (`StepOutput`'s default, all zeros), and `AsyncEngine._deliver` takes every message's stats: the frontend's
    steps, active and sessions drop to 0 and `on_stats` reports zeros until the next step."""
    engine, context = await lose_a(loaded)
    try:
        steps = engine.stats.steps
        assert steps > 0 and engine.stats.sessions == 1
        with pytest.raises(RuntimeError, match="lost session 'a'"):
            await engine.verify("a", [*context, 5], [1], [], GREEDY)
        assert engine.stats.steps >= steps and engine.stats.sessions == 1, engine.stats
    finally:
        await engine.stop()


# One client of a random concurrent mix: (session, rounds, draft size, corrupt share, cancel at round (or never), how
# many event-loop turns the cancelled call gets first, stream a Generate request beside it and cancel that).
client = st.tuples(
    st.integers(0, 5),
    st.integers(1, 4),
    st.integers(1, 5),
    st.sampled_from([0.0, 0.3, 1.0]),
    st.none() | st.integers(0, 3),
    st.integers(0, 3),
    st.booleans(),
)


async def concurrent_client(
    engine: AsyncEngine,
    reference: AsyncEngine,
    spec: tuple[int, int, int, float, int | None, int, bool],
    seed: int,
    accepted: list[int],
) -> int:
    """A session's rounds against `engine`, each verdict checked against `reference` (a fresh session there, whole
    context: stateless); the round `cancel` is cancelled after `turns` turns of the loop, its verdict never seen, and
    the next round sends the same context again with a new draft. Returns the verdicts checked; `accepted` gets those
    that accepted several draft tokens (long tails, sent as deltas)."""
    n, count, size, corrupt, cancel, turns, stream = spec
    rng = random.Random(seed)
    sid = f"c{n}"
    context = [(11 * k + n) % TOKENS for k in range(20 + n)]
    checked = 0
    for r in range(count):
        own = await reference.draft(f"ref-d-{seed}-{r}", context, size, GREEDY, end=True)  # the model's own tokens
        draft = [rng.randrange(TOKENS) if rng.random() < corrupt else t for t in own.tokens]
        streaming = None
        if stream:
            params = Sampling(max_new_tokens=6)
            streaming = asyncio.ensure_future(collect(engine.stream(context[:10], params)))
        call = asyncio.ensure_future(engine.verify(sid, context, draft, [], GREEDY))
        if r == cancel:
            for _ in range(turns):
                await asyncio.sleep(0)
            call.cancel()
            if streaming is not None:
                streaming.cancel()
            await asyncio.gather(call, streaming or asyncio.sleep(0), return_exceptions=True)
            continue  # the client never saw this round: the next one starts from the same context
        verdict = await call
        if streaming is not None:
            await streaming
        alone = await reference.verify(f"ref-{seed}-{r}", context, draft, [], GREEDY, end=True)
        assert essence(verdict) == essence(alone), (sid, r, context, draft)
        checked += 1
        if verdict.accepted > 2:
            accepted.append(verdict.accepted)
        context = context + draft[: verdict.accepted] + [verdict.next_token]
    await engine.end_session(sid)
    return checked


async def collect(events: Any) -> list[Any]:
    return [event async for event in events]


async def test_concurrent_calls_cancelled_in_flight_leave_every_later_verdict_right(
    tiny_model_dir: Path, loaded: Any
) -> None:
    """Clients at once through an engine process (corked sends, contexts as deltas, fewer contexts remembered than
    sessions so the frontend evicts), some Verify calls and Generate streams cancelled after a few turns of the event
    loop (their messages may be queued, sent or answered by then): every verdict a client does see equals a stateless
    reference's for its context and draft, and the engine keeps serving."""
    engine = await process_engine(tiny_model_dir, 6, 4, True)
    built = build_engine(loaded.model, loaded.tokenizer, max_len=MAX_LEN, max_batch_size=1, max_sessions=8)
    reference = AsyncEngine(built.transport, max_batch_size=1)
    await reference.start()
    loop = asyncio.get_running_loop()
    seen: list[int] = []
    accepted: list[int] = []

    # Derandomized: the same varied examples every run, so the totals checked below cannot come up short by chance.
    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(client, min_size=2, max_size=6, unique_by=lambda c: c[0]), st.integers(0, 10**6))
    def check(clients: list[tuple[int, int, int, float, int | None, int, bool]], seed: int) -> None:
        async def together() -> list[int]:
            return list(await asyncio.gather(
                *(concurrent_client(engine, reference, c, seed + i, accepted) for i, c in enumerate(clients))
            ))  # fmt: skip

        seen.extend(asyncio.run_coroutine_threadsafe(together(), loop).result())
        assert engine.failure is None

    try:
        await loop.run_in_executor(None, check)
        assert sum(seen) > 20  # verdicts were checked, not only cancelled
        assert accepted  # ... and some accepted several draft tokens (long tails went as deltas)
        assert any(m[0] == "drop" for m in engine.transport.sent)  # type: ignore[attr-defined]
        assert any(m[0] == "abort" for m in engine.transport.sent)  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
        assert engine.stats.active == 0  # the cancelled streams' rows were freed
    finally:
        await asyncio.gather(engine.stop(), reference.stop())


PROMPT_LEN = 600  # the engine's context for the prompt tests: room for a system prompt over MIN_ANCHORED_PROMPT


async def answers(engine: AsyncEngine, prompt: list[int], new: int = 6) -> list[int | str]:
    """The greedy tokens `engine` answers `prompt` with (or the error it ends with, as a string)."""
    tokens: list[int | str] = []
    async for event in engine.stream(prompt, Sampling(max_new_tokens=new)):
        if isinstance(event, FinishEvent):
            return [event.error] if event.error else tokens
        tokens.extend(event.token_ids)
    return tokens


async def prompt_engine(tiny_model_dir: Path, delta: bool, anchors: int = PROMPT_ANCHORS) -> AsyncEngine:
    settings = EngineSettings(max_batch_size=4, max_tokens=PROMPT_LEN + 16, threads=1, log_format="text")
    load = functools.partial(load_model, str(tiny_model_dir), dtype="float32", device="cpu")
    engine = AsyncEngine(Recording(settings, load), max_batch_size=4)
    engine.delta_contexts = delta
    engine.prompts = ContextSender(anchors)
    await engine.start()
    return engine


async def test_long_prompts_go_as_deltas_and_answer_as_whole_prompts(tiny_model_dir: Path) -> None:
    """Requests repeating a system prompt (a chat's) go to the engine process as a delta on the last prompt sent
    under their anchor: a short tail, not the prompt. Through the engine they answer exactly as whole prompts do,
    together and one after another, with prompts that share part of the system prompt, prompts too short to anchor,
    and more anchors than the frontend remembers (each one evicted goes to the engine as an "unanchor")."""
    delta, whole = await asyncio.gather(
        prompt_engine(tiny_model_dir, True, anchors=2), prompt_engine(tiny_model_dir, False)
    )
    rng = random.Random(5)
    system = [rng.randrange(TOKENS) for _ in range(400)]
    others = [[rng.randrange(TOKENS) for _ in range(300)] for _ in range(3)]  # other system prompts: other anchors
    prompts = [system + [rng.randrange(TOKENS) for _ in range(rng.randrange(1, 40))] for _ in range(8)]
    prompts += [system[:300] + [7] * 20, system[:10], [3] * 100, *others, system + [1, 2, 3], others[0] + [9]]
    try:
        sent: list[tuple[Any, ...]] = delta.transport.sent  # type: ignore[attr-defined]
        together = await asyncio.gather(*(answers(delta, p) for p in prompts[:4]))
        apart = [await answers(delta, p) for p in prompts[4:]]
        expected = [await answers(whole, p) for p in prompts]
        assert together + apart == expected
        assert all(len(tokens) == 6 and all(isinstance(t, int) for t in tokens) for tokens in expected)
        adds = [m for m in sent if m[0] in ("add", "add_delta")]
        assert len(adds) == len(prompts)
        kept = [m for m in adds if m[0] == "add_delta" and m[3]]
        assert len(kept) >= 8  # the system prompt's requests after the first, and the one sharing 300 tokens of it
        assert all(m[3] >= 300 and len(m[4]) <= 40 for m in kept)
        short = [m for m in adds if (len(m[2]) if m[0] == "add" else m[3] + len(m[4])) < MIN_ANCHORED_PROMPT]
        assert [m[0] for m in short] == ["add", "add"]  # too short to anchor: whole
        assert any(m[0] == "unanchor" for m in sent)  # four anchors, two remembered
        assert not any(m[0] in ("add_delta", "unanchor") for m in whole.transport.sent)  # type: ignore[attr-defined]
        assert delta.failure is None and whole.failure is None
    finally:
        await asyncio.gather(delta.stop(), whole.stop())


# A random script of prompts: each one of three system prompts cut at a random length, then a random turn (some
# too short to anchor, some sharing a system prompt's first tokens only, some longer than the last under the anchor).
prompt_scripts = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 420), st.lists(st.integers(0, TOKENS - 1), max_size=30)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=prompt_scripts, anchors=st.integers(1, 3))
async def test_the_core_receives_every_prompt_exactly_as_sent(
    loaded: Any, script: list[tuple[int, int, list[int]]], anchors: int
) -> None:
    """Whatever the prompts (cut, extended, diverging, under one anchor or several, more anchors than the frontend
    remembers), the engine core is given each one exactly as the caller sent it, in order."""
    rng = random.Random(3)
    systems = [[rng.randrange(TOKENS) for _ in range(420)] for _ in range(2)]
    systems.append(systems[0][:PROMPT_ANCHOR_TOKENS] + [rng.randrange(TOKENS) for _ in range(356)])  # same anchor
    built = build_engine(loaded.model, loaded.tokenizer, max_len=PROMPT_LEN + 16, max_batch_size=2)
    engine = AsyncEngine(built.transport, max_batch_size=2)
    engine.delta_contexts = True
    engine.prompts = ContextSender(anchors)
    await engine.start()
    core = built.transport.core  # type: ignore[attr-defined]
    received: list[list[int]] = []
    add = core.add
    core.add = lambda request: (received.append(list(request.prompt)), add(request))[1]
    try:
        sent = [systems[which][:cut] + turn for which, cut, turn in script]
        sent = [p or [1] for p in sent]
        for prompt in sent:
            assert len(await answers(engine, prompt, new=1)) == 1
        assert received == sent
        assert len(engine.prompts) <= anchors
    finally:
        await engine.stop()


async def test_a_prompt_whose_anchor_the_engine_lost_fails_once_then_goes_whole(loaded: Any) -> None:
    """The engine's side of an anchor dropped while the frontend still remembers it (the drift ContextLost reports):
    that request ends with an error that says so, and the frontend forgets the anchor, so the next prompt under it
    goes whole and is answered."""
    built = build_engine(loaded.model, loaded.tokenizer, max_len=PROMPT_LEN + 16, max_batch_size=1)
    engine = AsyncEngine(built.transport, max_batch_size=1)
    engine.delta_contexts = True
    await engine.start()
    try:
        system = list(range(1, 300))
        first = await answers(engine, [*system, 5])
        assert len(first) == 6
        anchor = prompt_anchor(system)
        assert anchor is not None and anchor in engine.prompts
        engine.transport.send(("unanchor", anchor))
        lost = await answers(engine, [*system, 6])
        assert len(lost) == 1 and "lost" in str(lost[0]), lost
        assert anchor not in engine.prompts
        assert await answers(engine, [*system, 5]) == first
    finally:
        await engine.stop()
