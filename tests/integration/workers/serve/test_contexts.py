"""Speculative decoding through the router with both servers' engines in processes of their own, so every Draft
and Verify context crosses the engine channel as a delta on the session's last one (serve/contexts.py): greedy
output equals cloud-only, token for token, and every session is released on both sides."""

from __future__ import annotations

import pytest

from stratus_workers.client import AsyncClient

pytestmark = pytest.mark.integration

PROMPTS = ["The weather today", "Numbers: 1 2 3", "A long time ago", "def main():"]


async def test_speculative_greedy_over_engine_processes_equals_cloud_only(
    model_server, draft_model_dir, tiny_model_dir, router_config, running_router
) -> None:
    async with (
        model_server(tier="cloud", name="cloud", engine="process") as cloud,
        model_server(tier="edge", name="edge", model=str(draft_model_dir), engine="process") as edge,
    ):
        assert cloud.engine is not None and edge.engine is not None
        assert cloud.engine.mode == edge.engine.mode == "process" and cloud.engine.delta_contexts
        config = router_config(
            "speculative", [("edge", edge.address, "edge"), ("cloud", cloud.address, "cloud")], cache={"enabled": False}
        )
        config = config.model_copy(update={"tokenizer": str(tiny_model_dir)})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            rounds = tokens = 0
            for prompt in PROMPTS:
                ours = await client.generate(prompt, max_new_tokens=40, logprobs=True)
                alone = await client.generate(prompt, max_new_tokens=40, policy="cloud-only", logprobs=True)
                assert ours.text == alone.text, prompt
                assert [lp.token_id for lp in ours.logprobs] == [lp.token_id for lp in alone.logprobs]
                assert ours.route.reason == "speculative" and ours.route.accepted_tokens > 0
                rounds, tokens = rounds + ours.route.rounds, tokens + ours.usage.completion_tokens
        assert 1 < rounds < tokens  # several rounds a request: later rounds sent their contexts as deltas
        for server in (cloud, edge):  # every session ended: released by the engine, forgotten by the frontend
            assert server.engine is not None
            assert server.engine.stats.sessions == 0 and len(server.engine.contexts) == 0
