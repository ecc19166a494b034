"""Pipeline parallel: two stages (gloo on the CPU, two processes; or four, two stages of two tensor-parallel
ranks) answer exactly as one process does, and a stage that dies fails the requests in flight and the
server's health instead of hanging."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stratus_workers.client import AsyncClient

pytestmark = pytest.mark.integration

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away there lived",
    "Pipeline stages pass activations",
    "One two three four five six seven eight nine ten eleven twelve",
]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


async def answers(address: str) -> tuple[list[str], list[str], str, list[float]]:
    """Each prompt alone, all of them at once (one batch, split into micro-batches), one streamed, and the
    log-probabilities of a continuation (Score: every position's logits, from a speculative session row)."""
    async with AsyncClient(address) as client:
        alone = [(await client.generate(p, max_new_tokens=12)).text for p in PROMPTS]
        together = await asyncio.gather(*(client.generate(p, max_new_tokens=12) for p in PROMPTS))
        streamed = "".join([c.text async for c in client.stream(PROMPTS[1], max_new_tokens=12)])
        scored = list((await client.score(" jumps over the lazy dog", PROMPTS[0])).logprobs)
    return alone, [r.text for r in together], streamed, scored


@pytest.mark.parametrize(
    ("microbatches", "fast", "ahead"), [(0, False, False), (3, False, False), (0, True, False), (3, True, True)]
)
async def test_two_stages_answer_like_one_process(
    model_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, microbatches: int, fast: bool, ahead: bool
) -> None:
    """Greedy answers of a two-stage pipeline equal the single process's, alone and batched (the batch of
    four rows runs as two micro-batches by default, as three of sizes 2, 1, 1 with `microbatches=3`). On
    the fused path, as CUDA runs it, a decode step goes through the stages' per-micro-batch decode step
    (micro-batches of bucket sizes, pipeline.decode_groups), and with decoding ahead each step is queued on
    every stage before rank 0 samples the last one (taken when greedy, dropped when the rows change). Both
    stages must run the path asked for (none fell back to the module path), and with decoding ahead some
    steps must be found computed ahead (the engine's step profile counts them), without it none."""
    if fast:  # the fused path, as CUDA runs it (and its per-micro-batch decode step), on the CPU
        monkeypatch.setenv("STRATUS_FAST_PATH", "1")
    if ahead:  # and each step queued ahead on the last one's argmax, as with CUDA graphs
        monkeypatch.setenv("STRATUS_DECODE_AHEAD", "1")
    async with model_server(max_batch_size=4) as single:
        expected = await answers(single.address)
    profile = tmp_path / "steps.jsonl"
    monkeypatch.setenv("STRATUS_STEP_PROFILE", str(profile))  # the pipeline's engine process, not the single one
    async with model_server(
        max_batch_size=4, engine="process", pipeline_parallel=2, pipeline_microbatches=microbatches
    ) as piped:
        inner = "FusedRunner" if fast else "ModuleRunner"
        assert piped.engine is not None and piped.engine.info.runner == f"PipelineRunner({inner}, {inner})"
        stages = children_of(piped.engine.pid)
        assert len(stages) == 1, stages  # stage 0 is the engine process; it started stage 1
        got = await answers(piped.address)
    periods = [json.loads(line) for line in profile.read_text().splitlines()]
    hits = sum(period["ahead_hits"] for period in periods)
    assert periods and (hits > 0 if ahead else hits == 0), periods
    assert got[:3] == expected[:3]
    assert len(got[3]) == len(expected[3]) > 3 and got[3] == pytest.approx(expected[3], abs=1e-4)
    alone, together, streamed, _ = got
    assert together == alone and streamed == alone[1]


def rank_of(pid: int) -> int:
    """The RANK a pipeline process was started with (parallel.spawn_followers sets it)."""
    with open(f"/proc/{pid}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    return int(variables[b"RANK"])


async def test_two_stages_of_two_tensor_parallel_ranks_answer_like_one_process(model_server: Any) -> None:
    """`tensor_parallel=2, pipeline_parallel=2`: four processes (rank 0, the engine, starts the other three);
    each stage's two ranks shard its layers and all-reduce between them, stage to stage rank to rank."""
    async with model_server(max_batch_size=4) as single:
        expected = await answers(single.address)
    async with model_server(max_batch_size=4, engine="process", pipeline_parallel=2, tensor_parallel=2) as piped:
        fused = ", ".join(["FusedRunner"] * 4)  # tensor parallel needs the fused path on every rank
        assert piped.engine is not None and piped.engine.info.runner == f"PipelineRunner({fused})"
        assert len(children_of(piped.engine.pid)) == 3
        got = await answers(piped.address)
    assert got[:3] == expected[:3]
    assert len(got[3]) == len(expected[3]) > 3 and got[3] == pytest.approx(expected[3], abs=1e-4)


@pytest.mark.parametrize(("tensor_parallel", "victim"), [(1, 1), (2, 3)])
async def test_a_killed_stage_fails_requests_and_health_at_once(
    model_server: Any, tensor_parallel: int, victim: int
) -> None:
    """Killing a stage's process (stage 1; with two ranks a stage, rank 3: stage 1's second rank) ends the
    request in flight with UNAVAILABLE within seconds and turns health NOT_SERVING."""
    async with (
        model_server(
            engine="process", pipeline_parallel=2, tensor_parallel=tensor_parallel, max_batch_size=1, max_new_tokens=400
        ) as server,
        AsyncClient(server.address) as client,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        assert server.engine is not None
        health = health_pb2_grpc.HealthStub(channel)
        assert (await client.generate("fine", max_new_tokens=2)).usage.completion_tokens == 2
        ranks = {rank_of(pid): pid for pid in children_of(server.engine.pid)}
        assert sorted(ranks) == list(range(1, 2 * tensor_parallel))
        running = client.stream("in flight", max_new_tokens=400)
        await running.__anext__()
        os.kill(ranks[victim], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as in_flight:
            async for _ in running:
                pass
        assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "pipeline stage" in (in_flight.value.details() or "")
        # Not a hang: the engine's own step timeout is 60 s; the stage watch acts within a tenth of one.
        assert time.monotonic() - started < 5
        for service in ("", "stratus.v1.Inference"):
            status = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as later:
            await client.generate("any later request", max_new_tokens=2, timeout=5)
        assert later.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.engine_dead.is_set()


async def test_the_entrypoint_stops_its_stages_cleanly(server_process: Callable[..., Any]) -> None:
    """`--pipeline-parallel 2` from the command line; SIGTERM releases stage 1 (no failure is reported)."""
    proc: subprocess.Popen[bytes]
    proc, address = server_process(tier="cloud", pipeline_parallel=2, device="cpu", max_batch_size=2)
    try:
        (engine,) = children_of(proc.pid)
        assert len(children_of(engine)) == 1
        async with AsyncClient(address) as client:
            assert (await client.generate(PROMPTS[0], max_new_tokens=8)).usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
