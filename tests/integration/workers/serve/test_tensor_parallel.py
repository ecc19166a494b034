"""Tensor parallel: a server over two ranks (gloo on the CPU) answers exactly as one process does."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from stratus_workers.client import AsyncClient

pytestmark = pytest.mark.integration

PROMPTS = ["The quick brown fox", "Once upon a time in a land far away there lived"]


@pytest.mark.parametrize("engine", ["thread", "process"])
async def test_two_ranks_answer_like_one(model_server: Any, server_process: Callable[..., Any], engine: str) -> None:
    """Rank 0 is the server process itself (engine thread) or the engine process it starts; rank 1 follows it."""
    async with model_server(max_batch_size=4) as single, AsyncClient(single.address) as client:
        expected = [(await client.generate(p, max_new_tokens=12)).text for p in PROMPTS]
    proc: subprocess.Popen[bytes]
    proc, address = server_process(tier="cloud", tensor_parallel=2, device="cpu", max_batch_size=4, engine=engine)
    try:
        async with AsyncClient(address) as client:
            for prompt, text in zip(PROMPTS, expected, strict=True):
                assert (await client.generate(prompt, max_new_tokens=12)).text == text
            # Streaming and a batch of two go through the same lead-and-follow calls.
            chunks = [c.text async for c in client.stream(PROMPTS[0], max_new_tokens=12)]
            assert "".join(chunks) == expected[0]
    finally:
        proc.send_signal(signal.SIGTERM)  # rank 0 stops, then releases rank 1 from follow()
        assert proc.wait(60) == 0
