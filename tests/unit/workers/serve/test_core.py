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
def test_first_tokens_go_out_ahead_of_their_step_and_answers_stay_the_same(model: Any, fast: bool) -> None:
    # Requests joining rows that decode: the step hands each new request's first token to `on_part` as soon as it
    # is chosen, before the decoding rows' tokens, and its own output does not repeat it; every answer is the one
    # of a core that sends everything with the step's output.
    prompts = {i: [(7 * i + 3 * j) % VOCAB for j in range(5 + 9 * i)] for i in range(1, 6)}

    def drive(core: EngineCore, parts: bool) -> tuple[dict[int, list[int]], list[tuple[str, StepOutput]]]:
        tokens: dict[int, list[int]] = {}
        sent: list[tuple[str, StepOutput]] = []
        if parts:
            core.on_part = lambda part: sent.append(("part", collect(tokens, part)))
        for seq_id, prompt in prompts.items():
            core.add(EngineRequest(seq_id, prompt, Sampling(max_new_tokens=8)))
            sent.append(("step", collect(tokens, core.step())))
            sent.append(("step", collect(tokens, core.step())))
        while core.busy:
            sent.append(("step", collect(tokens, core.step())))
        return tokens, sent

    reference, _ = drive(core_over(model, chunk=16, fast=fast), parts=False)
    tokens, sent = drive(core_over(model, chunk=16, fast=fast), parts=True)
    assert tokens == reference
    assert all(tokens[i] == greedy(model, prompt, 8) for i, prompt in prompts.items())
    seen: set[int] = set()
    ahead = 0
    for n, (kind, out) in enumerate(sent):
        if kind == "part":  # first tokens only, and the step they came from still to come
            assert out.seq_ids and not seen.intersection(out.seq_ids)
            assert sent[n + 1][0] in ("part", "step") and not set(out.seq_ids) & set(sent[n + 1][1].seq_ids)
            ahead += bool(sent[n + 1][1].seq_ids)  # the step's own output: the decoding rows' tokens
        seen.update(out.seq_ids)
    assert ahead >= 3


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


def first_token_steps(core: EngineCore, arrivals: dict[int, tuple[int, list[int], int]]) -> dict[int, int]:
    """Run `core`, adding request i before step arrivals[i][0]; the step each request's first token came in, and
    the tokens in `core.tokens` (a test attribute)."""
    tokens: dict[int, list[int]] = {}
    first: dict[int, int] = {}
    step = 0
    with torch.inference_mode():
        while step <= max(a for a, _, _ in arrivals.values()) or core.busy:
            for seq_id, (at, prompt, n) in arrivals.items():
                if at == step:
                    core.add(EngineRequest(seq_id, prompt, Sampling(max_new_tokens=n)))
            out = collect(tokens, core.step())
            for seq_id in out.seq_ids:
                first.setdefault(seq_id, step)
            step += 1
    core.tokens = tokens  # type: ignore[attr-defined]
    return first


def test_arrivals_held_a_few_steps_share_a_prefill_and_answers_stay_the_same(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One long answer decodes while an arrival comes every other step: with a hold of 3 steps and groups of 3,
    # arrivals wait for company (at most 3 steps), prefill together, and every answer is the greedy one.
    monkeypatch.setenv("STRATUS_DECODE_AHEAD", "1")
    monkeypatch.setenv("STRATUS_MIXED_STEP", "0")
    arrivals = {0: (0, [1, 2, 3], 40)}
    arrivals |= {i: (2 * i, [(5 * i + j) % VOCAB for j in range(2 + i)], 4) for i in range(1, 9)}
    runs = {}
    for hold in (0, 3):
        core = core_over(model, batch=6, fast=True)
        core.prefill_hold, core.prefill_group = hold, 3
        first = first_token_steps(core, arrivals)
        runs[hold] = (core, first)
        expected = {i: greedy(model, prompt, n) for i, (_, prompt, n) in arrivals.items()}
        assert core.tokens == expected  # type: ignore[attr-defined]
        assert core.runner.decoder.ahead_hits > 0  # type: ignore[attr-defined]
    (plain, at_once), (held, waited) = runs[0], runs[3]
    # Without a hold every arrival is prefilled in the step it arrives before: one prefill step each.
    assert all(at_once[i] == arrivals[i][0] for i in arrivals)
    assert plain.prefill_steps == len(arrivals)
    # With it, none waits 3 steps or more, some waited, and fewer steps prefilled.
    delays = [waited[i] - arrivals[i][0] for i in arrivals]
    assert max(delays) <= 3 and any(delays) and delays[0] == 0  # the first: nothing was decoding yet
    assert held.prefill_steps < plain.prefill_steps


def test_the_hold_ends_when_the_group_is_full_the_batch_idles_or_the_steps_are_up(model: Any) -> None:
    core = core_over(model, batch=4)
    core.prefill_hold, core.prefill_group = 5, 2
    core.add(EngineRequest(0, [1, 2, 3], Sampling(max_new_tokens=30)))
    assert core.step().seq_ids == [0]  # nothing was decoding: no hold
    core.add(EngineRequest(1, [4, 5], Sampling(max_new_tokens=3)))
    assert core.step().seq_ids == [0] and core.waiting == 1  # held: one of a group of two
    core.add(EngineRequest(2, [6, 7], Sampling(max_new_tokens=3)))
    assert sorted(core.step().seq_ids) == [0, 1, 2] and core.waiting == 0  # the group is full: both at once
    core.add(EngineRequest(3, [8, 9], Sampling(max_new_tokens=3)))
    steps = 0
    while 3 not in core.step().seq_ids:
        steps += 1
    assert steps == 5  # alone: held for the hold's 5 steps, then prefilled
    core.add(EngineRequest(4, [8, 9], Sampling(max_new_tokens=3)))
    core.step()
    core.abort(4)  # a held request that is cancelled leaves at the next step
    assert (4, "cancelled") in [(f.seq_id, f.reason) for f in core.step().finished]


def test_prefill_grouping_comes_from_the_environment_and_refuses_nonsense(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stratus_workers.serve.core import PREFILL_GROUP, prefill_grouping

    assert prefill_grouping(2) == (2, PREFILL_GROUP)
    monkeypatch.setenv("STRATUS_PREFILL_HOLD", "0")
    monkeypatch.setenv("STRATUS_PREFILL_GROUP", "8")
    assert prefill_grouping(2) == (0, 8)
    monkeypatch.setenv("STRATUS_PREFILL_HOLD", "-1")
    with pytest.raises(ValueError, match="STRATUS_PREFILL_HOLD"):
        prefill_grouping(2)
    runner = build_runner(model, max_rows=3, max_len=64)
    sessions = SpeculativeSessions(runner, frozenset(), first_row=2)
    with pytest.raises(ValueError, match="prefill_group at least 1, got 0 and 0"):
        EngineCore(runner, sessions, frozenset(), max_batch_size=2, prefill_hold=0, prefill_group=0)
