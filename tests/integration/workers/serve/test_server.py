"""The model server over real gRPC on loopback: unary, streaming, cancellation, deadlines and every limit."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.client import AsyncClient

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("engine", ["thread", "process"])
async def test_unary_and_streaming_agree(model_server, engine: str) -> None:
    async with model_server(name="tiny", engine=engine) as server, AsyncClient(server.address) as client:
        assert server.mode == engine
        reply = await client.generate("Hello world", max_new_tokens=8, logprobs=True, request_id="r1")
        assert reply.usage.completion_tokens == len(reply.logprobs) > 0
        assert reply.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        assert reply.route.tier == pb.TIER_CLOUD and reply.model == "tiny" and reply.request_id == "r1"
        assert all(lp.logprob <= 0 for lp in reply.logprobs)
        assert reply.timing.total_ms >= reply.timing.ttft_ms > 0
        chunks = [c async for c in client.stream("Hello world", max_new_tokens=8)]
        assert "".join(c.text for c in chunks) == reply.text
        assert chunks[-1].HasField("route") and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        chat = await client.generate(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=4)
        assert chat.usage.prompt_tokens > 5  # the chat template wrapped the message
        # Both engine layouts time their start the same way (bench-serve prints it).
        phases = dict(server.engine.info.startup)
        assert list(phases) == ["load", "build", "warm-up", "graphs"]
        assert phases["load"] > 0 and phases["build"] >= 0 and phases["warm-up"] >= 0
        assert phases["graphs"] == 0  # CUDA graphs are captured on GPUs only


@pytest.mark.parametrize(
    ("kwargs", "code", "fragment"),
    [
        (dict(prompt="word " * 80), grpc.StatusCode.INVALID_ARGUMENT, "prompt too long"),
        (dict(prompt="hi", max_new_tokens=65), grpc.StatusCode.INVALID_ARGUMENT, "at most 64"),
        (dict(prompt="hi", temperature=3.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(prompt="hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (dict(prompt="hi", stop=["x"] * 9), grpc.StatusCode.INVALID_ARGUMENT, "stop sequences"),
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (dict(messages=[{"role": "robot", "content": "x"}]), grpc.StatusCode.INVALID_ARGUMENT, "role"),
        (dict(prompt="hi", model="other"), grpc.StatusCode.NOT_FOUND, "not served here"),
        (dict(prompt="hi", presence_penalty=2.5), grpc.StatusCode.INVALID_ARGUMENT, "presence_penalty"),
        (dict(prompt="hi", logit_bias={10**6: 1.0}), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        (dict(prompt="hi", logit_bias={5: 101.0}), grpc.StatusCode.INVALID_ARGUMENT, "logit_bias"),
        (dict(prompt="hi", top_logprobs=3), grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
        (dict(prompt="hi", logprobs=True, top_logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
        (dict(prompt="x" * 70_000), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
)
async def test_limits_give_clear_errors(model_server, kwargs, code, fragment) -> None:
    async with (
        model_server(name="tiny", max_prompt_tokens=64, max_new_tokens=64, max_message_bytes=65536) as server,
        AsyncClient(server.address) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate(**kwargs)
        assert caught.value.code() == code
        assert fragment in (caught.value.details() or "")
        field = dict(caught.value.trailing_metadata() or ()).get("stratus-field", "")
        if code == grpc.StatusCode.INVALID_ARGUMENT and fragment != "role":
            assert field and field.split("[")[0] in (caught.value.details() or "") + "prompt"  # names the field
        # The server is still fine afterwards.
        assert (await client.generate("ok", max_new_tokens=2)).usage.completion_tokens > 0


async def test_echo_and_alternatives_over_grpc(model_server) -> None:
    async with model_server(name="tiny") as server, AsyncClient(server.address) as client:
        plain = await client.generate("Once upon a time", max_new_tokens=5, logprobs=True)
        echoed = await client.generate("Once upon a time", max_new_tokens=5, logprobs=True, top_logprobs=2, echo=True)
        assert echoed.text == plain.text and len(echoed.prompt_logprobs) == echoed.usage.prompt_tokens
        assert "".join(lp.token for lp in echoed.prompt_logprobs) == "Once upon a time"
        assert echoed.prompt_logprobs[0].logprob == 0.0 and all(lp.logprob < 0 for lp in echoed.prompt_logprobs[1:])
        assert all(len(lp.top_logprobs) == 2 for lp in echoed.logprobs)
        assert [lp.token_id for lp in echoed.logprobs] == [lp.token_id for lp in plain.logprobs]
        assert not plain.prompt_logprobs and not plain.logprobs[0].top_logprobs
        chunks = [c async for c in client.stream("Once upon a time", max_new_tokens=5, echo=True)]
        assert not chunks[0].text and [(lp.token_id, lp.logprob) for lp in chunks[0].prompt_logprobs] == [
            (lp.token_id, lp.logprob) for lp in echoed.prompt_logprobs
        ]
        assert "".join(c.text for c in chunks) == plain.text


async def test_client_cancel_and_deadline_free_the_batch(model_server) -> None:
    async with model_server(max_batch_size=2, max_new_tokens=400) as server, AsyncClient(server.address) as client:
        assert server.engine is not None
        stream = client.stream("cancel", max_new_tokens=400)
        await stream.__anext__()
        assert server.engine.active == 1
        await stream.aclose()  # the client goes away mid-stream
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("slow", max_new_tokens=400, timeout=0.05)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(200):
            if server.engine.active == 0 and server.engine.waiting == 0:
                break
            await asyncio.sleep(0.02)
        assert (server.engine.active, server.engine.waiting) == (0, 0)


async def test_health_reflection_and_metrics(model_server) -> None:
    async with model_server(tier="edge") as server, AsyncClient(server.address) as client:
        info = await client.model_info()
        assert info.tier == pb.TIER_EDGE and info.parameters > 0 and info.max_prompt_tokens == 2048
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="stratus.v1.Inference")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [
                r
                async for r in stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            ]
            names = {s.name for s in replies[0].list_services_response.service}
            assert "stratus.v1.Inference" in names
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.http_port}"
            async with http.get(f"{base}/metrics") as resp:
                before = await resp.text()  # the warm-up's passes, if any, are counted already
            reply = await client.generate("count me", max_new_tokens=3)
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
            async with http.get(f"{base}/readyz") as ready:
                assert ready.status == 200
        assert 'stratus_server_requests_total{code="OK",method="Generate"} 1.0' in text
        assert "stratus_server_ttft_seconds_bucket" in text
        # The model's compute: one prefill pass over the prompt, then one decode pass per further token.
        assert reply.usage.completion_tokens == 3 and reply.finish_reason == pb.FINISH_REASON_LENGTH

        def counter(metrics: str, name: str) -> float:
            return next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith(f"{name} "))

        passes, positions = "stratus_server_forward_passes_total", "stratus_server_forward_positions_total"
        assert counter(text, passes) - counter(before, passes) == 3
        assert counter(text, positions) - counter(before, positions) == reply.usage.prompt_tokens + 2
        prefills = "stratus_server_prefill_steps_total"  # one step prefilled the prompt
        assert counter(text, prefills) - counter(before, prefills) == 1


async def test_score_matches_a_direct_forward_pass(model_server, tiny_model_dir) -> None:
    import torch

    from stratus_workers.models import load_model

    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    prompt, continuation = "The sky is", " blue and wide"
    async with model_server() as server, AsyncClient(server.address) as client:
        scored = await client.score(continuation, prompt)
        empty = await client.score("", prompt)
    ids = loaded.tokenizer.encode(prompt)
    cont = loaded.tokenizer.encode(continuation, add_special_tokens=False)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([ids + cont])).logits[0]
    expected = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)[torch.arange(len(cont)), torch.tensor(cont)]
    assert scored.tokens == len(cont)
    assert list(scored.logprobs) == pytest.approx(expected.tolist(), abs=1e-4)
    assert scored.mean_logprob == pytest.approx(float(expected.mean()), abs=1e-4)
    assert (empty.tokens, empty.mean_logprob) == (0, 0.0)


async def test_a_long_prompt_then_overlapping_requests_leave_the_server_answering(model_server) -> None:
    # Issue 12's reproduction over gRPC: once a long prompt had grown the KV cache, the next row
    # to leave mid-batch killed the engine thread, and every later request hung.
    async with model_server(max_batch_size=4) as server, AsyncClient(server.address) as client:
        first = await client.generate("word " * 300, max_new_tokens=1, timeout=30)
        assert first.usage.prompt_tokens > 256
        replies = await asyncio.gather(
            *(client.generate(f"request {i}", max_new_tokens=n, timeout=30) for i, n in enumerate((40, 2, 40)))
        )
        assert [r.usage.completion_tokens for r in replies] == [40, 2, 40]
        after = await client.generate("and then any request", max_new_tokens=3, timeout=30)
        assert after.usage.completion_tokens == 3
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_shared_prefix_requests_answer_as_with_no_caches(model_server, monkeypatch) -> None:
    """Prompts and chats that share a long system prompt: with the token cache of the frontend and the prefix
    cache of the engine, the same prompt ids and greedy answers as a server with neither."""
    system = "You are a careful assistant. Answer in one short line, and never repeat the question back. " * 8
    turns = [f"Question {i}: what is {i} times {i + 1}?" for i in range(6)] + ["  odd   spacing\n\n", "'s 123"]

    async def answers(server: Any) -> list[tuple[int, str]]:
        async with AsyncClient(server.address) as client:
            replies = await asyncio.gather(
                *(client.generate(system + turn, max_new_tokens=6) for turn in turns),
                *(client.generate(messages=[{"role": "system", "content": system}, {"role": "user", "content": t}],
                                  max_new_tokens=6) for t in turns),
            )  # fmt: skip
        return [(r.usage.prompt_tokens, r.text) for r in replies]

    async with model_server(max_batch_size=4, max_prompt_tokens=512) as server:
        cached = await answers(server)
        assert server.servicer is not None and server.servicer.prompts.reused_chars > len(system)
    monkeypatch.setenv("STRATUS_PROMPT_CACHE", "0")
    async with model_server(max_batch_size=4, max_prompt_tokens=512, prefix_cache_tokens=0) as server:
        plain = await answers(server)
        assert server.servicer is not None and server.servicer.prompts.reused_chars == 0
        tokenizer = server.engine.tokenizer
    assert cached == plain
    assert [n for n, _ in plain[: len(turns)]] == [len(tokenizer.encode(system + t)) for t in turns]


async def test_the_stream_message_rate_setting_paces_the_servers_streams(model_server) -> None:
    """`--stream-message-rate` reaches the frontend: at 20 messages a second one stream's tokens come in fewer
    messages than tokens (50 ms apart at least), the text and token count those of an unpaced server."""

    async def streamed(server: Any) -> tuple[str, int, int]:
        async with AsyncClient(server.address) as client:
            chunks = [c async for c in client.stream("Once upon a time", max_new_tokens=24)]
        texts = [c for c in chunks if c.text]
        return "".join(c.text for c in chunks), chunks[-1].usage.completion_tokens, len(texts)

    async with model_server(stream_message_rate=0) as server:
        assert server.engine.message_rate == 0
        text, tokens, messages = await streamed(server)
    assert tokens == 24 and messages > 12  # unpaced: about a message a token
    async with model_server(stream_message_rate=20) as server:
        assert server.engine.message_rate == 20
        paced = await streamed(server)
    assert paced[:2] == (text, tokens) and paced[2] < messages


class EngineKilled(BaseException):
    """A fault the engine's per-step recovery (which catches Exception) does not handle: it ends the loop."""


