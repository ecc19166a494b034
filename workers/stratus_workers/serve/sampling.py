"""Choosing tokens: the engine's sampling step, seeded generators and end-of-sequence ids."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.runner import Decoded
from stratus_workers.serve.speculative import sampling_probs
from stratus_workers.serve.surface import Alternatives


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (the same seed draws the same tokens), or from the clock."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else time.time_ns() & 0x7FFFFFFF)
    return generator


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends a sequence, from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class Choice(NamedTuple):
    """The sampling step's answer for a batch of rows."""

    tokens: list[int]
    logprobs: list[float] | None  # of each chosen token, under the model's own distribution; None if no row asked
    alternatives: list[Alternatives] | None  # per row, its top_logprobs most likely tokens; None if no row asked


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[Sampling],
    generators: Sequence[torch.Generator | None],
    decoded: Decoded | None = None,
    counts: Sequence[dict[int, int]] | None = None,
) -> Choice:
    """The engine's sampling step: each row's next token and, when any row asks, its log-probability and the
    most likely alternatives.

    `logits` is [rows, vocab]; `params[i]`, `generators[i]` and `counts[i]` (tokens generated so far, for
    the penalties) belong to row i. Penalties and logit bias change which token is chosen; the
    log-probabilities reported are the model's own. When every row is plain greedy and `decoded` (a
    decode step's own greedy choices) is given, those are the answer and the logits are not read at all,
    which keeps a greedy batch off the device's queue (the next step may already be running there).
    """
    want_logprobs = any(p.logprobs for p in params)
    want_top = max((p.top_logprobs for p in params if p.logprobs), default=0)
    if (
        decoded is not None
        and not want_top
        and all(p.greedy and not p.adjusts_logits for p in params)
        and (not want_logprobs or decoded.greedy_logprobs is not None)
    ):
        return Choice(decoded.greedy, decoded.greedy_logprobs if want_logprobs else None, None)
    scores = adjusted_logits(logits, params, counts)
    chosen = torch.argmax(scores, dim=-1)
    for i, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            probs = sampling_probs(scores[i], p.temperature, p.top_p)
            chosen[i] = torch.multinomial(probs.cpu(), 1, generator=generator)[0].to(logits.device)
    if not want_logprobs:
        return Choice(chosen.tolist(), None, None)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, chosen[:, None])[:, 0]
    # One device-to-host copy for both (ids are exact in float64).
    ids, lps = torch.stack((chosen.double(), picked.double())).tolist()
    alternatives = None
    if want_top:
        values, top_ids = (t.tolist() for t in torch.topk(logprobs, want_top, dim=-1))
        alternatives = [
            tuple(zip(top_ids[i][: p.top_logprobs], values[i][: p.top_logprobs], strict=True)) if p.logprobs else ()
            for i, p in enumerate(params)
        ]
    return Choice([int(t) for t in ids], lps, alternatives)


def adjusted_logits(
    logits: torch.Tensor, params: Sequence[Sampling], counts: Sequence[dict[int, int]] | None
) -> torch.Tensor:
    """`logits` with each row's logit bias and presence/frequency penalties applied (`logits` itself when no
    row has any), as OpenAI defines them: bias added, penalty = count * frequency + presence for every token
    generated so far."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    scores = logits.clone()
    for i in rows:
        p = params[i]
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=scores.device)
            bias = torch.tensor([b for _, b in p.logit_bias], dtype=scores.dtype, device=scores.device)
            scores[i].index_add_(0, ids, bias)
        seen = counts[i] if counts is not None else {}
        if seen and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(seen), device=scores.device)
            n = torch.tensor(list(seen.values()), dtype=scores.dtype, device=scores.device)
            scores[i].index_add_(0, ids, -(n * p.frequency_penalty + p.presence_penalty))
    return scores
