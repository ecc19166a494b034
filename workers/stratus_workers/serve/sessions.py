"""Speculative-decoding sessions: cache rows kept between a router's Draft, Verify and Score calls.

The rows above the decode batch form a pool. A session holds one row with the tokens whose keys
and values it caches; each call rolls the row back to the longest prefix it shares with the
context sent, so a verifier pays only for the new tokens of each round. Every method runs in the
engine thread between decode steps (`Engine.run_op`), which is what makes touching the runner safe.

Verification is batched: `verify_many` takes every Verify call of an engine step and runs all their rows
in one forward pass, so many edge devices verifying at once cost the cloud about one step of the model,
not one step each. The acceptance rule is `verify`'s, applied to each row's own logits (the greedy rule
for all rows at once on the device: `speculative.greedy_verdicts`).
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.errors import EngineOverloaded
from stratus_workers.serve.runner import ModelRunner, to_device
from stratus_workers.serve.sampling import seeded_generator
from stratus_workers.serve.speculative import (
    SparseDist,
    Verdict,
    draft_distribution,
    greedy_verdicts,
    sample_sparse,
    verify_greedy,
    verify_sampled,
)
from stratus_workers.serve.surface import DraftResult as DraftResult
from stratus_workers.serve.surface import VerifyResult as VerifyResult

# A session used this recently is never evicted to make room for another: the caller is mid-round.
BUSY_SECONDS = 1.0


def read_back(values: torch.Tensor) -> list[Any]:
    """`values.tolist()`, but waiting for the device with the GIL released (`tolist` holds it), so that the
    frontend's thread runs meanwhile."""
    if values.device.type != "cuda":
        return values.tolist()  # type: ignore[no-any-return]
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record()
    done.synchronize()
    return host.tolist()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class VerifyCall:
    """One Verify call's arguments (see `SpeculativeSessions.verify`)."""

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

    def __len__(self) -> int:
        return len(self._sessions)

    def expire(self) -> None:
        """End the sessions idle for longer than `ttl`."""
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl]:
            self.end(sid)

    def end(self, sid: str) -> None:
        """Free the session's row (nothing happens for an unknown session)."""
        session = self._sessions.pop(sid, None)
        if session is not None:
            self.runner.reset(session.row)
            self._free_rows.append(session.row)

    def _open(self, sid: str, context: Sequence[int], sampling: Sampling) -> tuple[_Session, list[int]]:
        """The session's row, rolled back to the longest cached prefix of `context`; returns the rest."""
        if not context:
            raise ValueError("context is empty: send the prompt's token ids")
        if len(context) >= self.max_len:
            raise ValueError(f"context of {len(context)} tokens exceeds this server's {self.max_len - 1}")
        session = self._sessions.get(sid)
        common = 0
        if session is not None:
            held = session.tokens
            limit = min(len(held), len(context) - 1)  # keep at least one token to compute logits from
            if held[:limit] == list(context[:limit]):  # the usual case, a session's next round: one comparison
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
                idle = next(iter(self._sessions))  # least recently used
                if time.monotonic() - self._sessions[idle].last_used < BUSY_SECONDS:
                    raise EngineOverloaded(f"all {self.max_sessions} speculative sessions are busy; try again")
                self.end(idle)
            session = _Session(self._free_rows.pop())
            self.runner.reset(session.row)
            if not sampling.greedy:
                session.generator = seeded_generator(sampling.seed)
            self._sessions[sid] = session
        self._sessions.move_to_end(sid)
        session.last_used = time.monotonic()
        if self.runner.lengths[session.row] != common:
            self.runner.truncate(session.row, common)
        del session.tokens[common:]
        return session, rest

    def draft(
        self, sid: str, context: Sequence[int], max_tokens: int, sampling: Sampling, top_k: int, end: bool
    ) -> DraftResult:
        """Up to `max_tokens` tokens after `context` (with their distributions when sampled)."""
        session, pending = self._open(sid, context, sampling)
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
                self.end(sid)
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
        """How many draft tokens this model accepts after `context`, and its own next token."""
        call = VerifyCall(sid, context, draft, dists, sampling, end)
        self._check_verify(call)
        session, pending = self._open(sid, context, sampling)
        try:
            # Scored from the last context token on: the rest of the context only goes into the cache.
            scores = self.runner.forward(
                session.row, [pending + list(draft)], all_logits=True, logits_from=len(pending) - 1
            )[0]
            return self._judge(call, session, pending, scores)
        finally:
            if end:
                self.end(sid)

    def verify_many(self, calls: Sequence[VerifyCall]) -> list[VerifyResult | Exception]:
        """Each call's `verify` result (or the error it raised), the calls' rows run in one forward pass.

        The sessions' rows need not be adjacent (`runner.forward_rows`: the fused path packs their tokens;
        the module path pads them and gives a row in between one throwaway token, rolled back at once).
        Greedy verdicts are judged on the device for all rows together and read back in one transfer.
        Calls that cannot share the pass (a session named twice, rows too long to pad to the longest call)
        run alone, in order.
        """
        results: list[VerifyResult | Exception | None] = [None] * len(calls)
        rows: dict[int, tuple[int, _Session, list[int]]] = {}  # row -> (call index, session, pending)
        alone: list[int] = []
        sids: set[str] = set()
        for i, call in enumerate(calls):
            if call.sid in sids:
                alone.append(i)
                continue
            try:
                self._check_verify(call)
                session, pending = self._open(call.sid, call.context, call.sampling)
            except Exception as exc:
                results[i] = exc
                if call.end:
                    self.end(call.sid)
                continue
            rows[session.row] = (i, session, pending)
            sids.add(call.sid)
        if rows:  # one row too: the same pass, so that a session's verdicts do not depend on its company
            self._verify_rows(calls, rows, results, alone)
        for i in sorted(alone):
            call = calls[i]
            try:
                results[i] = self.verify(call.sid, call.context, call.draft, call.dists, call.sampling, call.end)
            except Exception as exc:
                results[i] = exc
        return [r if r is not None else RuntimeError("verification produced no result") for r in results]

    def _verify_rows(
        self,
        calls: Sequence[VerifyCall],
        rows: dict[int, tuple[int, _Session, list[int]]],
        results: list[VerifyResult | Exception | None],
        alone: list[int],
    ) -> None:
        """One forward pass over the calls' rows (`runner.forward_rows`); fills `results` (or `alone`, when
        they cannot share it)."""
        order = sorted(rows)
        lengths = self.runner.lengths
        tokens = [rows[row][2] + list(calls[rows[row][0]].draft) for row in order]
        # The padded pass (the module path) pads every row to the longest call: it must fit every row's cache.
        if max(lengths[order[0] : order[-1] + 1]) + max(len(t) for t in tokens) > self.max_len:
            alone.extend(i for i, _, _ in rows.values())
            return
        # Scored from each row's last context token on: the context before it only goes into the cache.
        starts = [len(rows[row][2]) - 1 for row in order]
        try:
            logits = self.runner.forward_rows(order, tokens, starts)
        except Exception as exc:
            for i, session, _ in rows.values():
                results[i] = exc
                self.runner.truncate(session.row, len(session.tokens))
                if calls[i].end:
                    self.end(calls[i].sid)
            return
        # Row k's scores are logits[offsets[k] : offsets[k] + len(draft) + 1]: position j predicts the token
        # after context + draft[:j].
        offsets = [0]
        for row in order:
            offsets.append(offsets[-1] + len(calls[rows[row][0]].draft) + 1)
        judged: list[tuple[int, Verdict, Sequence[float]]] = []
        greedy = [k for k, row in enumerate(order) if calls[rows[row][0]].sampling.greedy]
        if greedy:
            judged += self._judge_greedy(calls, rows, order, offsets, logits, greedy)
        for k, row in enumerate(order):
            i, session, pending = rows[row]
            call = calls[i]
            if call.sampling.greedy:
                continue
            scores = logits[offsets[k] : offsets[k + 1]]
            try:
                sampling = call.sampling
                verdict = verify_sampled(
                    scores, call.draft, call.dists, sampling.temperature, sampling.top_p, session.generator
                )
            except Exception as exc:
                results[i] = exc
                self.runner.truncate(session.row, len(session.tokens))
                if call.end:
                    self.end(call.sid)
                continue
            chosen = torch.tensor([*call.draft[: verdict.accepted], verdict.next_token], device=scores.device)
            picked = scores[: len(chosen)].gather(-1, chosen[:, None])[:, 0] - torch.logsumexp(
                scores[: len(chosen)], dim=-1
            )
            judged.append((row, verdict, picked.tolist()))
        for row, verdict, logprobs in judged:
            i, session, pending = rows[row]
            call = calls[i]
            results[i] = self._settle(call, session, pending, verdict, logprobs)
            if call.end:
                self.end(call.sid)

    def _judge_greedy(
        self,
        calls: Sequence[VerifyCall],
        rows: dict[int, tuple[int, _Session, list[int]]],
        order: list[int],
        offsets: list[int],
        logits: torch.Tensor,
        greedy: list[int],
    ) -> list[tuple[int, Verdict, Sequence[float]]]:
        """The greedy rows' verdicts, all judged on the device (`greedy_verdicts`) and read back in one
        transfer: a wait on the device per session, not per pass, is what bounds a GPU's verify rounds."""
        n = len(greedy)
        drafts = [calls[rows[order[k]][0]].draft for k in greedy]
        counts = np.fromiter((len(d) + 1 for d in drafts), dtype=np.int64, count=n)
        size = int(counts.sum())
        # Per scored position: the draft token it predicts (-1 at each row's bonus position), then its row's
        # index among the greedy rows, then where it sits in `logits` (not every row may be greedy).
        plan = np.empty((3, size), dtype=np.int64)
        plan[0] = np.fromiter(itertools.chain.from_iterable((*d, -1) for d in drafts), dtype=np.int64, count=size)
        plan[1] = np.repeat(np.arange(n, dtype=np.int64), counts)
        if size == logits.shape[0]:
            plan[2] = np.arange(size, dtype=np.int64)
        else:
            plan[2] = np.concatenate([np.arange(offsets[k], offsets[k + 1], dtype=np.int64) for k in greedy])
        plan_dev = to_device(plan, logits.device)
        scores = logits if size == logits.shape[0] else logits.index_select(0, plan_dev[2])
        stop, token, logprobs = greedy_verdicts(scores, plan_dev[0], plan_dev[1], n)
        values = read_back(torch.cat([stop.double(), token.double(), logprobs.double()]))
        judged: list[tuple[int, Verdict, Sequence[float]]] = []
        at = 0
        for g, (k, count) in enumerate(zip(greedy, counts.tolist(), strict=True)):
            end = int(values[g])  # the position (among the greedy rows' scores) of the verifier's own token
            verdict = Verdict(end - at, int(values[n + g]))
            judged.append((order[k], verdict, values[2 * n + at : 2 * n + end + 1]))
            at += count
        return judged

    def _check_verify(self, call: VerifyCall) -> None:
        if call.draft and (min(call.draft) < 0 or max(call.draft) >= self.vocab_size):
            raise ValueError(f"draft holds token ids outside this model's vocabulary of {self.vocab_size}")
        if len(call.context) + len(call.draft) >= self.max_len:
            raise ValueError(
                f"context plus draft ({len(call.context) + len(call.draft)} tokens) exceeds {self.max_len - 1}"
            )

    def _judge(self, call: VerifyCall, session: _Session, pending: list[int], scores: torch.Tensor) -> VerifyResult:
        """The verdict on `call.draft` from its row's scores: row j predicts the token after context + draft[:j]."""
        sampling = call.sampling
        if sampling.greedy:
            verdict = verify_greedy(scores, call.draft)
        else:
            verdict = verify_sampled(
                scores, call.draft, call.dists, sampling.temperature, sampling.top_p, session.generator
            )
        chosen = [*call.draft[: verdict.accepted], verdict.next_token]
        logprobs = torch.log_softmax(scores[: verdict.accepted + 1], dim=-1)
        picked = logprobs[torch.arange(len(chosen)), torch.tensor(chosen)].tolist()
        return self._settle(call, session, pending, verdict, picked)

    def _settle(
        self, call: VerifyCall, session: _Session, pending: list[int], verdict: Verdict, logprobs: Sequence[float]
    ) -> VerifyResult:
        """Keep the accepted prefix in the session's row and say what was decided."""
        draft = call.draft
        session.tokens.extend(pending)
        session.tokens.extend(draft)
        keep = len(call.context) + verdict.accepted
        if self.runner.lengths[session.row] != keep:  # all accepted: the row holds just what it keeps
            self.runner.truncate(session.row, keep)
        del session.tokens[keep:]
        eos = verdict.next_token in self._eos or not self._eos.isdisjoint(draft[: verdict.accepted])
        return VerifyResult(verdict.accepted, verdict.next_token, tuple(map(float, logprobs)), eos)

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
        session, pending = self._open(sid, [*prompt, *continuation], Sampling())
        try:
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
        finally:
            self.end(sid)
