"""The engine channel's CPU cost per Verify call: whole contexts against deltas (serve/contexts.py), each side alone.

Rounds of `--sessions` sessions, each round's context its last one plus `--grow` tokens (a round's accepted draft and
the verifier's token), from `--context` tokens on. Per call, the frontend's side: copying the caller's context (the
frontend always did), the delta's comparison, and pickling the message as `Channel.queue` does; the engine's side:
unpickling it and rebuilding the context (and, for a delta, its Sampling and distributions from the values it carries).
The messages are the ones `AsyncEngine.verify` sends, an 8-token draft, greedy (no distributions) and sampled (each
draft token's distribution over 32 ids), and the delta message as it was, its Sampling and distributions pickled as
dataclasses. Prints µs per call and the message's size; then the step message that answers a round's Verify calls, its
verdicts as `VerifyResult` dataclasses (as the thread transport keeps them) and as the plain tuples the engine process
sends, each side's µs. Last, requests' prompts (a `--system`-token system prompt and a 24-token turn each): whole
("add") against a delta on the last prompt under its anchor ("add_delta"), each side's µs per request: the frontend's
copy, anchor, comparison and pickling, the engine's unpickling and rebuilding. No model, no process: the channel's
share alone (`make bench-channel`).
"""

from __future__ import annotations

import argparse
import pickle
import platform
import random
import time
from datetime import UTC, datetime
from typing import Any

from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.contexts import (
    PROMPT_ANCHORS,
    ContextMirror,
    ContextSender,
    pack_call,
    prompt_messages,
    unpack_call,
)
from stratus_workers.serve.core import StepOutput
from stratus_workers.serve.surface import SparseDist, VerifyResult

PROTOCOL = pickle.HIGHEST_PROTOCOL


def run(
    sessions: int, context: int, grow: int, rounds: int, delta: bool, values: bool = True, sampled: bool = False
) -> tuple[float, float, float]:
    """(frontend µs per call, engine µs per call, bytes per message), over `rounds` rounds of every session; with
    `sampled`, at temperature 1 with each draft token's distribution over 32 ids."""
    rng = random.Random(0)
    sampling = Sampling(temperature=1.0, seed=5) if sampled else Sampling()
    contexts = {f"session-{n}": [rng.randrange(49_152) for _ in range(context)] for n in range(sessions)}
    sender, mirror = ContextSender(4 * sessions), ContextMirror()
    front = engine = 0.0
    size = calls = 0
    for _ in range(rounds):
        for sid, ids in contexts.items():
            ids.extend(rng.randrange(49_152) for _ in range(grow))
            draft = [rng.randrange(49_152) for _ in range(8)]
            dists = [sparse(rng, token) for token in draft] if sampled else []
            started = time.perf_counter()
            own = list(ids)
            if delta:
                keep, tail, _ = sender.encode(sid, own, False)
                args = (sid, tail, draft, dists, sampling, False)
                if values:  # its Sampling and distributions as values, as AsyncEngine sends them (else the dataclasses)
                    args = pack_call("verify", args)
                message: tuple[Any, ...] = ("delta", 1, "verify", args, keep)
                data = pickle.dumps(message, PROTOCOL)
            else:
                data = pickle.dumps(("call", 1, "verify", (sid, own, draft, dists, sampling, False)), PROTOCOL)
            sent = time.perf_counter()
            got: Any = pickle.loads(data)
            if delta:
                _, _, op, args, keep = got
                rebuilt = mirror.rebuild(args[0], keep, args[1], args[-1])
                if values:
                    unpack_call(op, (args[0], rebuilt, *args[2:]))
            else:
                rebuilt = got[3][1]
            done = time.perf_counter()
            assert len(rebuilt) == len(ids)
            front += sent - started
            engine += done - sent
            size += len(data)
            calls += 1
        for ids in contexts.values():  # keep the contexts near `--context` tokens: the steady state, not growth
            del ids[: len(ids) - context]
        if delta:
            sender.clear()
            mirror = ContextMirror()
            for sid, ids in contexts.items():  # ... and the two memories in step with the trimmed contexts
                keep, tail, _ = sender.encode(sid, list(ids), False)
                mirror.rebuild(sid, keep, tail, False)
    return front / calls * 1e6, engine / calls * 1e6, size / calls


