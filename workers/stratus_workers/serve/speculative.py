"""Speculative decoding math: the draft's sampling distribution and the verifier's acceptance rule.

Sampled drafts follow Leviathan et al. (2023): accept draft token x with probability
min(1, p(x)/q(x)); on rejection draw from the residual max(0, p - q), renormalised; when all
drafts are accepted draw a bonus token from p. The output is then distributed exactly as the
verifier's own sampling distribution p. The draft distribution q may be anything as long as the
verifier knows it exactly, so drafts come from a top-k truncation of the edge model: that keeps
q sparse and cheap to send over the edge link without giving up exactness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stratus_workers.serve.surface import SparseDist as SparseDist  # the wire-level type lives torch-free


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a sampler with this temperature and nucleus draws from (1-D, sums to 1)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return _nucleus(probs, top_p) if 0.0 < top_p < 1.0 else probs


def _nucleus(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """`probs` (distributions along the last dimension) cut to the smallest prefix of their most likely tokens
    whose mass reaches `top_p` (always at least one token), renormalised; `top_p` a number or one per row [..., 1]."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs[cumulative - sorted_probs > top_p] = 0.0
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def dense(dist: SparseDist, vocab_size: int, device: torch.device | None = None) -> torch.Tensor:
    """`dist` as a [vocab_size] probability vector."""
    out = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    out[torch.tensor(dist.token_ids, dtype=torch.long, device=device)] = torch.tensor(
        dist.probs, dtype=torch.float32, device=device
    )
    return out


