"""A Verify call's verdict by definition (a plain forward pass of the model, the greedy rule), for the tests of the
batched verification to compare against."""

from __future__ import annotations

from typing import Any

import torch

from stratus_workers.serve.sessions import VerifyCall, VerifyResult
from stratus_workers.serve.speculative import greedy_verdict


def own_tokens(model: Any, context: list[int], n: int) -> list[int]:
    """The model's greedy continuation of `context` (a plain forward pass per token)."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(torch.tensor([[*context, *out]])).logits[0, -1].argmax()))
    return out


def reference(model: Any, call: VerifyCall, eos: frozenset[int]) -> VerifyResult:
    """The call's verdict by definition: one plain forward pass over context + draft, the greedy rule on its
    choices, the chosen tokens' log-softmax."""
    context, draft = list(call.context), list(call.draft)
    with torch.inference_mode():
        logits = model(torch.tensor([[*context, *draft]])).logits[0, len(context) - 1 :].float()
    verdict = greedy_verdict(logits.argmax(dim=-1).tolist(), draft)
    chosen = [*draft[: verdict.accepted], verdict.next_token]
    logprobs = torch.log_softmax(logits[: len(chosen)], dim=-1)[torch.arange(len(chosen)), torch.tensor(chosen)]
    ends = verdict.next_token in eos or any(t in eos for t in draft[: verdict.accepted])
    return VerifyResult(verdict.accepted, verdict.next_token, tuple(logprobs.tolist()), ends)