def prompts(system: int, requests: int, delta: bool, turn: int = 24) -> tuple[float, float, float]:
    """(frontend µs per request, engine µs per request, bytes per message) of `requests` requests that share a
    `system`-token system prompt, each with its own `turn`-token turn, sent whole or as deltas by anchor."""
    rng = random.Random(1)
    shared = [rng.randrange(49_152) for _ in range(system)]
    asked = [shared + [rng.randrange(49_152) for _ in range(turn)] for _ in range(requests)]
    sampling = Sampling(max_new_tokens=128)
    sender, mirror = ContextSender(PROMPT_ANCHORS), ContextMirror()
    front = engine = 0.0
    size = 0
    for seq_id, prompt in enumerate(asked):
        started = time.perf_counter()
        ids = list(prompt)
        if delta:  # as AsyncEngine sends it (no anchor is evicted here: one system prompt)
            data = pickle.dumps(prompt_messages(sender, seq_id, ids, sampling, None)[0][-1], PROTOCOL)
        else:
            data = pickle.dumps(("add", seq_id, ids, sampling, None), PROTOCOL)
        sent = time.perf_counter()
        got: Any = pickle.loads(data)
        rebuilt = got[2] if got[0] == "add" else mirror.rebuild(got[2], got[3], got[4], False)
        done = time.perf_counter()
        assert rebuilt == prompt
        front += sent - started
        engine += done - sent
        size += len(data)
    return front / requests * 1e6, engine / requests * 1e6, size / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--grow", type=int, default=6, help="new tokens a round (accepted draft and the next token)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the fastest is reported")
    parser.add_argument("--system", type=int, default=3000, help="the prompts' shared system prompt, in tokens")
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}; Python {platform.python_version()}; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.sessions} sessions, ~{args.context}-token contexts, "
        f"+{args.grow} a round, {args.rounds} rounds, best of {args.repeat}"
    )
    print("| contexts | frontend µs/call | engine µs/call | both µs/call | bytes/message |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = {
        "whole": (False, False, False),
        "deltas, Sampling pickled": (True, False, False),
        "deltas, Sampling as values": (True, True, False),
        "sampled, deltas, Sampling and distributions pickled": (True, False, True),
        "sampled, deltas, Sampling and distributions as values": (True, True, True),
    }
    for name, (delta, values, sampled) in rows.items():
        best = min(
            (
                run(args.sessions, args.context, args.grow, args.rounds, delta, values, sampled)
                for _ in range(args.repeat)
            ),
            key=lambda r: r[0] + r[1],
        )
        print(f"| {name} | {best[0]:.1f} | {best[1]:.1f} | {best[0] + best[1]:.1f} | {best[2]:.0f} |")
    print()
    print(f"A step message answering {args.sessions} Verify calls (each verdict 2 tokens accepted), per message:")
    print("| verdicts | engine: pack, pickle µs | frontend: unpickle, unpack µs | bytes |")
    print("| --- | ---: | ---: | ---: |")
    for plain in (False, True):
        best = min((step_message(args.sessions, plain) for _ in range(args.repeat)), key=lambda r: r[0] + r[1])
        name = "plain tuples" if plain else "dataclasses"
        print(f"| {name} | {best[0]:.1f} | {best[1]:.1f} | {best[2]:.0f} |")
    print()
    print(f"A request whose prompt is a {args.system}-token system prompt and a 24-token turn, per request:")
    print("| prompts | frontend µs/request | engine µs/request | both µs/request | bytes/message |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for delta in (False, True):
        best = min((prompts(args.system, 300, delta) for _ in range(args.repeat)), key=lambda r: r[0] + r[1])
        name = "deltas by anchor" if delta else "whole"
        print(f"| {name} | {best[0]:.1f} | {best[1]:.1f} | {best[0] + best[1]:.1f} | {best[2]:.0f} |")


def sparse(rng: random.Random, token: int) -> SparseDist:
    """A draft token's distribution as the edge sends it: 32 ids, the token among them, probabilities summing to 1."""
    ids = [token, *(rng.randrange(49_152) for _ in range(31))]
    weights = [rng.random() for _ in ids]
    return SparseDist(tuple(ids), tuple(w / sum(weights) for w in weights))


def step_message(sessions: int, plain: bool, messages: int = 2000) -> tuple[float, float, float]:
    """(engine µs, frontend µs, bytes) per step message of `sessions` verdicts, as `StepOutput.pack(plain)` and
    `StepOutput.unpack` make and read it."""
    results: list[tuple[int, str, Any]] = [
        (n, "", VerifyResult(2, 1000 + n, (-0.25, -0.5, -1.5), False)) for n in range(sessions)
    ]
    out = StepOutput(7, results=results)
    started = time.perf_counter()
    for _ in range(messages):
        data = pickle.dumps(("step", out.pack(plain)), PROTOCOL)
    packed = time.perf_counter()
    for _ in range(messages):
        got = StepOutput.unpack(pickle.loads(data)[1])
    done = time.perf_counter()
    assert got.results == results
    return (packed - started) / messages * 1e6, (done - packed) / messages * 1e6, len(data)


if __name__ == "__main__":
    main()
