"""Contexts as deltas on the engine channel: the common prefix is the naive one, and the engine's mirror rebuilds
every context the frontend sent (through pickling, in channel order) whatever the calls do: grow, shrink, diverge,
empty, end, and sessions evicted from a bounded memory. A call's Sampling and distributions cross as values and
come back equal; anything else where they belong is refused, saying what came."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.contexts import (
    DISTS_ARG,
    SAMPLING_ARG,
    SAMPLING_FIELDS,
    ContextLost,
    ContextMirror,
    ContextSender,
    common_prefix,
    pack_call,
    unpack_call,
)
from stratus_workers.serve.surface import SparseDist

pytestmark = pytest.mark.unit

tokens = st.lists(st.integers(0, 3), max_size=12)  # few values: common prefixes of every length come up


def naive_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@given(tokens, tokens, tokens)
def test_the_common_prefix_is_the_naive_one(shared: list[int], a: list[int], b: list[int]) -> None:
    for x, y in ((shared + a, shared + b), (shared, shared + b), (shared + a, shared), (a, b)):
        assert common_prefix(x, y) == common_prefix(y, x) == naive_prefix(x, y)


class Channel:
    """The two sides as the engine channel joins them: the sender's messages pickled, read in order."""

    def __init__(self, limit: int) -> None:
        self.sender = ContextSender(limit)
        self.mirror = ContextMirror()
        self.sent_bytes = 0

    def send(self, sid: str, context: list[int], end: bool = False) -> list[int]:
        keep, tail, evicted = self.sender.encode(sid, list(context), end)
        messages: list[Any] = [("drop", old) for old in evicted]
        messages.append(("delta", 7, "verify", (sid, tail, [], [], None, end), keep))
        received = [pickle.loads(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)) for m in messages]
        self.sent_bytes = sum(len(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)) for m in messages)
        rebuilt: list[int] = []
        for message in received:
            if message[0] == "drop":
                self.mirror.drop(message[1])
            else:
                _, _, _, args, keep = message
                rebuilt = self.mirror.rebuild(args[0], keep, args[1], args[-1])
        return rebuilt


