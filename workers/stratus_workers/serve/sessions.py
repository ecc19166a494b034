"""Speculative-decoding sessions: cache rows kept between a router's Draft, Verify and Score calls.

The rows above the decode batch form a pool. A session holds one row with the tokens whose keys
and values it caches; each call rolls the row back to the longest prefix it shares with the
context sent, so a verifier pays only for the new tokens of each round. Every method runs in the
engine thread between decode steps (`Engine.run_op`), which is what makes touching the runner safe.

Verification is batched: `verify_many` takes every Verify call of an engine step and runs all their rows
in one forward pass, so many edge devices verifying at once cost the cloud about one step of the model,
not one step each. The acceptance rule is `verify`'s, applied to each row's own logits (the greedy rule
for all rows at once on the device: `speculative.greedy_verdicts`). `verify_many` is `finish(launch(calls))`:
`launch` queues a group's pass and verdicts on the device and returns at once, `finish` waits for that group's
greedy verdicts only, then judges and settles it, so that the engine can queue one group's pass while the host
settles and replies to another's (`EngineCore`, the verify pipeline).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.errors import EngineFailed, EngineOverloaded
from stratus_workers.serve.runner import ModelRunner, to_device
from stratus_workers.serve.sampling import seeded_generator
from stratus_workers.serve.speculative import (
    SparseDist,
    Verdict,
    check_sampled,
    draft_distribution,
    greedy_verdicts,
    sample_sparse,
    sampled_verdict,
    sampling_probs_rows,
)
from stratus_workers.serve.surface import DraftResult as DraftResult
from stratus_workers.serve.surface import VerifyResult as VerifyResult

log = logging.getLogger(__name__)

# A session used this recently is never evicted to make room for another: the caller is mid-round.
BUSY_SECONDS = 1.0

# A row's verdict as judged: draft tokens accepted, the verifier's own next token, the log-probabilities of the
# accepted tokens and of that one, and whether the accepted tokens or that one end the sequence.
_Judged = tuple[int, int, tuple[float, ...], bool]


class ReadBack:
    """Device values on their way to the host: a non-blocking copy into pinned memory and an event after it,
    queued now; `wait` waits for that event only (with the GIL released: `tolist` on a device tensor holds it, so
    the frontend's thread runs meanwhile). On the CPU the values are read at once."""

    # Seconds hosts spent blocked in `wait` (the device still computing), all read-backs of this process together:
    # the step profile's measure of whether verification waits on the device or the device on the host.
    waited: ClassVar[float] = 0.0

    def __init__(self, values: torch.Tensor, pick: Callable[[list[Any]], list[Any]] | None = None) -> None:
        self._pick = pick  # what `wait` returns of the values read
        self._values: list[Any] | None = None
        self._host: torch.Tensor | None = None
        self._done: Any = None
        if values.device.type != "cuda":
            self._values = self._picked(values.tolist())
            return
        # A fresh pinned buffer per read-back: the next one may be queued before this one is read.
        self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self._host.copy_(values, non_blocking=True)
        self._done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._done.record()

    def ready(self) -> bool:
        """Whether `wait` would return at once (the copy is done)."""
        return self._values is not None or bool(self._done.query())

    def wait(self) -> list[Any]:
        if self._values is None:
            assert self._host is not None
            if not self._done.query():
                started = time.perf_counter()
                self._done.synchronize()
                ReadBack.waited += time.perf_counter() - started
            self._values = self._picked(self._host.tolist())
        return self._values

    def _picked(self, values: list[Any]) -> list[Any]:
        return values if self._pick is None else self._pick(values)


def read_back(values: torch.Tensor) -> list[Any]:
    """`values.tolist()`, but waiting for the device with the GIL released (`ReadBack`)."""
    return ReadBack(values).wait()


class VerifyCall(NamedTuple):
    """One Verify call's arguments (see `SpeculativeSessions.verify`); a named tuple: made for every call as it
    is queued, where a frozen dataclass costs several times as much."""

    sid: str
    context: Sequence[int]
    draft: Sequence[int]
    dists: Sequence[SparseDist]
    sampling: Sampling
    end: bool = False


@dataclass
class _Session:
    row: int
    tokens: list[int] = field(default_factory=list)  # whose keys and values sit in the row
    last_used: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None


@dataclass(eq=False)
class PendingVerify:
    """A group of Verify calls `SpeculativeSessions.launch` started and `finish` has not yet judged: its pass's
    rows (`entries`, in row order, with each one's call index), the pass's logits, and the greedy rows' verdicts
    on their way to the host."""

    calls: list[VerifyCall]
    results: list[VerifyResult | Exception | None]
    alone: list[int] = field(default_factory=list)  # calls that run alone, at `finish`
    entries: list[tuple[VerifyCall, _Session, list[int]]] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # kept only where rows are sampled (their judging reads it at `finish`)
    greedy: list[int] = field(default_factory=list)  # the entries judged on the device
    verdicts: ReadBack | None = None
    sids: frozenset[str] = frozenset()
    finished: bool = False

    def ready(self) -> bool:
        """Whether the group's greedy verdicts are on the host (finishing it would not wait for them)."""
        return self.verdicts is None or self.verdicts.ready()


class SpeculativeSessions:
    """Sessions over the runner's rows `first_row`..max_rows-1, least recently used first out.

    A session idle for `ttl` seconds is ended (the engine calls `expire` when it wakes).
    """

    def __init__(self, runner: ModelRunner, eos: frozenset[int], *, first_row: int, ttl: float = 60.0) -> None:
        if not 0 <= first_row <= runner.max_rows:
            raise ValueError(f"first_row {first_row} is outside the runner's {runner.max_rows} rows")
        self.runner = runner
        self.ttl = ttl
        self.first_row = first_row
        self.max_sessions = runner.max_rows - first_row
        self.max_len = runner.max_len
        self.vocab_size = runner.vocab_size
        self._eos = eos
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._free_rows = list(range(runner.max_rows - 1, first_row - 1, -1))
        self._ids = itertools.count(1)
        self._in_flight: set[str] = set()  # sessions of groups launched, not yet finished (`launch`)

    def __len__(self) -> int:
        return len(self._sessions)

    def expire(self) -> None:
        """End the sessions idle for longer than `ttl` (each of them: one whose row's reset fails is ended all the
        same, `end`)."""
        now = time.monotonic()
        flying = self._in_flight
        self._end_each([sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl and sid not in flying])

    def end(self, sid: str) -> None:
        """Free the session's row (nothing happens for an unknown session)."""
        if sid in self._in_flight:
            raise RuntimeError(f"session {sid!r} is in a verification still in flight: finish that group first")
        session = self._sessions.pop(sid, None)
        if session is not None:
            try:
                self.runner.reset(session.row)
            finally:  # a row whose reset failed is free all the same: `_open` resets a row it takes
                self._free_rows.append(session.row)

    def _open(
        self, sid: str, context: Sequence[int], sampling: Sampling, cuts: list[tuple[int, int]] | None = None
    ) -> tuple[_Session, list[int]]:
        """The session's row, rolled back to the longest cached prefix of `context`; returns the rest. With `cuts`,
        the roll-back is appended there as (row, length) instead, for the caller to make with others (`_cut`)."""
        if not context:
            raise ValueError("context is empty: send the prompt's token ids")
        if len(context) >= self.max_len:
            raise ValueError(f"context of {len(context)} tokens exceeds this server's {self.max_len - 1}")
        if sid in self._in_flight:  # its row is being computed: the engine finishes that group first
            raise RuntimeError(f"session {sid!r} is in a verification still in flight: finish that group first")
        session = self._sessions.get(sid)
        common = 0
        if session is not None:
            held = session.tokens
            limit = min(len(held), len(context) - 1)  # keep at least one token to compute logits from
            prefix = context[:limit]
            if not isinstance(prefix, list):
                prefix = list(prefix)
            # The usual case, a session's next round, is one comparison (the row holds a prefix of the context).
            if (held if limit == len(held) else held[:limit]) == prefix:
                common = limit
            else:
                while common < limit and held[common] == context[common]:
                    common += 1
        # The cached tokens were checked when they came; only the rest can be out of range.
        rest = list(context[common:])
        if min(rest) < 0 or max(rest) >= self.vocab_size:
            raise ValueError(f"context holds token ids outside this model's vocabulary of {self.vocab_size}")
        if session is None:
            self.expire()
            if not self._free_rows:
                if not self._sessions:
                    raise EngineOverloaded("this server holds no speculative sessions (max_sessions is 0)")
                # The least recently used, of those not in flight (their rows are being computed).
                idle = next((s for s in self._sessions if s not in self._in_flight), None)
                if idle is None or time.monotonic() - self._sessions[idle].last_used < BUSY_SECONDS:
                    raise EngineOverloaded(f"all {self.max_sessions} speculative sessions are busy; try again")
                self.end(idle)
            self.runner.reset(self._free_rows[-1])  # before it is taken: a reset that fails loses no row
            session = _Session(self._free_rows.pop())
            if not sampling.greedy:
                session.generator = seeded_generator(sampling.seed)
            self._sessions[sid] = session
        self._sessions.move_to_end(sid)
        session.last_used = time.monotonic()
        if self.runner.lengths[session.row] != common:
            if cuts is None:
                self.runner.truncate(session.row, common)
            else:
                cuts.append((session.row, common))
        del session.tokens[common:]
        return session, rest

    def draft(
        self, sid: str, context: Sequence[int], max_tokens: int, sampling: Sampling, top_k: int, end: bool
    ) -> DraftResult:
        """Up to `max_tokens` tokens after `context` (with their distributions when sampled); `end` ends the session
        either way, unless the engine failed (then the runner is not touched again)."""
        tokens: list[int] = []
        dists: list[SparseDist] = []
        eos = False
        with self._ending(sid, end):
            session, pending = self._open(sid, context, sampling)
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
        return DraftResult(tuple(tokens), tuple(dists), eos)

    def verify(
        self,
        sid: str,
        context: Sequence[int],
        draft: Sequence[int],
        dists: Sequence[SparseDist],
        sampling: Sampling,
        end: bool,
    ) -> VerifyResult:
        """How many draft tokens this model accepts after `context`, and its own next token. A call that fails keeps
        nothing of itself in the session (the row holds the session's tokens); `end` ends the session either way."""
        call = VerifyCall(sid, context, draft, dists, sampling, end)
        session: _Session | None = None
        with self._ending(sid, end):
            try:
                self._check_verify(call)
                session, pending = self._open(sid, context, sampling)
                # Scored from the last context token on: the rest of the context only goes into the cache.
                scores = self.runner.forward(
                    session.row, [pending + list(draft)], all_logits=True, logits_from=len(pending) - 1
                )[0]
                entry = (call, session, pending)
                judged = self._judge_greedy([entry], None, scores) if sampling.greedy else None
                verdict = judged[0] if judged else self._judge_sampled([entry], [0], scores)[0]
                if isinstance(verdict, Exception):
                    raise verdict
                return self._settle([(call, session, pending, verdict)])[0]
            except EngineFailed:
                raise
            except Exception:  # nothing of the call is kept past what the session held
                if session is not None and not end:
                    self._restore([(sid, session)])
                raise

    def verify_many(self, calls: Sequence[VerifyCall]) -> list[VerifyResult | Exception]:
        """Each call's `verify` result (or the error it raised), the calls' rows run in one forward pass:
        `finish(launch(calls))`."""
        return self.finish(self.launch(calls))

    def launch(self, calls: Sequence[VerifyCall]) -> PendingVerify:
        """Start verifying `calls` (as `verify_many`) and return without waiting for the device: the sessions opened
        and rolled back, the pass queued (`runner.forward_rows`), the greedy rows' verdicts queued behind it and their
        copy to the host started (`ReadBack`). `finish` judges and settles them; until then the calls' sessions are
        in flight: no other call may name them (`_open` and `end` refuse), and neither eviction nor `expire` takes
        them. On the CPU the pass runs here, synchronously; the results are the same either way.

        The sessions' rows need not be adjacent (`runner.forward_rows`: the fused path packs their tokens;
        the module path pads them and gives a row in between one throwaway token, rolled back at once).
        Greedy verdicts are judged on the device for all rows together and read back in one transfer; the
        rows' lengths change in one update before the pass and one after it (at `finish`), not one per session.
        Calls that cannot share the pass (a session named twice, rows too long to pad to the longest call)
        run alone, in order, at `finish`; so are sampled rows judged (their sessions' generators draw there).

        A failure part way (a roll-back, the pass, its verdicts) fails the calls whose sessions it opened with that
        error and leaves those sessions as before the call (`_abandon`): none in flight, each row holding exactly its
        session's tokens, the ones their calls end ended; the group returned is finished as any other. EngineFailed
        is raised (the engine loop ends).
        """
        pending = PendingVerify(list(calls), [None] * len(calls))
        rows: dict[int, tuple[int, _Session, list[int]]] = {}  # row -> (call index, session, pending)
        sids: set[str] = set()
        cuts: list[tuple[int, int]] = []  # (row, length): sessions rolled back to the prefix their call shares
        try:
            with self.runner.mark("open"):
                for i, call in enumerate(calls):
                    if call.sid in sids:
                        pending.alone.append(i)
                        continue
                    try:
                        self._check_verify(call)
                        session, tokens = self._open(call.sid, call.context, call.sampling, cuts)
                    except EngineFailed:
                        raise
                    except Exception as exc:
                        pending.results[i] = exc
                        if call.end and call.sid not in self._in_flight:  # (one in flight is another group's to end)
                            self._end_each([call.sid])  # (the call has its error)
                        continue
                    rows[session.row] = (i, session, tokens)
                    sids.add(call.sid)
                    # In flight from here on: a later call's `_open` (its `expire`, an eviction) must not end it.
                    self._in_flight.add(call.sid)
                self._cut(cuts)
            if rows:  # one row too: the same pass, so that a session's verdicts do not depend on its company
                self._launch_rows(pending, rows)
        except Exception as exc:
            pending.sids = frozenset(sids)
            self._abandon(pending, [(i, calls[i], session) for i, session, _ in rows.values()], exc)
            if isinstance(exc, EngineFailed):
                raise
            return pending
        pending.sids = frozenset(sids)  # the sessions this group opened (none was in flight: `_open` refuses those)
        return pending

    def finish(self, pending: PendingVerify) -> list[VerifyResult | Exception]:
        """The results of a group `launch` started, in its calls' order (an error where a call failed): waits for
        the group's greedy verdicts only (not for passes queued after it), keeps each session's accepted prefix, ends
        the sessions their calls end, then runs the calls that must run alone. Each group is finished exactly once.
        Sampled rows are judged here from the group's logits, on the device behind whatever was queued since, so a
        group with sampled rows does wait for later passes (the pipeline overlaps greedy traffic only).

        A failure while judging or settling fails the pass's calls with that error, as in `launch` (`_abandon`); a
        session whose end fails is ended all the same, its call keeping its verdict. EngineFailed is raised."""
        if pending.finished:
            raise RuntimeError("this verification group was finished already")
        pending.finished = True
        results, entries, index = pending.results, pending.entries, pending.index
        try:
            if entries:
                self._finish_rows(pending)
        except Exception as exc:
            opened = [(i, call, session) for i, (call, session, _) in zip(index, entries, strict=True)]
            self._abandon(pending, opened, exc)
            if isinstance(exc, EngineFailed):
                raise
        else:
            self._in_flight -= pending.sids
            # A verdict stands though its session's end failed (logged there; the row is freed either way).
            self._end_each([call.sid for call, _, _ in entries if call.end])
        calls = pending.calls
        for i in sorted(pending.alone):
            call = calls[i]
            try:
                results[i] = self.verify(call.sid, call.context, call.draft, call.dists, call.sampling, call.end)
            except EngineFailed:
                raise
            except Exception as exc:
                results[i] = exc
        return [r if r is not None else RuntimeError("verification produced no result") for r in results]

    @property
    def in_flight(self) -> frozenset[str]:
        """The sessions of groups launched and not yet finished."""
        return frozenset(self._in_flight)

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def __contains__(self, sid: object) -> bool:
        return sid in self._sessions

    def _cut(self, cuts: list[tuple[int, int]]) -> None:
        """Roll rows back to these lengths, all in one update."""
        if cuts:
            rows, lengths = zip(*cuts, strict=True)
            self.runner.truncate_rows(rows, lengths)

    def _end_each(self, sids: Sequence[str]) -> None:
        """End every one of the sessions (`end`), the rest too where one fails (its row is freed all the same, and the
        failure logged: a device whose resets fail must show somewhere)."""
        for sid in sids:
            try:
                self.end(sid)
            except EngineFailed:
                raise
            except Exception as exc:
                log.warning("ending speculative session %r failed; its row is freed", sid, exc_info=exc)

    @contextlib.contextmanager
    def _ending(self, sid: str, end: bool) -> Iterator[None]:
        """A lone call on `sid` (draft, verify, score): with `end` the session is ended on the way out, whatever
        became of the call, unless the engine failed (the runner is dead: ending would call into it, a pipeline's
        dead stage) or the session is in another group's verification in flight (that group ends it)."""
        try:
            yield
        except EngineFailed:
            end = False
            raise
        finally:
            if end and sid not in self._in_flight:
                self.end(sid)

    def _restore(self, sessions: Sequence[tuple[str, _Session]]) -> None:
        """Roll each session's row back to the tokens the session holds, where a failure left it holding others (a
        pass that ran, a roll-back not made); a session whose row cannot be rolled back is ended: what it holds is
        not known."""
        lengths = self.runner.lengths
        stale = [
            (sid, session)
            for sid, session in sessions
            if self._sessions.get(sid) is session and lengths[session.row] != len(session.tokens)
        ]
        try:
            self._cut([(session.row, len(session.tokens)) for _, session in stale])
        except EngineFailed:
            raise
        except Exception as exc:
            ended = [sid for sid, _ in stale]
            log.warning("rolling back speculative sessions %s failed; they are ended", ended, exc_info=exc)
            self._end_each(ended)

    def _abandon(
        self, pending: PendingVerify, opened: Sequence[tuple[int, VerifyCall, _Session]], error: Exception
    ) -> None:
        """After `error` cut a group's launch or finish short: each call of `opened` (call index, call, the session it
        opened) that has no result gets `error`; none of the group's sessions stays in flight; those their calls end
        are ended, the others hold exactly their tokens in their rows (`_restore`). With EngineFailed the runner is
        not touched again: the engine loop ends."""
        results = pending.results
        for i, _, _ in opened:
            if results[i] is None:
                results[i] = error
        self._in_flight.difference_update(pending.sids, (call.sid for _, call, _ in opened))
        pending.entries, pending.index, pending.greedy, pending.sids = [], [], [], frozenset()
        pending.logits = pending.verdicts = None
        if isinstance(error, EngineFailed):
            return
        self._restore([(call.sid, session) for _, call, session in opened if not call.end])
        self._end_each([call.sid for _, call, _ in opened if call.end])

    def _launch_rows(self, pending: PendingVerify, rows: dict[int, tuple[int, _Session, list[int]]]) -> None:
        """Queue one forward pass over the calls' rows (`runner.forward_rows`) and the greedy rows' verdicts behind
        it; fills `pending` (its `alone` where the rows cannot share the pass)."""
        calls = pending.calls
        order = sorted(rows)
        entries = [(calls[i], session, tokens) for i, session, tokens in (rows[row] for row in order)]
        index = [rows[row][0] for row in order]
        lengths = self.runner.lengths
        tokens = [tokens + list(call.draft) for call, _, tokens in entries]
        # The padded pass (the module path) pads every row to the longest call: it must fit every row's cache.
        if max(lengths[order[0] : order[-1] + 1]) + max(map(len, tokens)) > self.max_len:
            pending.alone.extend(index)
            return
        # Scored from each row's last context token on: the context before it only goes into the cache.
        starts = [len(held) - 1 for _, _, held in entries]
        if all(call.sampling.greedy for call, _, _ in entries):  # the pass and its verdicts in one, where it can
            plan = self._greedy_plan(entries)
            found = self.runner.forward_rows_greedy(order, tokens, starts, plan)  # (a failure fails the group)
            if found is not None:
                values, width = found
                n, size = len(entries), plan.shape[1]
                pending.entries, pending.index, pending.greedy = entries, index, list(range(n))
                pending.verdicts = ReadBack(
                    values, lambda v: v[:n] + v[width : width + n] + v[2 * width : 2 * width + size]
                )
                return
        logits = self.runner.forward_rows(order, tokens, starts)  # (a failure fails the group: `launch`)
        # Row k's scores are logits[offsets[k] : offsets[k + 1]]: position j predicts the token after
        # context + draft[:j]. A pass launched after this one, before `finish`, cannot change what this group reads:
        # everything runs on one stream, in the order queued. The packed graph's inputs (`_packed_inputs`) are
        # refilled by a copy queued after this replay, which has read them by then; its static output is read by
        # the head queued right behind this replay, before any later replay writes it, into `logits`, a tensor of
        # this pass's own; the pass's plan came through a pinned buffer of its own (`to_device`). The rows the next
        # pass writes are other sessions' (the engine never launches a session twice), and the padded pass's
        # throwaway token in a row in between lands past that row's end, rolled back at once.
        pending.entries, pending.index = entries, index
        greedy = [k for k, (call, _, _) in enumerate(entries) if call.sampling.greedy]
        if len(greedy) < len(entries):  # sampled rows are judged from the logits at `finish`; else nothing holds them
            pending.logits = logits
        if not greedy:
            return
        positions = None  # the usual case, every row greedy: all of the scores, in order
        if len(greedy) < len(entries):  # where the greedy rows' scores sit among all rows'
            offsets = np.cumsum([0, *(len(call.draft) + 1 for call, _, _ in entries)])
            counts = np.diff(offsets)[greedy]
            positions = np.repeat(offsets[greedy], counts) + (
                np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            )
        pending.greedy = greedy
        with self.runner.mark("verdicts"):
            pending.verdicts = self._queue_greedy([entries[k] for k in greedy], positions, logits)

    def _finish_rows(self, pending: PendingVerify) -> None:
        """Judge the pass's rows (the greedy ones from their verdicts read back, the sampled ones from the logits)
        and keep each session's accepted prefix; fills `pending.results`."""
        entries, index, logits, results = pending.entries, pending.index, pending.logits, pending.results
        judged: list[_Judged | Exception] = [RuntimeError("verification produced no verdict")] * len(entries)
        if pending.verdicts is not None:
            greedy = pending.greedy
            values = pending.verdicts.wait()
            for k, verdict in zip(greedy, self._greedy_judged([entries[k] for k in greedy], values), strict=True):
                judged[k] = verdict
        sampled = [k for k, (call, _, _) in enumerate(entries) if not call.sampling.greedy]
        if sampled:
            assert logits is not None
            offsets = np.cumsum([0, *(len(call.draft) + 1 for call, _, _ in entries)])
            found = self._judge_sampled([entries[k] for k in sampled], offsets[sampled].tolist(), logits)
            for k, sampled_judged in zip(sampled, found, strict=True):
                judged[k] = sampled_judged
        lengths = self.runner.lengths
        settle: list[tuple[VerifyCall, _Session, list[int], _Judged]] = []
        settled: list[int] = []
        cuts: list[tuple[int, int]] = []
        for i, entry, row_verdict in zip(index, entries, judged, strict=True):
            if isinstance(row_verdict, Exception):
                results[i] = row_verdict
                session = entry[1]
                if lengths[session.row] != len(session.tokens):
                    cuts.append((session.row, len(session.tokens)))
            else:
                settle.append((*entry, row_verdict))
                settled.append(i)
        verdicts = self._settle(settle, cuts)
        for i, verdict_result in zip(settled, verdicts, strict=True):
            results[i] = verdict_result

    def _judge_greedy(
        self, entries: Sequence[tuple[VerifyCall, _Session, list[int]]], positions: np.ndarray | None,
        logits: torch.Tensor,
    ) -> list[_Judged]:  # fmt: skip
        """The greedy rows' verdicts (`_queue_greedy`, then `_greedy_judged`)."""
        return self._greedy_judged(entries, self._queue_greedy(entries, positions, logits).wait())

    def _queue_greedy(
        self, entries: Sequence[tuple[VerifyCall, _Session, list[int]]], positions: np.ndarray | None,
        logits: torch.Tensor,
    ) -> ReadBack:  # fmt: skip
        """The greedy rows' verdicts, all judged on the device (`greedy_verdicts`), on their way back in one
        transfer: a wait on the device per session, not per pass, is what bounds a GPU's verify rounds.
        `positions`: where the rows' scores sit in `logits` (None: all of it, in order)."""
        n = len(entries)
        # Then where each position sits in `logits`. `to_device` copies from a pinned buffer of this call's own, so
        # the next group's plan, queued before this one's copy ran, cannot overwrite it.
        plan = self._greedy_plan(entries)
        if positions is not None:
            plan = np.concatenate([plan, positions[None, :]])
        plan_dev = to_device(plan, logits.device)
        scores = logits if positions is None else logits.index_select(0, plan_dev[2])
        stop, token, logprobs = greedy_verdicts(scores, plan_dev[0], plan_dev[1], n)
        return ReadBack(torch.cat([stop.double(), token.double(), logprobs.double()]))

    @staticmethod
    def _greedy_plan(entries: Sequence[tuple[VerifyCall, _Session, list[int]]]) -> np.ndarray:
        """Per scored position of the rows (each row's draft, then its bonus position): the draft token it predicts
        (-1 at the bonus position) and its row's index in `entries`; [2, positions] int64."""
        drafts = [call.draft for call, _, _ in entries]
        counts = [len(d) + 1 for d in drafts]
        size = sum(counts)
        plan = np.empty((2, size), dtype=np.int64)
        plan[0] = np.fromiter(itertools.chain.from_iterable((*d, -1) for d in drafts), dtype=np.int64, count=size)
        plan[1] = np.repeat(np.arange(len(drafts), dtype=np.int64), counts)
        return plan

    def _greedy_judged(
        self, entries: Sequence[tuple[VerifyCall, _Session, list[int]]], values: list[Any]
    ) -> list[_Judged]:
        """The greedy rows' verdicts from `_queue_greedy`'s values: per row the position of the verifier's own
        token, then per row that token, then the log-probability of every scored position."""
        n = len(entries)
        eos = self._eos
        judged: list[_Judged] = []
        first = 0  # the row's first position among the greedy rows' scores
        for g, (call, _, _) in enumerate(entries):
            draft = call.draft
            end = int(values[g])  # the position of the verifier's own token: the row's first + accepted
            accepted, own = end - first, int(values[n + g])
            ends = own in eos or not eos.isdisjoint(draft[:accepted])
            judged.append((accepted, own, tuple(values[2 * n + first : 2 * n + end + 1]), ends))
            first += len(draft) + 1
        return judged

    def _judge_sampled(
        self, entries: Sequence[tuple[VerifyCall, _Session, list[int]]], offsets: Sequence[int], logits: torch.Tensor
    ) -> list[_Judged | Exception]:
        """The sampled rows' verdicts (each row's own scores at logits[offsets[k]:], `speculative.sampled_verdict`
        with its session's generator): the sampling distributions of all their positions in one pass, the draft
        tokens' probabilities and the chosen tokens' log-probabilities each read back once for all rows."""
        out: list[_Judged | Exception | None] = [None] * len(entries)
        live: list[int] = []
        q: dict[int, list[float]] = {}
        for k, (call, _, _) in enumerate(entries):
            try:
                q[k] = check_sampled(call.draft, call.dists)
                live.append(k)
            except ValueError as exc:
                out[k] = exc
        if live:
            spans = [(offsets[k], len(entries[k][0].draft) + 1) for k in live]
            where = np.concatenate([np.arange(start, start + n, dtype=np.int64) for start, n in spans])
            temperatures = [entries[k][0].sampling.temperature for k, (_, n) in zip(live, spans, strict=True)
                            for _ in range(n)]  # fmt: skip
            top_ps = [entries[k][0].sampling.top_p for k, (_, n) in zip(live, spans, strict=True) for _ in range(n)]
            where_dev = to_device(where, logits.device)
            scores = logits.index_select(0, where_dev)
            probs = sampling_probs_rows(scores, temperatures, top_ps)
            # Each draft token's probability: at its position, the token it is (the bonus positions read token 0).
            drafted = np.concatenate([[*entries[k][0].draft, 0] for k in live]).astype(np.int64)
            p_all = read_back(probs.gather(-1, to_device(drafted, logits.device)[:, None])[:, 0])
            verdicts: list[tuple[int, Verdict]] = []
            at = 0
            for k, (_, n) in zip(live, spans, strict=True):
                call, session, _ = entries[k]
                try:
                    verdicts.append((k, sampled_verdict(
                        probs[at : at + n], p_all[at : at + n - 1], q[k], call.draft, call.dists, session.generator
                    )))  # fmt: skip
                except Exception as exc:
                    out[k] = exc
                at += n
            if verdicts:
                # The chosen tokens' log-probabilities under the verifier's raw scores, one gather for all rows.
                chosen_at: list[int] = []
                chosen: list[int] = []
                for k, verdict in verdicts:
                    call = entries[k][0]
                    chosen_at.extend(range(offsets[k], offsets[k] + verdict.accepted + 1))
                    chosen.extend([*call.draft[: verdict.accepted], verdict.next_token])
                picked_scores = logits.index_select(0, to_device(chosen_at, logits.device))
                picked = picked_scores.gather(-1, to_device(chosen, logits.device)[:, None])[:, 0] - torch.logsumexp(
                    picked_scores, dim=-1
                )
                values = read_back(picked)
                at = 0
                for k, verdict in verdicts:
                    call = entries[k][0]
                    n = verdict.accepted + 1
                    eos = verdict.next_token in self._eos or not self._eos.isdisjoint(call.draft[: verdict.accepted])
                    out[k] = (verdict.accepted, verdict.next_token, tuple(values[at : at + n]), eos)
                    at += n
        return [v if v is not None else RuntimeError("verification produced no verdict") for v in out]

    def _check_verify(self, call: VerifyCall) -> None:
        if call.draft and (min(call.draft) < 0 or max(call.draft) >= self.vocab_size):
            raise ValueError(f"draft holds token ids outside this model's vocabulary of {self.vocab_size}")
        if len(call.context) + len(call.draft) >= self.max_len:
            raise ValueError(
                f"context plus draft ({len(call.context) + len(call.draft)} tokens) exceeds {self.max_len - 1}"
            )

    def _settle(
        self, entries: Sequence[tuple[VerifyCall, _Session, list[int], _Judged]], cuts: Sequence[tuple[int, int]] = ()
    ) -> list[VerifyResult]:
        """Keep each call's accepted prefix in its session and say what was decided: the rows are rolled back to it in
        one update (`_cut`, with the other roll-backs `cuts`), and only then do the sessions take the tokens (where
        the roll-back fails, nothing of the calls is kept)."""
        lengths = self.runner.lengths
        results: list[VerifyResult] = []
        rolls = list(cuts)
        kept: list[tuple[list[int], list[int], Sequence[int], int]] = []
        for call, session, pending, (accepted, token, logprobs, eos) in entries:
            # The row holds the whole context and keeps the accepted draft.
            keep = len(session.tokens) + len(pending) + accepted
            if lengths[session.row] != keep:  # all accepted: the row holds just what it keeps
                rolls.append((session.row, keep))
            kept.append((session.tokens, pending, call.draft, accepted))
            results.append(VerifyResult(accepted, token, logprobs, eos))
        self._cut(rolls)
        for held, pending, draft, accepted in kept:
            held += pending
            held += draft[:accepted]
        return results

    def score(self, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Log-probability of each continuation token after `prompt` (one forward pass in a passing session)."""
        return self.score_with_alternatives(prompt, continuation, 0)[0]

    def score_with_alternatives(
        self, prompt: Sequence[int], continuation: Sequence[int], top: int
    ) -> tuple[tuple[float, ...], tuple[tuple[tuple[int, float], ...], ...]]:
        """As `score`, plus the `top` most likely (token id, log-probability) pairs at each position."""
        if not continuation:
            return (), ()
        sid = f"score-{next(self._ids)}"
        with self._ending(sid, True):
            session, pending = self._open(sid, [*prompt, *continuation], Sampling())
            logits = self.runner.forward(session.row, [pending], all_logits=True)[0]
            # Position i predicts token i+1: the continuation is predicted from len(prompt)-1 on.
            scores = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(continuation) - 1], dim=-1)
            picked = scores[torch.arange(len(continuation)), torch.tensor(list(continuation))]
            alternatives: tuple[tuple[tuple[int, float], ...], ...] = ()
            if top:
                values, ids = torch.topk(scores.float(), top, dim=-1)
                alternatives = tuple(
                    tuple(zip(row_ids, row_values, strict=True))
                    for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
                )
            return tuple(float(x) for x in picked.tolist()), alternatives
