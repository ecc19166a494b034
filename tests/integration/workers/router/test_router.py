"""The router over real servers: each policy, cascade decisions, failover when the edge process dies."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import grpc
import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.client import AsyncClient

pytestmark = pytest.mark.integration

# A random tiny model is unsure of everything: its mean log-prob sits near -ln(49152) ≈ -10.8.
ALWAYS_EDGE = {"confidenceThreshold": -100.0}
NEVER_EDGE = {"confidenceThreshold": -0.001}


@pytest.mark.parametrize(
    ("policy", "cascade", "tier", "reason"),
    [
        ("cloud-only", {}, pb.TIER_CLOUD, "policy"),
        ("edge-only", {}, pb.TIER_EDGE, "policy"),
        ("cascade", ALWAYS_EDGE, pb.TIER_EDGE, "confident"),
        ("cascade", NEVER_EDGE, pb.TIER_CLOUD, "low-confidence"),
    ],
)
@pytest.mark.parametrize("edge_model", ["tiny_model_dir", "tiny_gguf_dir"])  # the edge on torch, or on llama.cpp
async def test_policies(
    model_server, policy, cascade, tier, reason, router_config, running_router, edge_model, request
) -> None:
    edge_source = str(request.getfixturevalue(edge_model))
    async with (
        model_server(tier="edge", name="edge", model=edge_source) as edge,
        model_server(tier="cloud", name="cloud") as cloud,
    ):
        config = router_config(
            policy, [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")], cascade=cascade
        )
        async with running_router(config) as router, AsyncClient(router.address) as client:
            reply = await client.generate("Route me", max_new_tokens=6)
            assert (reply.route.tier, reply.route.reason) == (tier, reason)
            assert reply.route.backend == ("edge" if tier == pb.TIER_EDGE else "cloud")
            assert not reply.route.degraded
            assert len(reply.logprobs) == 0  # not asked for, even though cascade asked the edge for them
            if policy == "cascade":
                assert reply.route.escalated == (tier == pb.TIER_CLOUD)
                assert reply.route.threshold == cascade["confidenceThreshold"]
                assert reply.route.confidence < 0
            chunks = [c async for c in client.stream("Route me", max_new_tokens=6)]
            assert chunks[-1].route.tier == tier
            assert "".join(c.text for c in chunks) == reply.text


async def test_cascade_sends_long_prompts_to_the_cloud(
    model_server, tiny_model_dir, router_config, running_router
) -> None:
    async with model_server(tier="edge") as edge, model_server(tier="cloud") as cloud:
        config = router_config(
            "cascade",
            [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")],
            cascade={**ALWAYS_EDGE, "maxEdgePromptTokens": 8},
        )
        config = config.model_copy(update={"tokenizer": str(tiny_model_dir)})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            short = await client.generate("hi", max_new_tokens=2)
            long = await client.generate("one two three four five six seven eight nine ten", max_new_tokens=2)
            per_request = await client.generate("hi", max_new_tokens=2, policy="cloud-only")
        assert short.route.tier == pb.TIER_EDGE
        assert (long.route.tier, long.route.reason, long.route.escalated) == (pb.TIER_CLOUD, "prompt-too-long", False)
        assert (per_request.route.tier, per_request.route.reason) == (pb.TIER_CLOUD, "policy")


async def test_cascade_escalates_when_edge_is_too_slow(model_server, router_config, running_router) -> None:
    async with model_server(tier="edge") as edge, model_server(tier="cloud") as cloud:
        config = router_config(
            "cascade",
            [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")],
            cascade={**ALWAYS_EDGE, "edgeTimeoutSeconds": 0.001},
        )
        async with running_router(config) as router, AsyncClient(router.address) as client:
            reply = await client.generate("hurry", max_new_tokens=50)
        assert (reply.route.tier, reply.route.reason) == (pb.TIER_CLOUD, "edge-timeout")


async def test_failover_when_edge_process_is_killed(
    model_server, server_process, router_config, running_router
) -> None:
    proc, edge_address = server_process("edge")
    async with model_server(tier="cloud", name="cloud") as cloud:
        for policy in ("cascade", "edge-only"):
            config = router_config(
                policy, [("edge", edge_address, "edge"), ("cloud", cloud.address, "cloud")], cascade=ALWAYS_EDGE
            )
            async with running_router(config) as router, AsyncClient(router.address) as client:
                before = await client.generate("before", max_new_tokens=3)
                assert before.route.tier == pb.TIER_EDGE
                if policy == "edge-only":
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        failures = 0
        for policy in ("cascade", "edge-only"):
            config = router_config(
                policy, [("edge", edge_address, "edge"), ("cloud", cloud.address, "cloud")], cascade=ALWAYS_EDGE
            )
            async with running_router(config) as router, AsyncClient(router.address) as client:
                replies = []
                for _ in range(5):
                    try:
                        replies.append(await client.generate("after", max_new_tokens=3))
                    except grpc.aio.AioRpcError:
                        failures += 1
                assert all(r.route.tier == pb.TIER_CLOUD and r.route.degraded for r in replies)
                assert all(r.route.reason == "edge-unavailable" for r in replies)
                stream = [c async for c in client.stream("streamed", max_new_tokens=3)]
                assert stream[-1].route.tier == pb.TIER_CLOUD
        assert failures == 0


async def test_router_fails_over_mid_run_without_client_errors(
    model_server, server_process, router_config, running_router
) -> None:
    """The edge dies while the router is running: in-flight and later requests still succeed."""
    proc, edge_address = server_process("edge")
    async with model_server(tier="cloud", name="cloud") as cloud:
        config = router_config(
            "cascade", [("edge", edge_address, "edge"), ("cloud", cloud.address, "cloud")], cascade=ALWAYS_EDGE
        )
        async with running_router(config) as router, AsyncClient(router.address) as client:
            tiers = []
            for i in range(12):
                if i == 4:
                    proc.send_signal(signal.SIGKILL)
                tiers.append((await client.generate(f"request {i}", max_new_tokens=3)).route.tier)
            assert tiers[:4] == [pb.TIER_EDGE] * 4 and tiers[-1] == pb.TIER_CLOUD


async def test_no_fallback_when_disabled(model_server, router_config, running_router) -> None:
    async with model_server(tier="cloud") as cloud:
        config = router_config(
            "edge-only", [("edge", "127.0.0.1:1", "edge"), ("cloud", cloud.address, "cloud")], allowFallback=False
        )
        async with running_router(config) as router, AsyncClient(router.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.generate("private", max_new_tokens=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "fallback is off" in (caught.value.details() or "")


async def test_openai_http_api(model_server, router_config, running_router) -> None:
    async with model_server(tier="edge") as edge, model_server(tier="cloud") as cloud:
        config = router_config(
            "cascade", [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")], cascade=ALWAYS_EDGE
        )
        async with running_router(config, model_name="smol") as router, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{router.http_port}"
            body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
            async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200 and resp.headers["X-Stratus-Tier"] == "edge"
                data = await resp.json()
            assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
            assert data["usage"]["completion_tokens"] <= 5 and data["stratus"]["reason"] == "confident"
            async with http.post(
                f"{base}/v1/chat/completions", json={**body, "stream": True}, headers={"X-Stratus-Policy": "cloud-only"}
            ) as resp:
                lines = [line for line in (await resp.text()).splitlines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            events = [json.loads(line[6:]) for line in lines[:-1]]
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
            assert events[-1]["stratus"]["tier"] == "cloud" and events[-1]["choices"][0]["finish_reason"]
            streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
            async with http.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}) as resp:
                completion = await resp.json()
            assert completion["object"] == "text_completion" and "text" in completion["choices"][0]
            assert isinstance(streamed, str)
            for bad, fragment in [
                ({"messages": []}, "messages"),
                ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
                ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),  # the server's limit, in HTTP terms
            ]:
                path = "/v1/completions" if "prompt" in bad else "/v1/chat/completions"
                async with http.post(base + path, json=bad) as resp:
                    assert resp.status == 400
                    error = (await resp.json())["error"]
                    assert fragment in error["message"] and error["param"] == fragment
            async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
                again = await resp.json()
            assert again["stratus"]["cached"] and again["stratus"]["policy"] == "cascade"
            assert again["choices"] == data["choices"]
            async with http.post(f"{base}/v1/completions", data=b'{"prompt": "' + b"x" * (2 << 20) + b'"}') as resp:
                assert resp.status == 413
                assert (await resp.json())["error"]["type"] == "invalid_request_error"
            async with http.get(f"{base}/v1/models") as resp:
                assert (await resp.json())["data"][0]["id"] == "smol"
            async with http.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
            assert 'stratus_router_backend_up{backend="edge",tier="edge"} 1.0' in metrics
            assert "stratus_router_requests_total" in metrics


async def test_router_reports_unavailable_with_reasons(router_config, running_router) -> None:
    config = router_config("cascade", [("edge", "127.0.0.1:1", "edge"), ("cloud", "127.0.0.1:2", "cloud")])
    async with running_router(config) as router, AsyncClient(router.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate("anyone?", max_new_tokens=2)
        await asyncio.sleep(0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy cloud backend" in (caught.value.details() or "")


async def test_model_names_over_grpc(model_server, router_config, running_router) -> None:
    """The router answers to its own name (by policy) and to each tier's model name (that model only)."""
    async with model_server(tier="edge", name="small") as edge, model_server(tier="cloud", name="large") as cloud:
        config = router_config(
            "cascade", [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")], cascade=NEVER_EDGE
        )
        async with running_router(config, model_name="front") as router, AsyncClient(router.address) as client:
            info = await client.model_info()
            assert info.model == "front"
            assert sorted((b.name, b.model) for b in info.backends) == [("cloud", "large"), ("edge", "small")]
            by_policy = await client.generate("hi", max_new_tokens=2, model="front")
            assert (by_policy.route.policy, by_policy.route.escalated) == (pb.ROUTING_POLICY_CASCADE, True)
            pinned = await client.generate("hi", max_new_tokens=2, model="small")
            assert (pinned.route.tier, pinned.route.reason, pinned.model) == (pb.TIER_EDGE, "policy", "small")
            assert pinned.route.policy == pb.ROUTING_POLICY_EDGE_ONLY
            streamed = [c async for c in client.stream("hi", max_new_tokens=2, model="large")]
            assert streamed[-1].route.tier == pb.TIER_CLOUD and streamed[-1].model == "large"
            for model, policy, code in [
                ("nobody", None, grpc.StatusCode.NOT_FOUND),
                ("small", "cloud-only", grpc.StatusCode.INVALID_ARGUMENT),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.generate("hi", max_new_tokens=2, model=model, policy=policy)
                assert caught.value.code() == code
                assert dict(caught.value.trailing_metadata() or ())["stratus-field"] in ("model", "policy")
            scored = await client.score(" there", "hi", tier="edge")
            assert scored.model == "small"


async def test_unknown_enum_values_are_refused(model_server, router_config, running_router) -> None:
    async with model_server(tier="cloud") as cloud:
        config = router_config("cloud-only", [("cloud", cloud.address, "cloud")])
        async with running_router(config) as router, grpc.aio.insecure_channel(router.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            for call in (
                stub.Generate(pb.GenerateRequest(prompt="x", policy=99)),
                stub.Score(pb.ScoreRequest(request=pb.GenerateRequest(prompt="x"), continuation="y", tier=99)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "99" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.GenerateStream(pb.GenerateRequest(prompt="x", policy=7)):
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def requests_counted(metrics: str, code: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("stratus_router_requests_total{") and f'code="{code}"' in line
    )


async def test_client_gone_stops_generation_and_every_request_is_counted(
    model_server, router_config, running_router
) -> None:
    """An HTTP caller that disconnects cancels its generation; cancelled and timed-out requests are counted."""
    async with model_server(tier="cloud", max_new_tokens=100000) as cloud:
        config = router_config("cloud-only", [("cloud", cloud.address, "cloud")], cache={"enabled": False})
        async with running_router(config) as router, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{router.http_port}"
            body = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 100000}
            post = asyncio.ensure_future(http.post(f"{base}/v1/chat/completions", json=body))
            assert cloud.engine is not None
            for _ in range(1000):
                if cloud.engine.active:  # generating
                    break
                await asyncio.sleep(0.02)
            post.cancel()  # the client hangs up
            with pytest.raises(asyncio.CancelledError):
                await post
            for _ in range(600):  # 30 s; the whole answer would take minutes
                cancelled = cloud.metrics.registry.get_sample_value(
                    "stratus_server_requests_total", {"method": "Generate", "code": "CANCELLED"}
                )
                if cancelled == 1.0 and not cloud.engine.active:
                    break
                await asyncio.sleep(0.05)
            assert cancelled == 1.0 and cloud.engine.active == 0
            generated = cloud.metrics.registry.get_sample_value("stratus_server_generated_tokens_total") or 0.0
            assert generated < 100000
            async with AsyncClient(router.address) as client:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.generate("Go on", max_new_tokens=100000, timeout=0.5)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await client.generate("fine", max_new_tokens=2)
            counted: dict[str, float] = {}
            for _ in range(100):  # the router counts a timed-out call when its handler unwinds
                async with http.get(f"{base}/metrics") as resp:
                    metrics = await resp.text()
                counted = {code: requests_counted(metrics, code) for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")}
                if counted["DEADLINE_EXCEEDED"]:
                    break
                await asyncio.sleep(0.05)
            assert counted == {"OK": 1.0, "CANCELLED": 1.0, "DEADLINE_EXCEEDED": 1.0}
