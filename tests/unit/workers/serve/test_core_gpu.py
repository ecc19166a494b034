"""The engine core on the CUDA path (CUDA graphs, decode-ahead, Triton attention): prefix cache and chunked
prefill give the tokens of an engine with neither, greedy and with log-probabilities."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.protocol.requests import Sampling
from stratus_workers.serve.core import PREFIX_BLOCK, EngineCore, EngineRequest, StepOutput
from stratus_workers.serve.prefix import PrefixCache
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import FusedRunner
from stratus_workers.serve.sessions import SpeculativeSessions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB = 512


@pytest.fixture(scope="module")
def model() -> Any:
    return random_llama(dict(TINY), vocab_size=VOCAB, init_std=0.2, seed=5).to("cuda", torch.float32)


def core_over(model: Any, *, chunk: int, pool: int, max_len: int = 256) -> EngineCore:
    runner = build_runner(model, max_rows=5, max_len=max_len, pool_tokens=pool)
    assert isinstance(runner, FusedRunner) and runner.cuda_graphs and runner.decoder.decode_ahead
    runner.warmup()
    eos: frozenset[int] = frozenset()
    prefix = PrefixCache(PREFIX_BLOCK, pool // PREFIX_BLOCK) if pool else None
    return EngineCore(runner, SpeculativeSessions(runner, eos, first_row=4), eos, max_batch_size=4,
                      prefill_chunk=chunk, prefix=prefix)  # fmt: skip


def serve(
    core: EngineCore, requests: list[tuple[list[int], Sampling]], parts: bool = True
) -> dict[int, tuple[list[int], list[float]]]:
    """Requests arrive two steps apart, so rows join and leave a running batch; with `parts`, first tokens are taken
    ahead of their steps' outputs (`EngineCore.on_part`, as the engine loop does)."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    pending = list(enumerate(requests))
    step = 0

    def collect(result: StepOutput) -> None:
        for i, (seq_id, token) in enumerate(zip(result.seq_ids, result.tokens, strict=True)):
            tokens, logprobs = out.setdefault(seq_id, ([], []))
            tokens.append(token)
            if requests[seq_id][1].logprobs:
                assert result.logprobs is not None
                logprobs.append(result.logprobs[i])

    core.on_part = collect if parts else None
    with torch.inference_mode():
        while pending or core.busy:
            if pending and step % 2 == 0:
                seq_id, (prompt, params) = pending.pop(0)
                core.add(EngineRequest(seq_id, prompt, params))
            collect(core.step())
            step += 1
    return out


def test_prefix_cache_and_chunked_prefill_on_the_cuda_path(model: Any) -> None:
    system = [(13 * i + 5) % VOCAB for i in range(70)]
    requests = [(system + [100 + i, 7, 8 + i], Sampling(max_new_tokens=12 + 3 * i, logprobs=i % 2 == 0))
                for i in range(6)]  # fmt: skip
    requests.append(([(3 * i) % VOCAB for i in range(150)], Sampling(max_new_tokens=9)))  # a long prompt mid-stream
    plain = serve(core_over(model, chunk=4096, pool=0), requests)
    cached_core = core_over(model, chunk=16, pool=1024)
    cached = serve(cached_core, requests)
    # Requests 1 and 2 arrive while the first is still prefilling; 3, 4 and 5 find its system prompt cached.
    assert cached_core.prefix is not None and cached_core.prefix.stats.hit_tokens >= 3 * 64
    for seq_id, (_, params) in enumerate(requests):
        assert len(cached[seq_id][0]) == params.max_new_tokens and len(cached[seq_id][1]) == (
            params.max_new_tokens if params.logprobs else 0
        )
        assert cached[seq_id][0] == plain[seq_id][0]
        assert cached[seq_id][1] == pytest.approx(plain[seq_id][1], abs=1e-3)
    decoder = cached_core.runner.decoder  # type: ignore[attr-defined]
    assert decoder.ahead_hits > 0


@pytest.mark.parametrize("mixed", ["0", "1"])
def test_rows_sharing_a_long_prefix_read_it_once_and_get_the_same_tokens(
    model: Any, monkeypatch: pytest.MonkeyPatch, mixed: str
) -> None:
    # A 300-token system prompt (past cache.CASCADE_MIN_TOKENS) under short turns, arriving two steps apart: once
    # it is cached, rows that load it do not copy it, and every pass reads it from the one shared copy (cascade
    # decode graphs, the packed prefill's and mixed passes' attention); the tokens and log-probabilities are those
    # of an engine whose rows each hold their own copy.
    monkeypatch.setenv("STRATUS_MIXED_STEP", mixed)
    system = [(17 * i + 3) % VOCAB for i in range(300)]
    requests = [(system + [200 + i, 9, 4 + i], Sampling(max_new_tokens=16 + 5 * i, logprobs=i % 2 == 1))
                for i in range(7)]  # fmt: skip
    requests.insert(4, ([(5 * i) % VOCAB for i in range(40)], Sampling(max_new_tokens=20)))  # shares nothing
    monkeypatch.setenv("STRATUS_CASCADE", "0")
    plain_core = core_over(model, chunk=64, pool=1024, max_len=512)
    plain = serve(plain_core, requests)
    assert plain_core.runner.decoder.cascade_steps == 0  # type: ignore[attr-defined]
    monkeypatch.delenv("STRATUS_CASCADE")
    cascade_core = core_over(model, chunk=64, pool=1024, max_len=512)
    cascaded = serve(cascade_core, requests)
    runner = cascade_core.runner
    assert isinstance(runner, FusedRunner) and runner.cache.cascade
    assert runner.decoder.cascade_steps > 0 and runner.cache.shared_block == PREFIX_BLOCK
    assert (cascade_core.stats().mixed_steps > 0) == (mixed == "1")
    assert len(runner.cache.shared_ids) * PREFIX_BLOCK >= 288  # the system prompt's full blocks
    for seq_id in range(len(requests)):
        assert cascaded[seq_id][0] == plain[seq_id][0]
        assert cascaded[seq_id][1] == pytest.approx(plain[seq_id][1], abs=1e-3)
    assert not any(runner.cache.shared)  # every request left: no row counts on the prefix


