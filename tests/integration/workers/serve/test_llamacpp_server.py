"""The gRPC contract on a GGUF edge artifact served by llama.cpp: the same service, checked against llama.cpp itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import torch

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.client import AsyncClient
from stratus_workers.models import load_model
from stratus_workers.serve.llamacpp import LlamaCppRunner
from stratus_workers.serve.speculative import draft_distribution

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gguf(tiny_gguf_dir: Path) -> Any:
    return load_model(str(tiny_gguf_dir))


def _greedy(gguf: Any, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities, straight from llama.cpp (no engine, no server)."""
    runner = LlamaCppRunner(gguf.model, max_rows=1, max_len=256, threads=1)
    logits = runner.forward(0, [prompt])[0]
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(n):
        token = int(torch.argmax(logits))
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
        logits = runner.forward(0, [[token]])[0]
    return tokens, logprobs


@pytest.mark.parametrize("engine", ["thread", "process"])
async def test_generate_and_stream_are_llamacpps_greedy_tokens(model_server, tiny_gguf_dir, gguf, engine) -> None:
    """In either layout: the engine process loads the GGUF file itself (the loader is what crosses over)."""
    async with (
        model_server(model=str(tiny_gguf_dir), tier="edge", name="edge", threads=1, engine=engine) as server,
        AsyncClient(server.address) as client,
    ):
        reply = await client.generate("Hello world", max_new_tokens=12, logprobs=True)
        chunks = [c async for c in client.stream("Hello world", max_new_tokens=12)]
        info = await client.model_info()
    assert reply.route.tier == pb.TIER_EDGE and reply.model == "edge"
    tokens, logprobs = _greedy(gguf, list(gguf.tokenizer.encode("Hello world")), reply.usage.completion_tokens)
    assert [lp.token_id for lp in reply.logprobs] == tokens
    assert [lp.logprob for lp in reply.logprobs] == pytest.approx(logprobs, abs=1e-4)
    assert "".join(c.text for c in chunks) == reply.text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert info.compression == "quantize:gguf-f32" and info.parameters == gguf.parameters
    assert info.vocab_size == gguf.model.config.vocab_size and info.device == "cpu"
    assert server.mode == engine and server.engine is not None and server.engine.info.runner == "LlamaCppRunner"


