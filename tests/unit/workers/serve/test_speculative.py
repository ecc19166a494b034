"""Speculative decoding math: the acceptance rule keeps the verifier's distribution."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.serve.speculative import (
    SparseDist,
    dense,
    draft_distribution,
    greedy_verdict,
    greedy_verdicts,
    sample_sparse,
    sampling_probs,
    verify_sampled,
)

pytestmark = pytest.mark.unit

VOCAB = 12


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit (cells with expected count < 5 pooled)."""
    from scipy.stats import chisquare

    n = int(counts.sum())
    if bool((counts[probs == 0] > 0).any()):
        return 0.0  # an outcome the distribution cannot produce
    expected = probs * n
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum().reshape(1)]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)]).double()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.fixture(scope="module")
def tiny_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits of a target and a different draft model (both tiny, 12-token vocabulary)."""
    context = torch.tensor([[1, 5, 7, 3]])
    target = random_llama(dict(TINY), vocab_size=VOCAB, init_std=0.3, seed=2)
    draft = random_llama(dict(TINY), vocab_size=VOCAB, init_std=0.3, seed=3)
    with torch.inference_mode():
        return target(context).logits[0, -1], draft(context).logits[0, -1]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_verification_preserves_the_target_distribution(tiny_logits: Any, top_p: float) -> None:
    target_logits, draft_logits = tiny_logits
    temperature = 1.0
    p = sampling_probs(target_logits, temperature, top_p)
    q = draft_distribution(draft_logits, temperature, 1.0, top_k=6)  # truncated on purpose
    assert not torch.allclose(p, dense(q, VOCAB), atol=0.05)  # the models disagree: the rule has work to do
    gen = torch.Generator().manual_seed(0)
    n = 20000
    spec = torch.zeros(VOCAB)
    naive = torch.zeros(VOCAB)
    # A one-token draft plus the bonus scores the first output token's distribution exactly.
    scores = torch.stack([target_logits, target_logits])
    for _ in range(n):
        x = sample_sparse(q, gen)
        verdict = verify_sampled(scores, [x], [q], temperature, top_p, gen)
        spec[x if verdict.accepted == 1 else verdict.next_token] += 1
        naive[x] += 1
    assert chi_square_p_value(spec, p) > 1e-3
    assert chi_square_p_value(naive, p) < 1e-6  # accepting drafts blindly would be detected


def test_greedy_verification() -> None:
    """`greedy_verdicts` (the server's rule, every row at once) on three calls packed one after the other: each
    row's verdict is `greedy_verdict`'s of that call alone, and its log-probabilities the chosen tokens'."""
    choices = [[3, 4, 9, 1], [3, 4, 9, 1], [3]]  # each row's argmax at each of its positions
    drafts = [[3, 4, 9], [3, 7, 9], []]  # all accepted, rejected at 1, none drafted
    logits = torch.full((sum(map(len, choices)), VOCAB), -5.0)
    for position, choice in enumerate(b for c in choices for b in c):
        logits[position, choice] = 5.0 + position  # a log-probability of its own at each position
    targets = torch.tensor([t for d in drafts for t in (*d, -1)])
    segments = torch.tensor([row for row, c in enumerate(choices) for _ in c])
    stop, token, logprobs = greedy_verdicts(logits, targets, segments, len(drafts))
    first = 0
    for row, (best, draft) in enumerate(zip(choices, drafts, strict=True)):
        verdict = greedy_verdict(best, draft)
        assert (int(stop[row]) - first, int(token[row])) == (verdict.accepted, verdict.next_token)
        chosen = [*draft[: verdict.accepted], verdict.next_token]
        scores = logits[first : first + len(chosen)]
        expected = torch.log_softmax(scores, dim=-1)[torch.arange(len(chosen)), torch.tensor(chosen)]
        assert torch.allclose(logprobs[first : first + len(chosen)], expected, atol=1e-5)
        first += len(best)
    assert [greedy_verdict(b, d).__dict__ for b, d in zip(choices, drafts, strict=True)] == [
        {"accepted": 3, "next_token": 1},
        {"accepted": 1, "next_token": 4},
        {"accepted": 0, "next_token": 3},
    ]


def test_sampled_verification_rejects_bad_input() -> None:
    logits = torch.zeros(2, VOCAB)
    with pytest.raises(ValueError, match="distributions"):
        verify_sampled(logits, [1], [], 1.0, 1.0, None)
    with pytest.raises(ValueError, match="probability 0"):
        verify_sampled(logits, [1], [SparseDist((2,), (1.0,))], 1.0, 1.0, None)
    # Token 1 is rejected for certain (the verifier gives it probability 0), token 2 could not have been drawn
    # from its own distribution: the draft is refused whole, before any draw, not judged up to its rejection.
    logits = torch.zeros(3, VOCAB)
    logits[0, 1] = -float("inf")
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError, match="draft token 2 at position 1 has probability 0"):
        verify_sampled(logits, [1, 2], [SparseDist((1,), (1.0,)), SparseDist((3,), (1.0,))], 1.0, 1.0, gen)
    assert torch.equal(gen.get_state(), state)