def test_packed_prefill_graphs_give_the_eager_prefills_tokens(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prefill as packed CUDA graphs per token bucket with the block attention kernel, several rows of different
    # lengths at once, against the eager prefill; arrivals two steps apart also join the step launched ahead.
    requests = [([(7 * i + j) % VOCAB for j in range(3 + 11 * i)], Sampling(max_new_tokens=10 + 2 * i))
                for i in range(8)]  # fmt: skip
    monkeypatch.setenv("STRATUS_MIXED_STEP", "0")  # prefills as passes of their own (mixed steps: the test below)
    monkeypatch.setenv("STRATUS_PACKED_PREFILL", "0")
    eager_core = core_over(model, chunk=40, pool=0)
    assert not eager_core.runner.packed_prefill  # type: ignore[attr-defined]
    eager = serve(eager_core, requests)
    monkeypatch.delenv("STRATUS_PACKED_PREFILL")  # the default where the Triton kernel runs
    graph_core = core_over(model, chunk=40, pool=0)
    runner = graph_core.runner
    assert runner.packed_prefill  # type: ignore[attr-defined]
    graphs = serve(graph_core, requests)
    assert runner.prefill_replays > 0  # type: ignore[attr-defined]
    assert graphs == eager
    assert runner.decoder.ahead_hits > 0  # type: ignore[attr-defined]


def test_mixed_steps_run_as_packed_graphs_and_give_the_unmixed_tokens(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrivals two steps apart into a running batch: with mixed steps (the default here) each prefill shares a captured
    # packed graph with the decoding rows' tokens; the answers are those of separate passes.
    requests = [([(11 * i + 3 * j) % VOCAB for j in range(5 + 13 * i)],
                 Sampling(max_new_tokens=14 + 3 * i, logprobs=i % 3 == 1)) for i in range(8)]  # fmt: skip
    monkeypatch.setenv("STRATUS_MIXED_STEP", "0")
    plain_core = core_over(model, chunk=48, pool=0)
    assert not plain_core.runner.mixed_step
    plain = serve(plain_core, requests)
    monkeypatch.delenv("STRATUS_MIXED_STEP")  # on by default on one CUDA device
    mixed_core = core_over(model, chunk=48, pool=0)
    runner = mixed_core.runner
    assert isinstance(runner, FusedRunner) and runner.mixed_step
    mixed = serve(mixed_core, requests)
    assert runner.mixed_step and runner.mixed_replays > 0 and mixed_core.stats().mixed_steps > 0
    assert plain_core.stats().mixed_steps == 0
    for seq_id in range(len(requests)):
        assert mixed[seq_id][0] == plain[seq_id][0]
        assert mixed[seq_id][1] == pytest.approx(plain[seq_id][1], abs=1e-3)
    # Prefills that met a step launched ahead were queued behind it fed its argmax on the device, and the decode
    # steps after mixed passes behind those, fed theirs.
    assert mixed_core.mixed_on_device > 0 and mixed_core.primed_on_device > 0
    assert runner.decoder.primed > 0 and runner.decoder.ahead_hits > 0


def test_prefills_beside_the_step_launched_ahead_give_the_tokens_of_prefills_behind_it(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Requests arriving every other step into a running batch, most under a cached 300-token system prompt (read from
    # the shared prefix), greedy ones taking their first tokens on the device: with each prefill on a stream of its
    # own beside the decode step launched ahead (opt-in), the answers are those of prefills queued behind it.
    system = [(19 * i + 7) % VOCAB for i in range(300)]
    requests = [(system + [300 + i, 5, 9 + i], Sampling(max_new_tokens=6 + 7 * (i % 5), logprobs=i % 4 == 3))
                for i in range(12)]  # fmt: skip
    requests.insert(5, ([(7 * i) % VOCAB for i in range(90)], Sampling(max_new_tokens=25)))  # shares nothing
    monkeypatch.setenv("STRATUS_MIXED_STEP", "0")  # beside is the unmixed path's (a mixed step has one pass)
    monkeypatch.setenv("STRATUS_PREFILL_BESIDE", "0")
    behind_core = core_over(model, chunk=64, pool=1024, max_len=512)
    behind = serve(behind_core, requests, parts=False)  # (and everything in the steps' outputs)
    assert behind_core.prefills_beside == 0
    monkeypatch.setenv("STRATUS_PREFILL_BESIDE", "1")
    beside_core = core_over(model, chunk=64, pool=1024, max_len=512)
    beside = serve(beside_core, requests)
    runner = beside_core.runner
    assert isinstance(runner, FusedRunner)
    assert beside_core.prefills_beside > 0
    assert runner.decoder.device_joins > 0 and runner.decoder.cascade_steps > 0
    for seq_id in range(len(requests)):
        assert beside[seq_id][0] == behind[seq_id][0]
        assert beside[seq_id][1] == pytest.approx(behind[seq_id][1], abs=1e-3)
