"""The engine's answer options: penalties, logit bias, alternatives per position and the prompt's own
log-probabilities, each against a reference computed with the model directly, and neutral values that change
nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from stratus_workers.models import load_model
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.engine import AsyncEngine as Engine
from stratus_workers.serve.engine import build_engine
from stratus_workers.serve.sampling import eos_ids
from stratus_workers.serve.surface import FinishEvent, TokenEvent, TokenLogprob

pytestmark = pytest.mark.unit

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time in a land far away there lived", "1 2 3 4"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture
async def engine(loaded: Any) -> Any:
    engine = build_engine(loaded.model, loaded.tokenizer, max_len=256, max_batch_size=4)
    await engine.start()
    yield engine
    await engine.stop()


async def answer(engine: Engine, prompt: list[int], params: Sampling) -> tuple[list[int], list[TokenLogprob]]:
    ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    async for event in engine.stream(prompt, params):
        if isinstance(event, TokenEvent):
            ids.extend(event.token_ids)
            logprobs.extend(event.logprobs)
        else:
            assert isinstance(event, FinishEvent) and event.reason in ("stop", "length")
            return ids, logprobs
    raise AssertionError("no finish event")


def reference(loaded: Any, prompt: list[int], params: Sampling, eos: frozenset[int]) -> list[int]:
    """Greedy decoding one token at a time with the model itself, penalties and bias applied as OpenAI says."""
    ids, out, counts = list(prompt), [], {}
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            logits = loaded.model(torch.tensor([ids])).logits[0, -1].clone()
            for token, bias in params.logit_bias:
                logits[token] += bias
            for token, count in counts.items():
                logits[token] -= count * params.frequency_penalty + params.presence_penalty
            token = int(torch.argmax(logits))
            if token in eos:
                break
            out.append(token)
            counts[token] = counts.get(token, 0) + 1
            ids.append(token)
    return out


async def test_neutral_options_change_nothing(loaded: Any, engine: Engine) -> None:
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    plain = Sampling(max_new_tokens=10, logprobs=True)
    neutral = Sampling(max_new_tokens=10, logprobs=True, presence_penalty=0.0, frequency_penalty=0.0, top_logprobs=0)
    with_alternatives = Sampling(max_new_tokens=10, logprobs=True, top_logprobs=5)
    expected = [await answer(engine, p, plain) for p in prompts]
    for params in (neutral, with_alternatives):
        got = await asyncio.gather(*(answer(engine, p, params) for p in prompts))
        for (ids, lps), (want_ids, want_lps) in zip(got, expected, strict=True):
            assert ids == want_ids
            # Batched and alone, the same logits up to float rounding.
            assert [lp.logprob for lp in lps] == pytest.approx([lp.logprob for lp in want_lps], abs=1e-4)


async def test_penalties_and_bias_match_the_reference_and_stay_in_their_row(loaded: Any, engine: Engine) -> None:
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    options = [
        Sampling(max_new_tokens=12, presence_penalty=2.0),
        Sampling(max_new_tokens=12, frequency_penalty=0.05, presence_penalty=0.02),
        Sampling(max_new_tokens=12, logit_bias=((42, 100.0),)),
        Sampling(max_new_tokens=12),  # a plain row beside them
    ]
    got = await asyncio.gather(*(answer(engine, p, o) for p, o in zip(prompts, options, strict=True)))
    eos = eos_ids(loaded.model, loaded.tokenizer)
    for prompt, params, (ids, _) in zip(prompts, options, got, strict=True):
        assert ids == reference(loaded, prompt, params, eos), params
    assert len(set(got[0][0])) == len(got[0][0])  # no token twice under a presence penalty of 2
    assert got[2][0] == [42] * 12


async def test_logprobs_are_the_models_own_and_alternatives_are_its_most_likely(loaded: Any, engine: Engine) -> None:
    prompt = loaded.tokenizer.encode(PROMPTS[0])
    ids, lps = await answer(engine, prompt, Sampling(max_new_tokens=6, logprobs=True, top_logprobs=4))
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits, dim=-1)
    for position, (token, lp) in enumerate(zip(ids, lps, strict=True)):
        assert lp.token_id == token and lp.logprob == pytest.approx(float(expected[position, token]), abs=1e-4)
        top_values, top_ids = torch.topk(expected[position], 4)
        assert [t.token_id for t in lp.top] == top_ids.tolist()
        assert [t.logprob for t in lp.top] == pytest.approx(top_values.tolist(), abs=1e-4)
        assert lp.top[0].token_id == token  # greedy
    # A banned token keeps its place among the alternatives: they report the model, not the bias.
    banned = lps[0].token_id
    _, biased = await answer(
        engine, prompt, Sampling(max_new_tokens=1, logprobs=True, top_logprobs=2, logit_bias=((banned, -100.0),))
    )
    assert biased[0].token_id != banned and biased[0].top[0].token_id == banned


async def test_prompt_logprobs_are_scores_of_the_prompt(loaded: Any, engine: Engine) -> None:
    prompt = loaded.tokenizer.encode(PROMPTS[2])
    echoed = await engine.prompt_logprobs(prompt, top=3)
    assert [e.token_id for e in echoed] == prompt and echoed[0].logprob == 0.0 and echoed[0].top == ()
    assert [e.logprob for e in echoed[1:]] == pytest.approx(list(await engine.score(prompt[:1], prompt[1:])))
    with torch.inference_mode():
        expected = torch.log_softmax(loaded.model(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    for position, entry in enumerate(echoed[1:]):
        assert entry.logprob == pytest.approx(float(expected[position, prompt[position + 1]]), abs=1e-4)
        assert [t.token_id for t in entry.top] == torch.topk(expected[position], 3).indices.tolist()
    assert engine.stats.sessions == 0  # the scoring row is free again


async def test_a_bias_outside_the_vocabulary_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        await engine.stream([1, 2], Sampling(max_new_tokens=1, logit_bias=((engine.vocab_size, 1.0),))).__anext__()
