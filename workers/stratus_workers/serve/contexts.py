"""Contexts on the engine channel as deltas: each side remembers, per session or prompt anchor, the context last sent.

A session's Draft or Verify call carries its whole context (prompt and everything generated), yet each round's
context is the last round's plus a few tokens. `ContextSender` (the frontend, serve/engine.py) remembers per
session id the context it last sent and sends (how much of it to keep, the new tail) instead; `ContextMirror` (the
engine loop, serve/loop.py) keeps the same contexts and rebuilds each call's whole context before the core sees
it. Both change only in channel order (the channel keeps messages in order), whatever becomes of the call: a call
the core refuses still moved both. A session that ends (an "end" call, or a call with `end`) is forgotten on both
sides; the sender keeps at most `limit` sessions, least recently used first out, and each one it evicts becomes a
("drop", sid) message, so a client that never ends its sessions cannot grow either side without bound. Forgetting
on the sender's side alone is always safe (its next call on that session keeps nothing and sends it all).

Requests' prompts go the same way (`prompt_anchor`): a chat's requests repeat one long system prompt, or a
conversation's earlier turns, so the frontend keeps the last prompt sent under an anchor (the hash of its first
PROMPT_ANCHOR_TOKENS tokens) and sends the next prompt with that anchor as (keep, tail). Prompts that share no
prefix under one anchor only cost a comparison: `common_prefix` finds what they do share, however little. For a
3,000-token system prompt this took a request's channel cost from 55 to 40 µs in the frontend and from 85 to 19 µs
in the engine on a CPU of CI's kind (`make bench-channel`; docs/serving.md).

A delta message carries the call's `Sampling` as the tuple of its field values and a Verify call's distributions
as (token ids, probabilities) pairs (`pack_call`; the engine loop turns them back with `unpack_call`): against
pickling the dataclasses the Sampling's values save the frontend about 1.5 µs a call and the engine 0.7, the rebuild
included (`make bench-channel`; docs/serving.md, "The channel, chosen by measurement").
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from typing import Any

from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.surface import SparseDist, rebuilt

# The sender keeps this many sessions' contexts per speculative session the engine holds (at least MIN_CONTEXTS):
# a session the engine evicted for a newer one may come back, and one that ends without saying so must age out.
CONTEXTS_PER_SESSION = 4
MIN_CONTEXTS = 16
# Prompts are anchored by their first PROMPT_ANCHOR_TOKENS tokens, from MIN_ANCHORED_PROMPT tokens on (a shorter
# prompt pickles in a few µs: a delta would save nothing); the sender keeps PROMPT_ANCHORS of them.
PROMPT_ANCHOR_TOKENS = 64
MIN_ANCHORED_PROMPT = 256
PROMPT_ANCHORS = 64

Key = str | int  # a session's id, or a prompt anchor


def prompt_anchor(prompt: list[int]) -> int | None:
    """The anchor `prompt` goes under as a delta (None: it goes whole). Prompts that begin alike share one: the hash of
    their first tokens, which only picks the prompt the delta is against (a collision costs a shorter `keep`)."""
    if len(prompt) < MIN_ANCHORED_PROMPT:
        return None
    return hash(tuple(prompt[:PROMPT_ANCHOR_TOKENS]))


def prompt_messages(
    sender: ContextSender, seq_id: int, prompt: list[int], params: Any, deadline: float | None
) -> tuple[list[tuple[Any, ...]], int | None]:
    """The messages that add request `seq_id` (in order) and the anchor its prompt went under (None: whole). A long
    prompt goes as ("add_delta", seq_id, anchor, keep, tail, params, deadline) after an ("unanchor", anchor) for each
    anchor the sender evicted; a short one as ("add", seq_id, prompt, params, deadline). `sender` has moved: a caller
    whose send fails forgets the anchor."""
    anchor = prompt_anchor(prompt)
    if anchor is None:
        return [("add", seq_id, prompt, params, deadline)], None
    keep, tail, evicted = sender.encode(anchor, prompt, False)
    messages: list[tuple[Any, ...]] = [("unanchor", old) for old in evicted]
    messages.append(("add_delta", seq_id, anchor, keep, tail, params, deadline))
    return messages, anchor


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Sampling))
_sampling_values = operator.attrgetter(*SAMPLING_FIELDS)
# Where a session call's args, (sid, context, ..., end) as `EngineCore.call` takes them, hold its Sampling, and
# a Verify call's the draft's distributions.
SAMPLING_ARG: dict[str, int] = {"draft": 3, "verify": 4, "verify_alone": 4}
DISTS_ARG: dict[str, int] = {"verify": 3, "verify_alone": 3}


def pack_call(op: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`args` of session call `op` as a delta message carries them: its Sampling as the tuple of its field values (in
    SAMPLING_FIELDS' order) and a Verify call's distributions as (token ids, probabilities) pairs. Anything else
    there goes as it is, for the engine to refuse (as the core refused it before)."""
    out = list(args)
    at = SAMPLING_ARG[op]
    if type(args[at]) is Sampling:
        out[at] = _sampling_values(args[at])
    at = DISTS_ARG.get(op, 0)
    if at and args[at]:
        out[at] = [(d.token_ids, d.probs) if type(d) is SparseDist else d for d in args[at]]
    return tuple(out)