async def test_draft_greedy_and_sampled(model_server, tiny_gguf_dir, gguf) -> None:
    context = list(gguf.tokenizer.encode("The weather today"))
    async with (
        model_server(model=str(tiny_gguf_dir), tier="edge", threads=1) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceStub(channel)
        greedy = await stub.Draft(pb.DraftRequest(session_id="g", context=context, max_tokens=5))
        # The next round reuses the session's cached prefix (the context grew by the accepted drafts).
        grown = context + list(greedy.tokens[:3])
        more = await stub.Draft(pb.DraftRequest(session_id="g", context=grown, max_tokens=2, end_session=True))
        sampling = pb.SpeculativeSampling(temperature=0.9, top_p=0.95, seed=3)
        sampled = [
            await stub.Draft(
                pb.DraftRequest(
                    session_id=f"s{i}", context=context, max_tokens=4, sampling=sampling, top_k=8, end_session=True
                )
            )
            for i in range(2)
        ]
        assert server.engine is not None and server.engine.stats.sessions == 0  # every call here ended its session
    expected, _ = _greedy(gguf, context, 5)
    assert list(greedy.tokens) == expected and not greedy.distributions
    assert list(more.tokens) == _greedy(gguf, grown, 2)[0]
    first, second = sampled
    assert list(first.tokens) == list(second.tokens)  # the seed makes a sampled draft reproducible
    # Each distribution is exactly the edge's top-k sampling distribution after the tokens before it.
    runner = LlamaCppRunner(gguf.model, max_rows=1, max_len=256, threads=1)
    logits = runner.forward(0, [context])[0]
    for token, dist in zip(first.tokens, first.distributions, strict=True):
        want = draft_distribution(logits, 0.9, 0.95, 8)
        assert list(dist.token_ids) == list(want.token_ids)
        assert list(dist.probs) == pytest.approx(list(want.probs), abs=1e-5)
        assert token in dist.token_ids
        logits = runner.forward(0, [[token]])[0]


async def test_score_is_llamacpps_log_likelihood(model_server, tiny_gguf_dir, gguf) -> None:
    prompt, continuation = "The sky is", " blue and wide"
    async with model_server(model=str(tiny_gguf_dir), threads=1) as server, AsyncClient(server.address) as client:
        scored = await client.score(continuation, prompt)
    ids = list(gguf.tokenizer.encode(prompt))
    cont = list(gguf.tokenizer.encode(continuation, add_special_tokens=False))
    runner = LlamaCppRunner(gguf.model, max_rows=1, max_len=64, threads=1)
    logits = runner.forward(0, [ids + cont], all_logits=True)[0]
    expected = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)[torch.arange(len(cont)), torch.tensor(cont)]
    assert list(scored.logprobs) == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (pb.GenerateRequest(prompt="word " * 80), "prompt too long"),
        (pb.GenerateRequest(prompt="hi", max_new_tokens=65), "at most 64"),
        (pb.GenerateRequest(prompt="hi", temperature=3.0), "temperature"),
        (pb.GenerateRequest(prompt=""), "prompt is empty"),
        (pb.DraftRequest(session_id="d", context=[1], max_tokens=0), "max_tokens is 0"),
        (pb.DraftRequest(session_id="d", context=[49152], max_tokens=2), "outside this model's vocabulary"),
        (pb.DraftRequest(session_id="d", context=[], max_tokens=2), "context is empty"),
    ],
)
async def test_bad_input_is_refused_and_the_server_carries_on(model_server, tiny_gguf_dir, call, fragment) -> None:
    async with (
        model_server(model=str(tiny_gguf_dir), max_prompt_tokens=64, max_new_tokens=64, threads=1) as server,
        grpc.aio.insecure_channel(server.address) as channel,
        AsyncClient(server.address) as client,
    ):
        stub = pb_grpc.InferenceStub(channel)
        method = stub.Generate if isinstance(call, pb.GenerateRequest) else stub.Draft
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(call)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in (caught.value.details() or "")
        assert (await client.generate("ok", max_new_tokens=2)).usage.completion_tokens > 0


async def test_cancel_deadline_and_metrics(model_server, tiny_gguf_dir) -> None:
    async with (
        model_server(model=str(tiny_gguf_dir), max_batch_size=2, max_new_tokens=400, threads=1) as server,
        AsyncClient(server.address) as client,
    ):
        assert server.engine is not None
        stream = client.stream("cancel", max_new_tokens=400)
        await stream.__anext__()
        assert server.engine.active == 1
        await stream.aclose()  # the client goes away mid-stream

        # Long streamed answers fill both rows and the queue ahead, so the next request waits in the server's
        # queue when its deadline passes: the server itself must see the deadline (one that expires before the
        # call reaches the server is only the client's business, a race a loaded machine makes likely). Twelve
        # answers of 400 tokens take six rounds, about 1.8 s on an idle machine, longer on a busy one.
        async def hold(i: int) -> None:
            async for _ in client.stream(f"hold{i}", max_new_tokens=400):
                pass

        holders = [asyncio.create_task(hold(i)) for i in range(12)]
        for _ in range(500):
            if server.engine.active + server.engine.waiting == 12:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("slow", max_new_tokens=400, timeout=1.0)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        for _ in range(200):
            if server.engine.active == 0 and server.engine.waiting == 0:
                break
            await asyncio.sleep(0.02)
        assert (server.engine.active, server.engine.waiting) == (0, 0)
        # Four at once share the decode batch (two rows) and all finish.
        replies = await asyncio.gather(*(client.generate(f"p{i}", max_new_tokens=6) for i in range(4)))
        assert all(r.usage.completion_tokens > 0 for r in replies)
        assert await client.healthy("stratus.v1.Inference")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.http_port}/metrics") as resp:
            text = await resp.text()
    assert 'stratus_server_requests_total{code="OK",method="Generate"} 4.0' in text
    assert 'stratus_server_requests_total{code="DEADLINE_EXCEEDED",method="Generate"} 1.0' in text
