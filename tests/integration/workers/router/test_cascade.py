"""Cascade early exit over real servers: the router stops the edge once its answer can only escalate, and
decides exactly as the rule over the edge's whole answer does (recorded from the same edge beforehand), under
the mean rule (with and without the probe) and the window and running-mean rules."""

from __future__ import annotations

import statistics

import aiohttp
import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.client import AsyncClient
from stratus_workers.router.config import CascadeSettings
from stratus_workers.router.policy import judge_edge_answer, mean_logprob, running_confidence, window_confidence

pytestmark = pytest.mark.integration

WORDS = ["sky", "sea", "tree", "rock", "wind", "snow", "sun", "moon"]
PROMPTS = [f"question {i}: {word}" for i, word in enumerate(WORDS)]
MAX_NEW = 24


async def counter(http: aiohttp.ClientSession, port: int, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_early_exit_keeps_every_decision_of_the_whole_answer_rule(
    model_server, router_config, running_router
) -> None:
    async with (
        model_server(tier="edge", name="edge") as edge,
        model_server(tier="cloud", name="cloud") as cloud,
        AsyncClient(edge.address) as direct,
        aiohttp.ClientSession() as http,
    ):
        # The edge's whole answers, as the cascade judged them before early exit.
        recorded = {}
        for prompt in PROMPTS:
            answer = await direct.generate(prompt, max_new_tokens=MAX_NEW, logprobs=True)
            recorded[prompt] = [lp.logprob for lp in answer.logprobs]
        means = sorted(mean_logprob(lps) for lps in recorded.values())
        stretches = sorted(window_confidence(lps, 4) for lps in recorded.values())
        runs = sorted(running_confidence(lps) for lps in recorded.values())
        # Thresholds between the answers (some kept, some escalated near their end), one that escalates
        # everything within a few tokens, the same with the opt-in probe, and the window and running-mean rules
        # between their answers.
        cases = [
            ({"confidenceThreshold": statistics.median(means)}, "median"),
            ({"confidenceThreshold": means[1] + 1e-4}, "low"),
            ({"confidenceThreshold": -1.0}, "strict"),
            ({"confidenceThreshold": means[-2] - 1e-4, "probeTokens": 3}, "probe"),
            ({"confidenceThreshold": statistics.median(stretches), "windowTokens": 4}, "window"),
            ({"confidenceThreshold": statistics.median(runs), "runningMean": True}, "running"),
        ]
        backends = [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")]
        kept = escalated = stopped = 0
        for cascade, name in cases:
            settings = CascadeSettings.model_validate(cascade)
            config = router_config("cascade", backends, cascade=cascade, cache={"enabled": False})
            async with running_router(config) as router, AsyncClient(router.address) as client:
                for prompt, logprobs in recorded.items():
                    reply = await client.generate(prompt, max_new_tokens=MAX_NEW)
                    expected = judge_edge_answer(logprobs, settings)
                    assert reply.route.escalated == expected.escalate, (name, prompt, expected)
                    assert reply.route.reason == expected.reason, (name, prompt)
                    assert reply.route.tier == (pb.TIER_CLOUD if expected.escalate else pb.TIER_EDGE)
                    if not expected.escalate:
                        assert reply.route.confidence == pytest.approx(expected.confidence, abs=1e-6)
                        kept += 1
                    else:
                        escalated += 1
                stops = await counter(http, router.http_port, "stratus_router_edge_stops_total")
                spent = await counter(http, router.http_port, "stratus_router_escalated_edge_tokens_total")
                whole = sum(len(lps) for lps in recorded.values() if judge_edge_answer(lps, settings).escalate)
                assert spent <= whole
                if name in ("window", "running"):  # an escalated answer stops where its rule settles
                    assert stops > 0, (name, stops)
                if name in ("strict", "probe"):  # these stop the edge well before its answer ends
                    assert stops > 0 and spent < whole / 2, (name, stops, spent, whole)
                stopped += int(stops)
        assert kept and escalated and stopped


async def test_a_cascade_without_a_cloud_lets_the_edge_finish(model_server, router_config, running_router) -> None:
    async with model_server(tier="edge", name="edge") as edge, AsyncClient(edge.address) as direct:
        whole = await direct.generate("no cloud here", max_new_tokens=MAX_NEW)
        config = router_config(
            "cascade",
            [("edge", edge.address, "edge"), ("cloud", "127.0.0.1:9", "cloud")],
            cascade={"confidenceThreshold": -0.001},
            cache={"enabled": False},
        )
        async with running_router(config) as router, AsyncClient(router.address) as client:
            reply = await client.generate("no cloud here", max_new_tokens=MAX_NEW)
    assert (reply.route.tier, reply.route.reason, reply.route.degraded) == (pb.TIER_EDGE, "cloud-unavailable", True)
    assert (reply.text, reply.usage.completion_tokens) == (whole.text, whole.usage.completion_tokens)
