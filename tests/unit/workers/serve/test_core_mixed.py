"""Mixed steps: a step's decode rows and prefill chunks in one pass give the tokens of separate passes, whatever
arrives when, with decode-ahead, the prefix cache, sampled rows, log-probabilities, logit bias and cancellations."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.core import MIX_MAX_KEYS, PREFIX_BLOCK, EngineCore, EngineRequest
from stratus_workers.serve.prefix import PrefixCache
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import PACKED_BUCKETS, FusedRunner
from stratus_workers.serve.sessions import SpeculativeSessions

pytestmark = pytest.mark.unit

VOCAB = 512
EOS = frozenset({7})
SYSTEM = [(13 * i + 5) % VOCAB for i in range(48)]


@pytest.fixture(scope="module")
def model() -> Any:
    return random_llama(dict(TINY), vocab_size=VOCAB, init_std=0.2, seed=11)


@dataclass(frozen=True)
class Arrival:
    step: int
    prompt: list[int]
    params: Sampling
    cancel_after: int | None  # aborted once it has this many tokens


@dataclass
class Served:
    tokens: dict[int, list[int]]
    logprobs: dict[int, list[float]]
    reasons: dict[int, str]
    core: EngineCore


def core_over(
    model: Any, *, mixed: bool, ahead: bool, batch: int = 4, chunk: int = 16, pool: int = 0, max_len: int = 160
) -> EngineCore:
    env = {"STRATUS_MIXED_STEP": "1" if mixed else "0", "STRATUS_DECODE_AHEAD": "1" if ahead else "0"}
    with mock.patch.dict(os.environ, env):
        runner = build_runner(model, max_rows=batch + 1, max_len=max_len, pool_tokens=pool, fast=True)
    assert isinstance(runner, FusedRunner) and runner.mixed_step == mixed and runner.decoder.decode_ahead == ahead
    prefix = PrefixCache(PREFIX_BLOCK, pool // PREFIX_BLOCK) if pool else None
    sessions = SpeculativeSessions(runner, EOS, first_row=batch)
    return EngineCore(runner, sessions, EOS, max_batch_size=batch, prefill_chunk=chunk, prefix=prefix)


def serve(core: EngineCore, arrivals: list[Arrival]) -> Served:
    served = Served({}, {}, {}, core)
    pending = sorted(enumerate(arrivals), key=lambda a: a[1].step)
    aborted: set[int] = set()
    step = 0
    with torch.inference_mode():
        while pending or core.busy:
            while pending and pending[0][1].step <= step:
                seq_id, arrival = pending.pop(0)
                core.add(EngineRequest(seq_id, arrival.prompt, arrival.params))
            out = core.step()
            for i, (seq_id, token) in enumerate(zip(out.seq_ids, out.tokens, strict=True)):
                served.tokens.setdefault(seq_id, []).append(token)
                if arrivals[seq_id].params.logprobs:
                    assert out.logprobs is not None
                    served.logprobs.setdefault(seq_id, []).append(out.logprobs[i])
            for finished in out.finished:
                served.reasons[finished.seq_id] = finished.reason
            for seq_id, arrival in enumerate(arrivals):
                got = len(served.tokens.get(seq_id, ()))
                if arrival.cancel_after is not None and got >= arrival.cancel_after and seq_id not in aborted:
                    core.abort(seq_id)
                    aborted.add(seq_id)
            step += 1
    return served


def assert_same(mixed: Served, plain: Served, arrivals: list[Arrival], *, same_steps: bool) -> None:
    """The mixed run's answers are the plain run's; where a step of the mixed run gave a decoding row two tokens
    (decode-ahead) a cancellation lands a token or so later, so a cancelled answer is then a prefix of the other."""
    for seq_id, arrival in enumerate(arrivals):
        a, b = mixed.tokens.get(seq_id, []), plain.tokens.get(seq_id, [])
        if arrival.cancel_after is None or same_steps:
            assert a == b, seq_id
            assert mixed.reasons[seq_id] == plain.reasons[seq_id]
        else:
            shorter = min(len(a), len(b))
            assert a[:shorter] == b[:shorter], seq_id
        if arrival.params.logprobs:
            n = min(len(mixed.logprobs.get(seq_id, [])), len(plain.logprobs.get(seq_id, [])))
            assert mixed.logprobs.get(seq_id, [])[:n] == pytest.approx(plain.logprobs.get(seq_id, [])[:n], abs=1e-4)


@st.composite
def workloads(draw: st.DrawFn) -> list[Arrival]:
    arrivals = []
    for i in range(draw(st.integers(3, 8))):
        shared = draw(st.sampled_from([0, 0, 16, 33, 48]))  # a system prompt's start: the prefix cache's hits
        own = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40))
        kind = draw(st.sampled_from(["greedy", "greedy", "greedy", "sampled", "logprobs", "bias"]))
        params = Sampling(
            max_new_tokens=draw(st.integers(1, 14)),
            temperature=0.8 if kind == "sampled" else 0.0,
            seed=100 + i if kind == "sampled" else None,
            logprobs=kind == "logprobs",
            top_logprobs=2 if kind == "logprobs" else 0,
            logit_bias=((3, 4.0), (40, -2.0)) if kind == "bias" else (),
            frequency_penalty=0.5 if kind == "bias" else 0.0,
        )
        cancel = draw(st.none() | st.none() | st.integers(1, 8))
        arrivals.append(Arrival(draw(st.integers(0, 14)), SYSTEM[:shared] + own, params, cancel))
    return arrivals


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arrivals=workloads(),
    ahead=st.booleans(),
    pool=st.sampled_from([0, 512]),
    chunk=st.sampled_from([5, 16, 64]),
    batch=st.sampled_from([2, 4]),
)
def test_mixed_steps_give_the_tokens_of_separate_passes(
    model: Any, arrivals: list[Arrival], ahead: bool, pool: int, chunk: int, batch: int
) -> None:
    runs = [
        serve(core_over(model, mixed=mixed, ahead=ahead, batch=batch, chunk=chunk, pool=pool), arrivals)
        for mixed in (True, False)
    ]
    # Without decode-ahead a mixed step hands out exactly the tokens the separate passes do, step by step.
    assert_same(*runs, arrivals, same_steps=not ahead)
    assert runs[1].core.stats().mixed_steps == 0
    runner = runs[0].core.runner
    assert isinstance(runner, FusedRunner) and runner.mixed_steps == runs[0].core.stats().mixed_steps
    assert runner.mixed_step  # no pass failed and turned it off
    assert not runs[0].core.busy and runner.lengths[:batch] == [0] * batch


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("ahead", [False, True])
def test_rows_arriving_while_others_decode_are_prefilled_in_the_decode_pass(model: Any, ahead: bool) -> None:
    # Arrivals every third step into a running batch: each prefill shares its pass with the decoding rows, and
    # the answers are Hugging Face's greedy ones. With decode-ahead the step launched ahead is taken first and the
    # step after a mixed pass is started at once with the tokens it chose (`prime`).
    arrivals = [Arrival(3 * i, [(7 * i + j) % VOCAB for j in range(3 + 9 * i)], Sampling(max_new_tokens=9 + i), None)
                for i in range(7)]  # fmt: skip
    core = core_over(model, mixed=True, ahead=ahead, chunk=24)
    core.eos = frozenset()  # every answer runs to its length, as generate()'s does
    served = serve(core, arrivals)
    for seq_id, arrival in enumerate(arrivals):
        assert served.tokens[seq_id] == greedy(model, arrival.prompt, arrival.params.max_new_tokens)
    runner = core.runner
    assert isinstance(runner, FusedRunner)
    assert core.stats().mixed_steps >= 5 and runner.mixed_steps == core.stats().mixed_steps
    if ahead:  # prefills arriving while a step launched ahead runs: the mixed pass is fed its choices on the device
        assert runner.decoder.primed > 0 and runner.decoder.ahead_hits > 0 and core.mixed_on_device > 0
        assert core.primed_on_device > 0  # and the decode step after it queued behind it, fed its argmax
        # whose copy on the host the step read its tokens from, not from the logits (which would wait for that step)
        assert runner.decoder.primed_reads > 0
    else:
        assert core.mixed_on_device == core.primed_on_device == 0


@pytest.mark.parametrize("seed", range(4))
def test_a_busy_random_mix_gives_the_same_answers_mixed_or_not(model: Any, seed: int) -> None:
    # Larger than hypothesis's shrunk examples: 24 requests over ~40 steps into 4 rows, half of them sharing a
    # system prompt (prefix cache on), decode-ahead on in odd seeds.
    rng = random.Random(seed)
    kinds = ["greedy"] * 5 + ["sampled", "logprobs", "bias"]
    arrivals = []
    for _ in range(24):
        kind = rng.choice(kinds)
        params = Sampling(
            max_new_tokens=rng.randint(1, 20),
            temperature=0.9 if kind == "sampled" else 0.0,
            seed=rng.randint(0, 1000) if kind == "sampled" else None,
            logprobs=kind == "logprobs",
            logit_bias=((5, 3.0),) if kind == "bias" else (),
            presence_penalty=0.3 if kind == "bias" else 0.0,
        )
        prompt = SYSTEM[: rng.choice([0, 20, 48])] + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 50))]
        cancel = rng.randint(1, 10) if rng.random() < 0.15 else None
        arrivals.append(Arrival(rng.randint(0, 40), prompt, params, cancel))
    ahead = seed % 2 == 1
    chunk = rng.choice([8, 32])
    mixed, plain = (
        serve(core_over(model, mixed=m, ahead=ahead, chunk=chunk, pool=1024), arrivals) for m in (True, False)
    )
    assert_same(mixed, plain, arrivals, same_steps=not ahead)
    assert mixed.core.stats().mixed_steps >= 5 and plain.core.stats().mixed_steps == 0
    assert mixed.core.stats().prefix_hit_tokens > 0
    if not ahead:
        assert mixed.core.mixed_on_device == 0  # nothing is ever in flight


def test_a_mixed_step_that_fails_leaves_nothing_to_run_on_later_rows(model: Any) -> None:
    # A mixed step's decode fails (a simulated out-of-memory as the cache grows for it) after it was told to launch
    # nothing ahead and to run the mixed pass behind its step. The engine fails that step's requests; a later
    # request's decode steps run no leftover pass on its row: its answer is Hugging Face's greedy one.
    core = core_over(model, mixed=True, ahead=True, chunk=24)
    core.eos = frozenset()
    runner = core.runner
    assert isinstance(runner, FusedRunner)

    def out_of_memory(kv_len: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with torch.inference_mode():
        core.add(EngineRequest(0, [3, 1, 4, 1, 5], Sampling(max_new_tokens=20)))
        while not runner.ahead_in_flight():
            core.step()
        core.add(EngineRequest(1, [9, 2, 6, 5, 3, 5], Sampling(max_new_tokens=4)))  # mixed into the next step
        with mock.patch.object(runner.cache, "grow", side_effect=out_of_memory):
            out = core.step()
        assert {f.seq_id: f.reason for f in out.finished} == {0: "error", 1: "error"}
        prompt = [8, 6, 7, 5, 3, 0, 9]
        core.add(EngineRequest(2, prompt, Sampling(max_new_tokens=8)))
        tokens: list[int] = []
        while core.busy:
            out = core.step()
            tokens += out.tokens
            assert not any(f.reason == "error" for f in out.finished)
    assert tokens == greedy(model, prompt, 8)
    assert runner.mixed_steps == core.stats().mixed_steps == 0


@pytest.mark.parametrize("ahead", [False, True])
def test_a_mixed_pass_that_fails_runs_apart_and_is_not_counted(model: Any, ahead: bool) -> None:
    # The first mixed pass fails (a simulated kernel failure): its rows run apart (forward_rows), mixing turns off,
    # the answers are Hugging Face's greedy ones, and no step is counted as mixed, by the engine or the runner.
    core = core_over(model, mixed=True, ahead=ahead, chunk=24)
    core.eos = frozenset()
    runner = core.runner
    assert isinstance(runner, FusedRunner)
    packed = runner._packed
    failed: list[bool] = []  # whether the failed pass was fed the step in flight's choices on the device

    def fails_once_mixed(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device_ids" in kwargs and not failed:  # only forward_mixed passes the decode step's device ids
            failed.append(kwargs["device_ids"] is not None)
            raise RuntimeError("kernel failed (simulated)")
        return packed(*args, **kwargs)

    arrivals = [Arrival(3 * i, [(5 * i + j) % VOCAB for j in range(4 + 7 * i)], Sampling(max_new_tokens=8), None)
                for i in range(4)]  # fmt: skip
    with mock.patch.object(runner, "_packed", side_effect=fails_once_mixed):
        served = serve(core, arrivals)
    assert failed == [ahead] and not runner.mixed_step
    for seq_id, arrival in enumerate(arrivals):
        assert served.tokens[seq_id] == greedy(model, arrival.prompt, arrival.params.max_new_tokens)
    assert runner.mixed_steps == core.stats().mixed_steps == core.mixed_on_device == 0


@pytest.mark.parametrize("stagger", [2, 3, 6])
@pytest.mark.parametrize("buckets", [False, True])
def test_rows_in_their_last_steps_keep_the_mixed_pass_on_the_device(model: Any, stagger: int, buckets: bool) -> None:
    # Every answer runs to the runner's whole context (prompt + new tokens = max_len: what a server sees when a
    # request asks for all it allows), arrivals land while rows take their last steps, and each mixed step with a
    # decode step in flight still feeds the pass that step's choices on the device and primes the step after it:
    # the pass's key and the primed step's past a finishing row's end go to the cache's spare slots, not off its
    # end (on the CPU an index past the cache raises, and the engine would fail those requests), and such a row
    # is not cut a token short. With `buckets`, passes are padded to the token counts CUDA graphs are captured for
    # (as on a GPU): the padding goes where rows have room, so every pass keeps its bucket (none runs eagerly).
    # Answers are Hugging Face's greedy ones.
    core = core_over(model, mixed=True, ahead=True, chunk=160)  # a whole prompt a step
    core.eos = frozenset()
    runner = core.runner
    assert isinstance(runner, FusedRunner)
    new = 12
    arrivals = [Arrival(stagger * i, [(11 * i + j) % VOCAB for j in range(runner.max_len - new - i % 3)],
                        Sampling(max_new_tokens=new + i % 3), None) for i in range(10)]  # fmt: skip
    assert all(len(a.prompt) + a.params.max_new_tokens == runner.max_len for a in arrivals)
    in_flight: list[bool] = []
    sizes: list[int] = []
    mixed, body = core._mixed, runner._packed_body

    def watched() -> Any:
        in_flight.append(runner.ahead_in_flight())
        return mixed()

    def sized(ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes.append(ids.shape[0])
        return body(ids, *args, **kwargs)

    def bucket(total: int) -> int:  # FusedRunner._packed_bucket's rule where graphs run
        return next((b for b in PACKED_BUCKETS if b >= total), 0)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(core, "_mixed", side_effect=watched))
        if buckets:
            stack.enter_context(mock.patch.object(runner, "_packed_bucket", side_effect=bucket))
            stack.enter_context(mock.patch.object(runner, "_packed_body", side_effect=sized))
        served = serve(core, arrivals)
    assert set(served.reasons.values()) == {"length"}
    for seq_id, arrival in enumerate(arrivals):
        assert served.tokens[seq_id] == greedy(model, arrival.prompt, arrival.params.max_new_tokens), seq_id
    assert sum(in_flight) >= 3 and core.mixed_on_device == sum(in_flight)
    if buckets:
        assert sizes and all(size in PACKED_BUCKETS for size in sizes), sizes
    assert not core.busy and runner.lengths[:4] == [0] * 4


def test_mixing_is_on_by_default_only_where_the_packed_prefill_runs_on_cuda(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the CPU (no packed prefill by default) a runner mixes only when asked; the CUDA default is test_core_gpu's.
    monkeypatch.delenv("STRATUS_MIXED_STEP", raising=False)
    runner = build_runner(model, max_rows=2, max_len=32, fast=True)
    assert isinstance(runner, FusedRunner) and not runner.packed_prefill and not runner.mixed_step
    monkeypatch.setenv("STRATUS_MIXED_STEP", "1")
    assert build_runner(model, max_rows=2, max_len=32, fast=True).mixed_step


def test_rows_past_the_mixing_limit_keep_their_prefills_apart(model: Any) -> None:
    # A row decoding after a long prompt (more keys than MIX_MAX_KEYS: a chat after a long cached system prompt,
    # whose decode step reads the prefix once for all rows, not once a row as the packed pass would) keeps later
    # arrivals' prefills in passes of their own; once it has left, arrivals mix again. Answers are Hugging Face's.
    core = core_over(model, mixed=True, ahead=True, chunk=1024, max_len=640)
    core.eos = frozenset()
    long_prompt = [(3 * j + 1) % VOCAB for j in range(MIX_MAX_KEYS + 20)]
    arrivals = [Arrival(0, long_prompt, Sampling(max_new_tokens=12), None)]
    arrivals += [Arrival(2 + 2 * i, [(7 * i + j) % VOCAB for j in range(5 + i)], Sampling(max_new_tokens=6), None)
                 for i in range(3)]  # fmt: skip
    arrivals += [Arrival(30 + 2 * i, [(5 * i + j) % VOCAB for j in range(6 + i)], Sampling(max_new_tokens=8), None)
                 for i in range(3)]  # fmt: skip
    mixed_at: list[int] = []
    mixed = core._mixed

    def watched() -> Any:
        mixed_at.append(core.steps)
        return mixed()

    with mock.patch.object(core, "_mixed", side_effect=watched):
        served = serve(core, arrivals)
    for seq_id, arrival in enumerate(arrivals):
        assert served.tokens[seq_id] == greedy(model, arrival.prompt, arrival.params.max_new_tokens), seq_id
    assert mixed_at and min(mixed_at) >= 12  # none while the long row decoded (its 12 tokens), some after it left
