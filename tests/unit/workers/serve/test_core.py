"""The engine core step by step: a long prompt arriving mid-stream is prefilled a chunk per step while the
running rows keep decoding, prefixes come from the pool, and finished rows leave without disturbing the rest."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.core import PREFIX_BLOCK, EngineCore, EngineRequest, StepOutput
from stratus_workers.serve.prefix import PrefixCache
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.sessions import SpeculativeSessions

pytestmark = pytest.mark.unit

VOCAB = 512


@pytest.fixture(scope="module")
def model() -> Any:
    return random_llama(dict(TINY), vocab_size=VOCAB, init_std=0.2, seed=3)


def core_over(model: Any, *, batch: int = 3, chunk: int = 512, pool: int = 0, fast: bool = False) -> EngineCore:
    runner = build_runner(model, max_rows=batch + 1, max_len=256, pool_tokens=pool, fast=fast)
    eos: frozenset[int] = frozenset()  # a random model must not stop early: every answer runs to its length
    prefix = PrefixCache(PREFIX_BLOCK, pool // PREFIX_BLOCK) if pool else None
    sessions = SpeculativeSessions(runner, eos, first_row=batch)
    return EngineCore(
        runner, sessions, eos, max_batch_size=batch, prefill_chunk=chunk, prefix=prefix, verify_pipeline=False
    )


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def collect(tokens: dict[int, list[int]], out: StepOutput) -> StepOutput:
    for seq_id, token in zip(out.seq_ids, out.tokens, strict=True):
        tokens.setdefault(seq_id, []).append(token)
    return out


def run(core: EngineCore, tokens: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    tokens = {} if tokens is None else tokens
    while core.busy:
        collect(tokens, core.step())
    return tokens


@pytest.mark.parametrize("fast", [False, True])
def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(model: Any, fast: bool) -> None:
    core = core_over(model, chunk=16, fast=fast)
    short = [5, 6, 7]
    long_prompt = [(11 * i) % VOCAB for i in range(100)]
    core.add(EngineRequest(1, short, Sampling(max_new_tokens=30)))
    outputs: list[StepOutput] = [core.step(), core.step()]  # the short one decodes
    core.add(EngineRequest(2, long_prompt, Sampling(max_new_tokens=5)))
    while core.busy:
        outputs.append(core.step())
    first_of_long = next(i for i, out in enumerate(outputs) if 2 in out.seq_ids)
    # ceil(100 / 16) = 7 steps of prefill, each of which also gave the short request its token.
    assert first_of_long == 2 + 6
    for out in outputs[2:first_of_long]:
        assert out.seq_ids == [1]
    tokens: dict[int, list[int]] = {}
    for out in outputs:
        for seq_id, token in zip(out.seq_ids, out.tokens, strict=True):
            tokens.setdefault(seq_id, []).append(token)
    assert tokens[1] == greedy(model, short, 30)
    assert tokens[2] == greedy(model, long_prompt, 5)
    assert core.stats().prefill_tokens == len(short) + len(long_prompt)


@pytest.mark.parametrize("fast", [False, True])
def test_prefixes_come_from_the_pool_and_answers_stay_the_same(model: Any, fast: bool) -> None:
    system = [(7 * i + 3) % VOCAB for i in range(40)]
    prompts = [system + [100 + i, 200 + i, 300 + i] for i in range(5)]
    core = core_over(model, batch=2, chunk=8, pool=256, fast=fast)
    core.add(EngineRequest(0, prompts[0], Sampling(max_new_tokens=6)))
    first = run(core)
    for i, prompt in enumerate(prompts[1:], start=1):
        core.add(EngineRequest(i, prompt, Sampling(max_new_tokens=6)))
    rest = run(core)
    assert core.prefix is not None
    assert core.prefix.stats.hit_tokens == 4 * (len(system) // PREFIX_BLOCK * PREFIX_BLOCK)
    for i, prompt in enumerate(prompts):
        assert (first if i == 0 else rest)[i] == greedy(model, prompt, 6)


def test_rows_leave_from_both_regions_and_the_rest_carry_on(model: Any) -> None:
    # Decoding rows finish while a long prompt is still prefilling behind them, a waiting request takes
    # a freed row, and a cancelled row leaves with the batch empty afterwards.
    core = core_over(model, batch=3, chunk=4)
    prompts = {1: [1, 2, 3], 2: [4, 5, 6], 3: [(3 * i) % VOCAB for i in range(30)]}
    core.add(EngineRequest(1, prompts[1], Sampling(max_new_tokens=2)))
    core.add(EngineRequest(2, prompts[2], Sampling(max_new_tokens=12)))
    tokens: dict[int, list[int]] = {}
    collect(tokens, core.step())  # a 4-token budget: the first prompt and one token of the second
    core.add(EngineRequest(3, prompts[3], Sampling(max_new_tokens=4)))
    core.add(EngineRequest(4, prompts[3], Sampling(max_new_tokens=4)))  # waits: three rows are taken
    run(core, tokens)
    assert tokens[1] == greedy(model, prompts[1], 2)
    assert tokens[2] == greedy(model, prompts[2], 12)
    assert tokens[3] == tokens[4] == greedy(model, prompts[3], 4)
    core.add(EngineRequest(5, prompts[3], Sampling(max_new_tokens=50)))
    core.step()
    core.abort(5)
    out = core.step()
    assert [(f.seq_id, f.reason) for f in out.finished] == [(5, "cancelled")]
    assert not core.busy and core.runner.lengths[:3] == [0, 0, 0]


def test_rows_join_a_decode_step_launched_ahead_with_first_tokens_taken_on_the_device(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA's order: the prefill, then the next decode step queued right behind it with the new rows'
    # greedy first tokens copied on the device, and only then the host reads those tokens.
    monkeypatch.setenv("STRATUS_DECODE_AHEAD", "1")
    monkeypatch.setenv("STRATUS_MIXED_STEP", "0")  # a mixed step takes the decode rows' and new rows' tokens at once
    requests = [
        ([(7 * i + j) % VOCAB for j in range(3 + 11 * i)], Sampling(max_new_tokens=10 + 2 * i)) for i in range(8)
    ]
    outputs = []
    for device_join in (True, False):
        core = core_over(model, batch=4, chunk=20, fast=True)
        core.runner.device_join = device_join  # type: ignore[attr-defined]
        tokens: dict[int, list[int]] = {}
        pending = list(enumerate(requests))
        step = 0
        with torch.inference_mode():
            while pending or core.busy:
                if pending and step % 2 == 0:  # arrivals two steps apart: rows join a running batch
                    seq_id, (prompt, params) = pending.pop(0)
                    core.add(EngineRequest(seq_id, prompt, params))
                collect(tokens, core.step())
                step += 1
        decoder = core.runner.decoder  # type: ignore[attr-defined]
        assert (decoder.device_joins > 0) == device_join and decoder.ahead_hits > 0
        outputs.append(tokens)
    assert outputs[0] == outputs[1]
    expected = {i: greedy(model, prompt, params.max_new_tokens) for i, (prompt, params) in enumerate(requests)}
    assert outputs[0] == expected