def unpack_call(op: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`pack_call` undone: the same args with a Sampling and SparseDists equal to the ones packed. An op that takes
    no Sampling passes as it is (the core refuses an op it does not know); args without the values where they belong
    are a ValueError that says what came instead."""
    at = SAMPLING_ARG.get(op)
    if at is None:
        return args
    out = list(args)
    values = args[at] if len(args) > at else None
    if type(values) is not tuple or len(values) != len(SAMPLING_FIELDS):
        raise ValueError(
            f"internal error: a {op!r} call's sampling came as {values!r}, not as the {len(SAMPLING_FIELDS)} values "
            f"of ({', '.join(SAMPLING_FIELDS)}); nothing of the call was done"
        )
    out[at] = rebuilt(Sampling, zip(SAMPLING_FIELDS, values, strict=True))
    at = DISTS_ARG.get(op)
    if at is not None and args[at]:
        out[at] = _dists(op, args[at])
    return tuple(out)


def _dists(op: str, pairs: Any) -> list[SparseDist]:
    dists: list[SparseDist] = []
    try:
        for token_ids, probs in pairs:
            if type(token_ids) is not tuple or type(probs) is not tuple:
                raise TypeError
            dists.append(rebuilt(SparseDist, {"token_ids": token_ids, "probs": probs}))
    except (TypeError, ValueError):
        raise ValueError(
            f"internal error: a {op!r} call's distributions came as {pairs!r}, not as (token ids, probabilities) "
            f"pairs of tuples; nothing of the call was done"
        ) from None
    return dists


class ContextLost(RuntimeError):
    """The engine's mirror lacks what the frontend said to keep: the two sides disagree (a bug, never input)."""


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of `a` and `b`, by list comparisons (C speed): one when the shorter
    is a prefix of the longer, the usual case (a session's next round); otherwise a bisection over slices."""
    if len(b) <= len(a):
        if a[: len(b)] == b:
            return len(b)
        n = len(b)
    else:
        if b[: len(a)] == a:
            return len(a)
        n = len(a)
    lo, hi = 0, n - 1  # a[:lo] == b[:lo] and the prefix is shorter than n: it lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ContextSender:
    """The frontend's side: per session id, the context last sent (least recently used first)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the context mirror must hold at least one session, not {limit}")
        self.limit = limit
        self._last: collections.OrderedDict[Key, list[int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, sid: Key) -> bool:
        return sid in self._last

    def encode(self, sid: Key, context: list[int], end: bool) -> tuple[int, list[int], list[Key]]:
        """What to send for `context` (a list the sender may keep: the caller's own copy): how many tokens of the
        last one sent to keep, the tail after them, and the sessions evicted to make room (send each a drop first).
        With `end` the session is forgotten (the engine forgets it on reading the call)."""
        last = self._last.pop(sid, None)
        keep = common_prefix(context, last) if last else 0
        tail = context[keep:]
        evicted: list[Key] = []
        if not end:
            self._last[sid] = context
            while len(self._last) > self.limit:
                evicted.append(self._last.popitem(last=False)[0])
        return keep, tail, evicted

    def last(self, sid: Key) -> list[int] | None:
        """The context last sent on `sid`, if remembered (for checks: never change it)."""
        return self._last.get(sid)

    def forget(self, sid: Key) -> None:
        """Forget `sid`'s last context: its next call sends the whole context (always safe)."""
        self._last.pop(sid, None)

    def clear(self) -> None:
        """A new engine (its mirror empty) or a dead one: every session's next call sends its whole context."""
        self._last.clear()


class ContextMirror:
    """The engine's side: per session id, the context last received, as the sender remembers it."""

    def __init__(self) -> None:
        self._last: dict[Key, list[int]] = {}

    def __len__(self) -> int:
        return len(self._last)

    def rebuild(self, sid: Key, keep: int, tail: list[int], end: bool) -> list[int]:
        """The call's whole context: the first `keep` tokens of the last one, then `tail`. A new list each time (the
        core may hold a call's context across steps: nothing here changes a list once built)."""
        if keep:
            last = self._last.get(sid)
            if last is None or keep > len(last):
                self._last.pop(sid, None)
                held = "none" if last is None else f"{len(last)} tokens"
                raise ContextLost(
                    f"internal error: the engine lost session {sid!r}'s context (told to keep {keep} tokens, it "
                    f"holds {held}); nothing of the call was done, and retrying it sends the whole context"
                )
            context = last + tail if keep == len(last) else last[:keep] + tail
        else:
            context = tail
        if end:
            self._last.pop(sid, None)
        else:
            self._last[sid] = context
        return context

    def last(self, sid: Key) -> list[int] | None:
        """The context last received on `sid`, if held (for checks: never change it)."""
        return self._last.get(sid)

    def drop(self, sid: Key) -> None:
        """Drop `sid`'s context (the sender evicted it, or the session ended)."""
        self._last.pop(sid, None)
