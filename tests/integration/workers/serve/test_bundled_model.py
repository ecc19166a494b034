"""The bundled SmolLM2-135M-Instruct served for real: a factual answer, and the same answer via the router."""

from __future__ import annotations

import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.client import AsyncClient
from stratus_workers.models.source import BUNDLED_SMOLLM2

pytestmark = [pytest.mark.slow, pytest.mark.integration]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def test_bundled_model_knows_the_capital_of_france(model_server, router_config, running_router) -> None:
    async with model_server(model=f"bundled://{BUNDLED_SMOLLM2}", tier="cloud", name="smollm2") as cloud:
        async with AsyncClient(cloud.address) as client:
            reply = await client.generate(messages=QUESTION, max_new_tokens=24)
            info = await client.model_info()
        assert "Paris" in reply.text
        assert reply.finish_reason == pb.FINISH_REASON_STOP
        assert info.parameters > 130_000_000 and info.vocab_size == 49152
        config = router_config("speculative", [("edge", cloud.address, "edge"), ("cloud", cloud.address, "cloud")],
                               cache={"enabled": False})
        config = config.model_copy(update={"tokenizer": f"bundled://{BUNDLED_SMOLLM2}"})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            routed = await client.generate(messages=QUESTION, max_new_tokens=24)
        # The same model drafting for itself: every draft token is accepted and the answer is unchanged.
        assert routed.text == reply.text
        assert routed.route.accepted_tokens == routed.route.draft_tokens > 0
