"""Where an idle request's first token goes between the client and the server (a diagnosis, not a benchmark of record).

`python tests/bench/ttft_path.py [--device cuda] [--tokenizer DIR]` first times a minimal gRPC stream on this host
(our proto and client; a servicer that answers at once): the floor gRPC itself sets. Then it starts the model server
as `make bench-serve` does (the 135M architecture with random weights; its engine in a process of its own) and sends
one request at a time from a client process (64-token prompts, 4 new tokens), taking timestamps at each hand-over,
on one monotonic clock: the client's call, the servicer's entry, the request's arrival at the engine's frontend
(after tokenizing; where the server's TTFT starts), the first token's receipt from the engine (where it ends), the
frontend's event, the servicer's yield, and the client's receipt. It prints the median of each stretch. The
server's own methods are wrapped to take the timestamps; nothing else changes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from stratus_workers.client import client as client_module
from stratus_workers.models.tiny import SMOLLM2_135M, random_loaded
from stratus_workers.protocol import servicer as servicer_module
from stratus_workers.serve import engine as engine_module
from stratus_workers.serve import server as server_module

pb = client_module.pb
SKIP = 5  # the first requests warm the path up

CLIENT = r"""
import asyncio, json, sys, time
from stratus_workers.client import AsyncClient

async def main(address, n, prompt):
    out = []
    async with AsyncClient(address, timeout=60) as client:
        await client.model_info()
        for i in range(n):
            sent, first = time.monotonic(), None
            async for chunk in client.stream(prompt + f" {i}", max_new_tokens=4, request_id=f"r{i}"):
                if first is None and chunk.text:
                    first = time.monotonic()
            out.append(dict(rid=f"r{i}", sent=sent, first=first))
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


async def run_client(address: str, n: int, prompt: str) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, address, str(n), prompt, stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    results: list[dict[str, Any]] = json.loads(out)
    return results[SKIP:]


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.3f} ms"


async def minimal_stream(prompt: str, n: int) -> None:
    entries: dict[str, float] = {}

    class Answering:
        async def ModelInfo(self, request: Any, context: Any) -> Any:
            return pb.ModelInfoResponse()

        async def GenerateStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
            entries[request.request_id] = time.monotonic()
            yield pb.GenerateStreamResponse(text="hi")
            yield pb.GenerateStreamResponse(text=" there")

    answering = Answering()
    for method in servicer_module.SERVICE.methods:
        if not hasattr(answering, method.name):
            setattr(answering, method.name, None)
    server = grpc.aio.server()
    servicer_module.add_inference_servicer(answering, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = await run_client(f"127.0.0.1:{port}", n, prompt)
    await server.stop(0)
    print(f"minimal gRPC stream: client call to servicer {ms([entries[r['rid']] - r['sent'] for r in results])}, "
          f"to the first message {ms([r['first'] - r['sent'] for r in results])}")


async def model_server(prompt: str, n: int, device: str, tokenizer: str | None) -> None:
    marks: dict[str, dict[str, float]] = {}
    stamps: list[tuple[float, float, float]] = []
    last: dict[str, Any] = {}
    generate_stream = server_module.InferenceServicer.GenerateStream
    submit = engine_module.AsyncEngine._submit
    stream = engine_module.AsyncEngine.stream

    async def timed_generate_stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        mark = marks.setdefault(request.request_id, {})
        mark["entry"] = time.monotonic()
        async for response in generate_stream(self, request, context):
            if "yield" not in mark and response.text:
                mark["yield"] = time.monotonic()
            yield response

    def timed_submit(self: Any, *args: Any) -> Any:
        last["stream"] = submit(self, *args)
        return last["stream"]

    async def timed_stream(self: Any, *args: Any) -> AsyncIterator[Any]:
        first = True
        async for event in stream(self, *args):
            if first:
                st = last["stream"]
                stamps.append((st.arrived, st.first_seen, time.monotonic()))
                first = False
            yield event

    server_module.InferenceServicer.GenerateStream = timed_generate_stream  # type: ignore[method-assign]
    engine_module.AsyncEngine._submit = timed_submit  # type: ignore[method-assign]
    engine_module.AsyncEngine.stream = timed_stream  # type: ignore[method-assign]
    dtype = "bfloat16" if device == "cuda" else "float32"
    loader = functools.partial(random_loaded, SMOLLM2_135M, seed=0, dtype=dtype, device=device, name="bench",
                               tokenizer_dir=tokenizer)
    config = server_module.ServerSettings(model="bench", name="bench", port=0, http_port=0, engine="process",
                                          log_level="warning", max_batch_size=64)
    server = server_module.ModelServer(config, loader=loader)
    await server.start()
    try:
        results = await run_client(server.address, n, prompt)
    finally:
        await server.stop(0.5)
    parts: dict[str, list[float]] = {}
    for r, (arrived, first_seen, event) in zip(results, stamps[SKIP:], strict=True):
        mark = marks[r["rid"]]
        for name, value in (
            ("client call to servicer", mark["entry"] - r["sent"]),
            ("servicer to arrival (tokenizing)", arrived - mark["entry"]),
            ("arrival to first token (server TTFT)", first_seen - arrived),
            ("first token to its event", event - first_seen),
            ("event to the servicer's yield", mark["yield"] - event),
            ("yield to the client", r["first"] - mark["yield"]),
            ("the client's TTFT", r["first"] - r["sent"]),
        ):
            parts.setdefault(name, []).append(value)
    print(f"model server (135M random, {device}, engine process), one request at a time, medians:")
    for name, values in parts.items():
        print(f"  {name:38s} {ms(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the bundled model's)")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    prompt = " ".join(["word"] * 60)
    asyncio.run(minimal_stream(prompt, args.requests))
    asyncio.run(model_server(prompt, args.requests, args.device, args.tokenizer))


if __name__ == "__main__":
    main()