# A call: (session, how its context changes, tokens, end). Changes: grow by the tokens, shrink by their count,
# diverge (cut back by their count, then the tokens), replace it all, empty it.
calls = st.lists(
    st.tuples(
        st.sampled_from("abcde"),
        st.sampled_from(["grow", "grow", "shrink", "diverge", "replace", "empty"]),
        tokens,
        st.booleans(),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(calls, st.integers(1, 4))
def test_the_mirror_rebuilds_every_context_sent(script: list[tuple[str, str, list[int], bool]], limit: int) -> None:
    channel = Channel(limit)
    contexts: dict[str, list[int]] = {}
    for sid, change, new, end in script:
        context = contexts.get(sid, [])
        if change == "grow":
            context = context + new
        elif change == "shrink":
            context = context[: max(0, len(context) - len(new))]
        elif change == "diverge":
            context = context[: max(0, len(context) - len(new))] + new
        elif change == "replace":
            context = list(new)
        else:
            context = []
        assert channel.send(sid, context, end) == context
        if end:
            contexts.pop(sid, None)
            assert sid not in channel.sender
        else:
            contexts[sid] = context
        # Bounded, and the two sides hold the same sessions (the mirror learns of each eviction by a drop).
        assert len(channel.sender) <= limit
        assert len(channel.mirror) == len(channel.sender)


def test_a_round_sends_only_its_new_tokens_and_the_least_recently_used_session_is_dropped() -> None:
    channel = Channel(limit=2)
    context = list(range(600))
    assert channel.send("a", context) == context
    whole = channel.sent_bytes
    context = context + [1, 2, 3, 4, 5]
    assert channel.send("a", context) == context
    assert channel.sent_bytes < whole / 10  # the tail, not the context
    assert channel.send("b", [9] * 600) == [9] * 600
    assert channel.send("c", [8] * 600) == [8] * 600  # "a" was the least recently used: evicted, dropped
    assert "a" not in channel.sender and len(channel.mirror) == 2
    assert channel.send("a", context) == context  # back whole, and right


def test_a_mirror_told_to_keep_what_it_lacks_says_so() -> None:
    mirror = ContextMirror()
    with pytest.raises(ContextLost, match=r"session 'x'.*keep 3 tokens, it holds none"):
        mirror.rebuild("x", 3, [1], False)
    mirror.rebuild("x", 0, [1, 2], False)
    with pytest.raises(ContextLost, match="keep 3 tokens, it holds 2 tokens"):
        mirror.rebuild("x", 3, [1], False)
    assert len(mirror) == 0  # forgotten: the session must start again


def test_a_sender_without_room_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one session"):
        ContextSender(0)


samplings = st.builds(
    Sampling,
    temperature=st.floats(0.0, 2.0),
    top_p=st.floats(0.01, 1.0),
    seed=st.none() | st.integers(0, 2**63 - 1),
    max_new_tokens=st.integers(0, 100),
    stop=st.lists(st.text(max_size=3), max_size=2).map(tuple),
    logprobs=st.booleans(),
    top_logprobs=st.integers(0, 5),
    presence_penalty=st.floats(-2.0, 2.0),
    frequency_penalty=st.floats(-2.0, 2.0),
    logit_bias=st.lists(st.tuples(st.integers(0, 99), st.floats(-100.0, 100.0)), max_size=2).map(tuple),
    echo=st.booleans(),
)


dists = st.lists(
    st.lists(st.tuples(st.integers(0, 99), st.floats(0.0, 1.0)), min_size=1, max_size=4).map(
        lambda pairs: SparseDist(tuple(t for t, _ in pairs), tuple(p for _, p in pairs))
    ),
    max_size=3,
)


def call_args(op: str, sampling: Sampling, draft_dists: list[SparseDist]) -> tuple[Any, ...]:
    """A session call's args as `AsyncEngine` makes them (serve/engine.py)."""
    if op == "draft":
        return ("s1", [4, 5], 3, sampling, 32, False)
    return ("s1", [4, 5], list(range(len(draft_dists))), draft_dists, sampling, True)


@given(samplings, dists, st.sampled_from(sorted(SAMPLING_ARG)))
def test_a_calls_sampling_and_distributions_cross_as_values_and_come_back_equal(
    sampling: Sampling, draft_dists: list[SparseDist], op: str
) -> None:
    args = call_args(op, sampling, draft_dists)
    packed = pack_call(op, args)
    assert packed[SAMPLING_ARG[op]] == tuple(getattr(sampling, name) for name in SAMPLING_FIELDS)
    wire = pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"Sampling" not in wire and b"SparseDist" not in wire  # nothing of the dataclasses is pickled
    got = unpack_call(op, pickle.loads(wire))
    assert got == args
    back = got[SAMPLING_ARG[op]]
    assert type(back) is Sampling and vars(back) == vars(sampling) and hash(back) == hash(sampling)
    assert back.greedy == sampling.greedy and back.adjusts_logits == sampling.adjusts_logits
    if op in DISTS_ARG:
        came = got[DISTS_ARG[op]]
        assert [type(d) for d in came] == [SparseDist] * len(draft_dists)
        assert [vars(d) for d in came] == [vars(d) for d in draft_dists]
        assert all(d.prob(t) == e.prob(t) for d, e in zip(came, draft_dists, strict=True) for t in range(100))


def test_every_field_of_sampling_is_carried() -> None:
    assert set(SAMPLING_FIELDS) == set(vars(Sampling()))


@pytest.mark.parametrize(
    ("args", "came"),
    [
        (("s1", [1], [2], [], Sampling(), False), "Sampling("),  # a Sampling object, not its values
        (("s1", [1], [2], [], (0.0, 1.0), False), "(0.0, 1.0)"),  # too few values
        (("s1", [1], [2], [], [0.0] * len(SAMPLING_FIELDS), False), "[0.0"),  # a list, not a tuple
        (("s1", [1], [2]), "None"),  # no sampling at all
    ],
)
def test_a_call_without_its_sampling_values_is_refused_saying_what_came(args: tuple[Any, ...], came: str) -> None:
    with pytest.raises(ValueError, match="internal error: a 'verify' call's sampling came as") as caught:
        unpack_call("verify", args)
    assert came in str(caught.value) and "temperature, top_p, seed" in str(caught.value)


@pytest.mark.parametrize(
    ("pairs", "came"),
    [
        ([SparseDist((1,), (1.0,))], "SparseDist("),  # the dataclass, not its values
        ([((1, 2), (0.5, 0.5), ())], "((1, 2), (0.5, 0.5), ())"),  # three parts
        ([([1, 2], (0.5, 0.5))], "[([1, 2]"),  # a list of ids, not a tuple
        ("ab", "'ab'"),  # not pairs at all
    ],
)
def test_a_verify_call_whose_distributions_are_not_pairs_is_refused_saying_what_came(pairs: Any, came: str) -> None:
    args = pack_call("verify", ("s1", [1], [2], [], Sampling(), False))
    args = (*args[:3], pairs, *args[4:])
    with pytest.raises(ValueError, match="internal error: a 'verify' call's distributions came as") as caught:
        unpack_call("verify", args)
    assert came in str(caught.value) and "(token ids, probabilities) pairs" in str(caught.value)


def test_what_is_not_a_sampling_or_a_distribution_goes_as_it_is_and_is_refused_there() -> None:
    packed = pack_call("verify", ("s1", [1], [2, 3], [SparseDist((2,), (1.0,)), None], None, False))
    assert packed[3:5] == ([((2,), (1.0,)), None], None)
    with pytest.raises(ValueError, match="sampling came as None"):
        unpack_call("verify", packed)
    packed = pack_call("verify", ("s1", [1], [2, 3], [SparseDist((2,), (1.0,)), None], Sampling(), False))
    with pytest.raises(ValueError, match=r"distributions came as \[\(\(2,\), \(1.0,\)\), None\]"):
        unpack_call("verify", packed)


def test_an_op_without_a_sampling_passes_as_it_is() -> None:
    args = ("s1", [1, 2], 3)
    assert unpack_call("score", args) is args
