"""Cloud-edge cooperation through the router: speculative decoding, the output cache, the link delay."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import grpc
import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.client import AsyncClient

pytestmark = pytest.mark.integration

PROMPTS = [
    "The weather today",
    "Numbers: 1 2 3",
    "A long time ago",
    "Dear friend,",
    "def main():",
    "Recipe for bread",
    "The capital of",
    "In the beginning",
    "Question: why?",
    "Once",
    "Hello hello hello",
    "Zebras and lions",
]


# The edge's draft model on either engine: torch, or llama.cpp serving it as a q8_0 GGUF artifact.
EDGE_DRAFTS = pytest.mark.parametrize("edge_draft", ["draft_model_dir", "draft_gguf_dir"])


@EDGE_DRAFTS
async def test_speculative_greedy_equals_cloud_only(
    model_server, edge_draft, tiny_model_dir, router_config, running_router, request
) -> None:
    draft_model_dir = request.getfixturevalue(edge_draft)
    async with (
        model_server(tier="cloud", name="cloud") as cloud,
        model_server(tier="edge", name="edge", model=str(draft_model_dir)) as edge,
    ):
        config = router_config(
            "speculative", [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")], cache={"enabled": False}
        )
        config = config.model_copy(update={"tokenizer": str(tiny_model_dir)})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            drafted = accepted = rounds = tokens = 0
            for prompt in PROMPTS:
                ours = await client.generate(prompt, max_new_tokens=20, logprobs=True)
                alone = await client.generate(prompt, max_new_tokens=20, policy="cloud-only", logprobs=True)
                assert ours.text == alone.text, prompt
                assert [lp.token_id for lp in ours.logprobs] == [lp.token_id for lp in alone.logprobs]
                assert ours.finish_reason == alone.finish_reason
                route = ours.route
                assert (route.tier, route.reason, route.policy) == (
                    pb.TIER_CLOUD,
                    "speculative",
                    pb.ROUTING_POLICY_SPECULATIVE,
                )
                assert route.backend == "edge+cloud" and route.rounds <= ours.usage.completion_tokens
                drafted, accepted, rounds = (
                    drafted + route.draft_tokens,
                    accepted + route.accepted_tokens,
                    rounds + route.rounds,
                )
                tokens += ours.usage.completion_tokens
            streamed = [c async for c in client.stream(PROMPTS[0], max_new_tokens=20, logprobs=True)]
            whole = await client.generate(PROMPTS[0], max_new_tokens=20, logprobs=True)
            assert "".join(c.text for c in streamed) == whole.text
            assert [lp.token_id for c in streamed for lp in c.logprobs] == [lp.token_id for lp in whole.logprobs]
            assert streamed[-1].route.reason == "speculative"
        # The perturbed draft agrees often but not always: both branches of verification ran.
        assert 0 < accepted < drafted
        assert rounds < tokens  # fewer cloud round trips than tokens: the point of drafting
        assert cloud.engine is not None and cloud.engine.stats.sessions == 0  # every session was released


@EDGE_DRAFTS
async def test_speculative_sampling_with_seed_is_reproducible(
    model_server, edge_draft, tiny_model_dir, router_config, running_router, request
) -> None:
    draft_model_dir = request.getfixturevalue(edge_draft)
    async with model_server(tier="cloud") as cloud, model_server(tier="edge", model=str(draft_model_dir)) as edge:
        config = router_config(
            "speculative",
            [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")],
            cache={"enabled": False},
            speculative={"topK": 8},
        )
        config = config.model_copy(update={"tokenizer": str(tiny_model_dir)})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            first = await client.generate("Sample me", max_new_tokens=12, temperature=0.8, seed=5)
            second = await client.generate("Sample me", max_new_tokens=12, temperature=0.8, seed=5)
        assert first.text == second.text and first.route.draft_tokens > 0


async def test_speculative_survives_the_edge_dying(
    model_server, server_process, tiny_model_dir, router_config, running_router
) -> None:
    proc, edge_address = server_process("edge")
    async with model_server(tier="cloud") as cloud:
        config = router_config(
            "speculative", [("edge", edge_address, "edge"), ("cloud", cloud.address, "cloud")], cache={"enabled": False}
        )
        config = config.model_copy(update={"tokenizer": str(tiny_model_dir)})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            before = await client.generate("Exact anyway", max_new_tokens=16)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            after = await client.generate("Exact anyway", max_new_tokens=16)
            alone = await client.generate("Exact anyway", max_new_tokens=16, policy="cloud-only")
        assert before.text == after.text == alone.text
        assert before.route.reason == "speculative" and not before.route.degraded
        assert after.route.degraded and after.route.reason in ("edge-unavailable", "edge-lost")


async def test_speculative_moves_to_another_cloud_when_its_verifier_dies_mid_answer(
    model_server, server_process, draft_model_dir, tiny_model_dir, router_config, running_router
) -> None:
    proc, doomed_address = server_process("cloud")
    async with (
        model_server(tier="cloud", name="spare") as spare,
        model_server(tier="edge", name="edge", model=str(draft_model_dir)) as edge,
    ):
        backends = [("edge", edge.address, "edge"), ("doomed", doomed_address, "cloud")]
        config = router_config(
            "speculative",
            [*backends, ("spare", spare.address, "cloud")],
            cache={"enabled": False},
            link={"delayMs": 400},  # each round waits this long: time to kill the verifier between rounds
        )
        # No health check in between: the dead verifier is found out by the next Verify, mid-answer.
        config = config.model_copy(update={"tokenizer": str(tiny_model_dir), "health_interval_seconds": 600})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            spare_state = next(b for b in router.pool.backends if b.name == "spare")
            spare_state.in_flight += 1  # looks busier, so the first round goes to the doomed server
            chunks = []
            async for chunk in client.stream("Exact anyway", max_new_tokens=16):
                if not chunks:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                    spare_state.in_flight -= 1
                chunks.append(chunk)
            doomed = next(b for b in router.pool.backends if b.name == "doomed")
            assert doomed.failures == 1 and not doomed.healthy  # a Verify found it dead (health checks are off)
            alone = await client.generate("Exact anyway", max_new_tokens=16, policy="cloud-only")
        route = chunks[-1].route
        assert "".join(c.text for c in chunks) == alone.text and len(chunks) > 2
        assert (route.reason, route.degraded, route.backend) == ("speculative", False, "edge+spare")
        assert route.rounds > 1 and alone.route.backend == "spare"


async def test_speculative_without_tokenizer_degrades_to_cloud(model_server, router_config, running_router) -> None:
    async with model_server(tier="cloud") as cloud, model_server(tier="edge") as edge:
        config = router_config("speculative", [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")])
        async with running_router(config) as router, AsyncClient(router.address) as client:
            reply = await client.generate("no tokenizer", max_new_tokens=4)
        assert (reply.route.tier, reply.route.reason, reply.route.degraded) == (pb.TIER_CLOUD, "no-tokenizer", True)


async def test_options_speculation_cannot_carry_go_to_the_cloud(
    model_server, draft_model_dir, tiny_model_dir, router_config, running_router
) -> None:
    """Draft and Verify carry temperature, top_p and seed only: penalties, bias, alternatives and echo are
    answered by the cloud alone, never silently dropped."""
    async with (
        model_server(tier="cloud", name="cloud") as cloud,
        model_server(tier="edge", name="edge", model=str(draft_model_dir)) as edge,
    ):
        config = router_config(
            "speculative", [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")], cache={"enabled": False}
        )
        config = config.model_copy(update={"tokenizer": str(tiny_model_dir)})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            for options in (
                {"presence_penalty": 2.0},
                {"frequency_penalty": 1.0},
                {"logit_bias": {42: 100.0}},
                {"logprobs": True, "top_logprobs": 2},
                {"echo": True},
            ):
                ours = await client.generate("The sky is", max_new_tokens=8, **options)
                alone = await client.generate("The sky is", max_new_tokens=8, policy="cloud-only", **options)
                assert (ours.route.reason, ours.route.tier) == ("options-not-speculative", pb.TIER_CLOUD), options
                assert ours.text == alone.text and list(ours.prompt_logprobs) == list(alone.prompt_logprobs)
                assert [list(lp.top_logprobs) for lp in ours.logprobs] == [
                    list(lp.top_logprobs) for lp in alone.logprobs
                ]
            plain = await client.generate("The sky is", max_new_tokens=8)
            assert plain.route.reason == "speculative"


async def test_output_cache_hits_and_expires(model_server, router_config, running_router) -> None:
    async with model_server(tier="cloud") as cloud:
        assert cloud.engine is not None
        config = router_config(
            "cloud-only", [("cloud", cloud.address, "cloud")], cache={"maxEntries": 2, "ttlSeconds": 0.5}
        )
        async with running_router(config) as router, AsyncClient(router.address) as client:
            first = await client.generate("cache me", max_new_tokens=6, request_id="a")
            # The server counts a call before its answer leaves (the engine's step count may still move).
            served = cloud.metrics.registry.get_sample_value(
                "stratus_server_requests_total", {"method": "Generate", "code": "OK"}
            )
            second = await client.generate("cache me", max_new_tokens=6, request_id="b")
            assert served == 1.0 and served == cloud.metrics.registry.get_sample_value(
                "stratus_server_requests_total", {"method": "Generate", "code": "OK"}
            )  # the model was not asked
            assert 0 <= second.timing.ttft_ms <= second.timing.total_ms
            assert second.route.cached and not first.route.cached
            assert (second.text, second.request_id) == (first.text, "b")
            streamed = [c async for c in client.stream("cache me", max_new_tokens=6)]
            assert streamed[-1].route.cached and "".join(c.text for c in streamed) == first.text
            assert 0 <= streamed[-1].timing.ttft_ms <= streamed[-1].timing.total_ms
            other = await client.generate("cache me", max_new_tokens=7)  # other parameters: another entry
            sampled = await client.generate("cache me", max_new_tokens=6, temperature=1.0)  # not deterministic
            sampled_again = await client.generate("cache me", max_new_tokens=6, temperature=1.0)
            assert not other.route.cached and not sampled.route.cached and not sampled_again.route.cached
            await asyncio.sleep(0.6)
            expired = await client.generate("cache me", max_new_tokens=6)
            assert not expired.route.cached
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{router.http_port}/metrics") as resp,
            ):
                metrics = await resp.text()
        assert 'stratus_router_cache_lookups_total{result="hit"} 2.0' in metrics
        assert "stratus_router_cache_hit_ratio" in metrics


async def test_link_delay_applies_to_the_cloud_only(model_server, router_config, running_router) -> None:
    async with model_server(tier="cloud") as cloud, model_server(tier="edge") as edge:
        config = router_config(
            "cloud-only",
            [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")],
            link={"delayMs": 150},
            cache={"enabled": False},
        )
        async with running_router(config) as router, AsyncClient(router.address) as client:
            far = await client.generate("far", max_new_tokens=1)
            far_streamed = [c async for c in client.stream("far away", max_new_tokens=1)]
            near = await client.generate("near", max_new_tokens=1, policy="edge-only")
        assert far.timing.total_ms >= 150  # a lower bound only: sleeping never takes less
        assert far_streamed[-1].timing.total_ms >= 150
        assert near.route.tier == pb.TIER_EDGE


async def test_router_refuses_draft_and_verify(model_server, router_config, running_router) -> None:
    async with model_server(tier="cloud") as cloud:
        async with (
            running_router(router_config("cloud-only", [("cloud", cloud.address, "cloud")])) as router,
            grpc.aio.insecure_channel(router.address) as channel,
        ):
            from stratus_workers.api import inference_pb2_grpc as pb_grpc

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.InferenceStub(channel).Draft(pb.DraftRequest(session_id="x", context=[1], max_tokens=1))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_router_scores_with_the_requested_tier(
    model_server, draft_model_dir, router_config, running_router
) -> None:
    async with (
        model_server(tier="cloud", name="cloud") as cloud,
        model_server(tier="edge", name="edge", model=str(draft_model_dir)) as edge,
    ):
        config = router_config("cascade", [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")])
        async with running_router(config) as router, AsyncClient(router.address) as client:
            by_cloud = await client.score(" an answer", "A question?")
            by_edge = await client.score(" an answer", "A question?", tier="edge")
        assert (by_cloud.model, by_edge.model) == ("cloud", "edge")
        assert by_cloud.tokens == by_edge.tokens > 0 and by_cloud.logprobs != by_edge.logprobs
