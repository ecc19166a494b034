"""Choosing tokens: the engine's sampling step, seeded generators and end-of-sequence ids."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.runner import Decoded
from stratus_workers.serve.speculative import sampling_probs


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


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[Sampling],
    generators: Sequence[torch.Generator | None],
    decoded: Decoded | None = None,
) -> tuple[list[int], list[float] | None]:
    """The engine's sampling step: each row's next token and, when any row asks, its log-probability.

    `logits` is [rows, vocab]; `params[i]` and `generators[i]` belong to row i. When every row is
    plain greedy and `decoded` (a decode step's own greedy choices) is given, those are the answer
    and the logits are not read at all, which keeps a greedy batch off the device's queue (the next
    step may already be running there). Any other row is chosen here from its logits.
    """
    want_logprobs = any(p.logprobs for p in params)
    if (
        decoded is not None
        and all(p.greedy for p in params)
        and (not want_logprobs or decoded.greedy_logprobs is not None)
    ):
        return decoded.greedy, decoded.greedy_logprobs if want_logprobs else None
    chosen = torch.argmax(logits, dim=-1)
    for i, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            probs = sampling_probs(logits[i], p.temperature, p.top_p)
            chosen[i] = torch.multinomial(probs.cpu(), 1, generator=generator)[0].to(logits.device)
    if not want_logprobs:
        return chosen.tolist(), None
    picked = logits.gather(1, chosen[:, None])[:, 0].float() - torch.logsumexp(logits.float(), dim=-1)
    # One device-to-host copy for both (ids are exact in float64).
    ids, lps = torch.stack((chosen.double(), picked.double())).tolist()
    return [int(t) for t in ids], lps