async def test_a_dead_engine_loop_turns_health_off_and_requests_fail_fast(tiny_model_dir) -> None:
    import threading
    import time

    from stratus_workers.models import load_model
    from stratus_workers.serve.server import ModelServer, ServerSettings

    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")  # a private copy: it gets a fault
    armed = threading.Event()

    def fault(module: object, args: object) -> None:
        if armed.is_set():
            raise EngineKilled("injected fault in the model's forward pass")

    loaded.model.model.layers[0].mlp.register_forward_pre_hook(fault)
    config = ServerSettings(model=str(tiny_model_dir), port=0, http_port=0, log_format="text", max_batch_size=1)
    server = ModelServer(config, loaded=loaded)
    await server.start()
    try:
        async with (
            AsyncClient(server.address) as client,
            grpc.aio.insecure_channel(server.address) as channel,
            aiohttp.ClientSession() as http,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            assert (await client.generate("fine", max_new_tokens=2)).usage.completion_tokens == 2
            running = client.stream("in flight", max_new_tokens=400)
            await running.__anext__()
            waiting = asyncio.ensure_future(client.generate("waiting", max_new_tokens=4, timeout=30))
            assert server.engine is not None
            while server.engine.waiting == 0:  # the only row is busy: this one queues
                await asyncio.sleep(0.01)
            armed.set()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as in_flight:
                async for _ in running:
                    pass
            assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "injected fault" in (in_flight.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as queued:
                await waiting
            assert queued.value.code() == grpc.StatusCode.UNAVAILABLE
            for service in ("", "stratus.v1.Inference"):
                status = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - started < 2
            async with http.get(f"http://127.0.0.1:{server.http_port}/readyz") as ready:
                assert ready.status == 503 and "injected fault" in (await ready.json())["detail"]
            with pytest.raises(grpc.aio.AioRpcError) as later:
                await client.generate("any later request", max_new_tokens=2, timeout=5)
            assert later.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 2  # refused at once, not left to its deadline
    finally:
        await server.stop(0.5)


async def wait_until(condition: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("sig", "fragment"), [(signal.SIGKILL, "killed by SIGKILL"), (signal.SIGSTOP, "stopped responding")]
)
async def test_a_killed_or_hung_engine_process_turns_health_off_and_requests_fail_fast(
    model_server, sig: signal.Signals, fragment: str
) -> None:
    async with (
        model_server(engine="process", max_batch_size=1, max_new_tokens=400) as server,
        AsyncClient(server.address) as client,
        grpc.aio.insecure_channel(server.address) as channel,
        aiohttp.ClientSession() as http,
    ):
        assert server.engine is not None and server.engine.pid > 0
        health = health_pb2_grpc.HealthStub(channel)
        assert (await client.generate("fine", max_new_tokens=2)).usage.completion_tokens == 2
        running = client.stream("in flight", max_new_tokens=400)
        await running.__anext__()
        waiting = asyncio.ensure_future(client.generate("waiting", max_new_tokens=4, timeout=30))
        await wait_until(lambda: server.engine is not None and server.engine.waiting > 0, 10)
        os.kill(server.engine.pid, sig)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as in_flight:
            async for _ in running:
                pass
        assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
        assert fragment in (in_flight.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as queued:
            await waiting
        assert queued.value.code() == grpc.StatusCode.UNAVAILABLE
        for service in ("", "stratus.v1.Inference"):
            status = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        async with http.get(f"http://127.0.0.1:{server.http_port}/readyz") as ready:
            assert ready.status == 503 and fragment in (await ready.json())["detail"]
        with pytest.raises(grpc.aio.AioRpcError) as later:
            await client.generate("any later request", max_new_tokens=2, timeout=5)
        assert later.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2
        assert server.engine_dead.is_set()  # the entrypoint exits on this, so that the pod restarts


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115 - one read
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


async def test_the_server_process_exits_when_its_engine_process_dies(server_process) -> None:
    proc, address = server_process(tier="cloud", engine="process")
    engines = children_of(proc.pid)
    assert len(engines) == 1, engines  # one engine process, started by the server
    async with AsyncClient(address) as client:
        running = client.stream("in flight", max_new_tokens=64)
        await running.__anext__()
        os.kill(engines[0], signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as in_flight:
            async for _ in running:
                pass
        assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30) == 3  # ENGINE_DIED