def draft_distribution(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> SparseDist:
    """The edge's draft distribution: its sampling distribution cut to the top_k tokens, renormalised."""
    probs = sampling_probs(logits, temperature, top_p)
    k = max(1, min(top_k, int((probs > 0).sum())))
    top_probs, top_ids = torch.topk(probs, k)
    top_probs = top_probs / top_probs.sum()
    return SparseDist(tuple(int(i) for i in top_ids.tolist()), tuple(float(p) for p in top_probs.tolist()))


def sample_sparse(dist: SparseDist, generator: torch.Generator | None) -> int:
    index = int(torch.multinomial(torch.tensor(dist.probs), 1, generator=generator)[0])
    return dist.token_ids[index]


@dataclass(frozen=True)
class Verdict:
    accepted: int
    next_token: int


def greedy_verdict(best: Sequence[int], draft: Sequence[int]) -> Verdict:
    """The greedy rule on the verifier's choices: `best[i]` is its argmax after draft[:i]. A draft token is
    accepted while it is the verifier's own choice; the verifier's choice after the accepted ones comes next.
    The rule's definition, one call on the host: the server runs `greedy_verdicts`, which tests hold to it."""
    accepted = 0
    while accepted < len(draft) and best[accepted] == draft[accepted]:
        accepted += 1
    return Verdict(accepted, int(best[accepted]))


def greedy_verdicts(
    logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`greedy_verdict` for many rows at once, on the logits' device, with no transfer to the host.

    `logits` is [S, V], the rows' scored positions one row after the other; `segments` [S] says each
    position's row (0..rows-1, ascending) and `targets` [S] the draft token it predicts, -1 at a row's
    last position (the one after its draft, which predicts the bonus token). Returns per row the index
    `stop` of the position where the verdict's own token goes (the row's first position + accepted),
    that token, and [S] log-probabilities of the token chosen at each position (the draft's up to
    `stop`, the verifier's from there; only a row's positions up to its `stop` mean anything).
    """
    _, best = logits.max(dim=-1)
    index = torch.arange(logits.shape[0], device=logits.device)
    # A row stops at its first position whose target is not the verifier's choice (every row's last has none).
    stops_here = (targets < 0) | (best != targets)
    candidates = torch.where(stops_here, index, logits.shape[0])
    stop = torch.full((rows,), logits.shape[0], dtype=index.dtype, device=logits.device)
    stop = stop.scatter_reduce(0, segments, candidates, reduce="amin")
    # Up to its row's stop every position's token is the verifier's own choice (an accepted draft token is it),
    # so its log-probability is that of the maximum: log of its softmax share, which one softmax kernel gives
    # (on an H200 a logsumexp, a gather and a subtraction over 64 sessions' 535 x 49,152 logits cost 0.9 ms).
    logprobs = torch.softmax(logits, dim=-1).gather(-1, best[:, None])[:, 0].log()
    # (A row with no positions, a verdict graph's padding row, stops past the end: any token will do there.)
    return stop, best[stop.clamp(max=logits.shape[0] - 1)], logprobs


def sampling_probs_rows(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float]) -> torch.Tensor:
    """`sampling_probs` of every row of `logits` [S, V] at once, row i with its own temperature and top_p."""
    device = logits.device
    temperature = torch.tensor(temperatures, dtype=torch.float32, device=device)
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    cut = [i for i, p in enumerate(top_ps) if 0.0 < p < 1.0]  # rows without a nucleus keep every token
    if cut:
        rows = torch.tensor(cut, device=device)
        top_p = torch.tensor([top_ps[i] for i in cut], dtype=torch.float32, device=device)
        probs[rows] = _nucleus(probs[rows], top_p[:, None])
    return probs


def check_sampled(draft: Sequence[int], dists: Sequence[SparseDist]) -> list[float]:
    """Each draft token's probability under its own distribution; ValueError (before any draw) when a sampled
    draft cannot be judged."""
    if len(dists) != len(draft):
        raise ValueError(f"{len(draft)} draft tokens but {len(dists)} draft distributions")
    q = [dist.prob(token) for token, dist in zip(draft, dists, strict=True)]
    for i, q_x in enumerate(q):
        if q_x <= 0.0:
            raise ValueError(f"draft token {draft[i]} at position {i} has probability 0 under its own distribution")
    return q


def verify_sampled(
    logits: torch.Tensor,
    draft: Sequence[int],
    dists: Sequence[SparseDist],
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> Verdict:
    """The rejection rule that leaves the output distributed as the verifier's own sampler."""
    q = check_sampled(draft, dists)
    n = len(draft) + 1
    probs = sampling_probs_rows(logits[:n], [temperature] * n, [top_p] * n)
    p_draft = probs[torch.arange(len(draft), device=probs.device), torch.tensor(list(draft), dtype=torch.long,
                    device=probs.device)].tolist()  # fmt: skip
    return sampled_verdict(probs, p_draft, q, draft, dists, generator)


def sampled_verdict(
    probs: torch.Tensor,
    p_draft: Sequence[float],
    q_draft: Sequence[float],
    draft: Sequence[int],
    dists: Sequence[SparseDist],
    generator: torch.Generator | None,
) -> Verdict:
    """`verify_sampled` on the verifier's sampling distributions `probs` [len(draft)+1, V] (row i after
    draft[:i]), `p_draft[i]` being probs[i, draft[i]] and `q_draft[i]` the draft's own (`check_sampled`): draft
    token x is accepted with probability min(1, p(x)/q(x)); on rejection the token comes from the residual
    max(0, p - q), renormalised; after all of them, the bonus token from p."""
    vocab = probs.shape[-1]
    for i in range(len(draft)):
        ratio = p_draft[i] / q_draft[i]
        if ratio >= 1.0 or float(torch.rand((), generator=generator)) < ratio:
            continue
        p = probs[i]
        residual = torch.clamp(p - dense(dists[i], vocab, p.device), min=0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p == q up to rounding: any draw from p is right
            residual, total = p, 1.0
        token_next = int(torch.multinomial((residual / total).cpu(), 1, generator=generator)[0])
        return Verdict(i, token_next)
    p_bonus = probs[len(draft)]
    return Verdict(len(draft), int(torch.multinomial(p_bonus.cpu(), 1, generator=generator)[0]))
