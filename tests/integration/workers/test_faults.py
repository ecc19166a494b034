"""Faults and hostile input: nothing crashes, nothing leaks, and clients see no failures that can be avoided."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.client import AsyncClient
from stratus_workers.models import load_model
from stratus_workers.models.artifact import WEIGHTS_FILE, save_artifact
from stratus_workers.serve.core import _Seq
from stratus_workers.serve.engine import _Stream

pytestmark = pytest.mark.integration

ALWAYS_EDGE = {"confidenceThreshold": -100.0}
NEVER_EDGE = {"confidenceThreshold": -0.001}


async def raw_generate(address: str, payload: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/stratus.v1.Inference/Generate", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(payload, timeout=10)
    return caught.value


async def test_invalid_utf8_and_garbage_bytes(model_server, router_config, running_router) -> None:
    async with model_server(tier="cloud") as cloud:
        config = router_config("cloud-only", [("cloud", cloud.address, "cloud")])
        async with running_router(config) as router:
            for address in (cloud.address, router.address):
                bad_utf8 = await raw_generate(address, b"\x0a\x02\xff\xfe")  # prompt = bytes ff fe
                assert bad_utf8.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "valid UTF-8" in (bad_utf8.details() or "")
                garbage = await raw_generate(address, b"\xff\xff\xff\xff\xff")
                assert garbage.code() == grpc.StatusCode.INVALID_ARGUMENT
            async with AsyncClient(router.address) as client:
                assert (await client.generate("still fine", max_new_tokens=2)).usage.completion_tokens > 0


async def test_no_leaks_after_many_bad_and_abandoned_requests(model_server) -> None:
    async with model_server(max_batch_size=2, max_prompt_tokens=32, max_new_tokens=64) as server, \
            AsyncClient(server.address) as client:
        engine = server.engine
        assert engine is not None
        outcomes: dict[str, int] = {}

        async def one(i: int) -> None:
            try:
                kind = i % 5
                if kind == 0:
                    await client.generate("word " * 100, max_new_tokens=4)  # prompt too long
                elif kind == 1:
                    await client.generate("x", max_new_tokens=10_000)  # out of range
                elif kind == 2:
                    await client.generate("deadline", max_new_tokens=64, timeout=0.01)
                elif kind == 3:
                    stream = client.stream("vanish", max_new_tokens=64)
                    await stream.__anext__()
                    await stream.aclose()  # the client goes away mid-stream
                    outcomes["vanished"] = outcomes.get("vanished", 0) + 1
                    return
                else:
                    await client.generate("fine", max_new_tokens=3)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] = outcomes.get(exc.code().name, 0) + 1

        for batch in range(10):
            await asyncio.gather(*(one(batch * 10 + i) for i in range(10)))
        for _ in range(300):
            if engine.active == 0 and engine.waiting == 0:
                break
            await asyncio.sleep(0.02)
        assert (engine.active, engine.waiting, engine.stats.sessions) == (0, 0, 0)
        gc.collect()
        assert not [o for o in gc.get_objects() if type(o) in (_Seq, _Stream)]  # every request was released
        assert outcomes["INVALID_ARGUMENT"] == 40 and outcomes["ok"] == 20 and outcomes["vanished"] == 20
        assert outcomes.get("DEADLINE_EXCEEDED", 0) + outcomes.get("ok", 0) >= 20
        assert (await client.generate("after all that", max_new_tokens=3)).usage.completion_tokens > 0


async def test_killing_the_edge_under_load_loses_no_request(model_server, server_process, router_config,
                                                            running_router) -> None:
    proc, edge_address = server_process("edge")
    async with model_server(tier="cloud", name="cloud", max_batch_size=4) as cloud:
        config = router_config("cascade", [("edge", edge_address, "edge"), ("cloud", cloud.address, "cloud")],
                               cascade=ALWAYS_EDGE, cache={"enabled": False})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            tiers: list[int] = []
            failures: list[str] = []
            sent = 0

            async def user(uid: int) -> None:
                nonlocal sent
                for n in range(10):
                    sent += 1
                    try:
                        reply = await client.generate(f"user {uid} request {n}", max_new_tokens=6)
                        tiers.append(reply.route.tier)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(f"{exc.code().name}: {exc.details()}")

            async def killer() -> None:
                while len(tiers) < 8:
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGKILL)

            await asyncio.gather(*(user(u) for u in range(4)), killer())
        assert failures == [] and sent == 40
        assert tiers.count(pb.TIER_EDGE) >= 8 and tiers[-1] == pb.TIER_CLOUD


async def test_killing_the_cloud_keeps_cascade_answering_from_the_edge(model_server, server_process,
                                                                       router_config, running_router) -> None:
    proc, cloud_address = server_process("cloud")
    async with model_server(tier="edge", name="edge") as edge:
        config = router_config("cascade", [("edge", edge.address, "edge"), ("cloud", cloud_address, "cloud")],
                               cascade=NEVER_EDGE, cache={"enabled": False})
        async with running_router(config) as router, AsyncClient(router.address) as client:
            before = await client.generate("escalate me", max_new_tokens=4)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            after = [await client.generate(f"escalate me {i}", max_new_tokens=4) for i in range(5)]
            streamed = [c async for c in client.stream("escalate me streamed", max_new_tokens=4)]
        assert before.route.tier == pb.TIER_CLOUD and before.route.escalated
        for route in [reply.route for reply in after] + [streamed[-1].route]:
            assert (route.tier, route.reason, route.degraded) == (pb.TIER_EDGE, "cloud-unavailable", True)


def test_corrupt_artifact_is_refused_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    save_artifact(loaded.model, loaded.tokenizer, artifact, sparse=False)
    (artifact / "manifest.json").write_text(json.dumps({"format": "stratus-artifact/v1", "name": "broken"}))
    assert load_model(str(artifact), device="cpu").parameters > 0  # intact, it loads
    weights = artifact / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn copy
    cases = {"truncated weights": artifact}
    missing = tmp_path / "missing"
    shutil.copytree(artifact, missing)
    (missing / WEIGHTS_FILE).unlink()
    cases["missing weights"] = missing
    for what, path in cases.items():
        proc = subprocess.run([sys.executable, "-m", "stratus_workers.serve", "--model", str(path), "--port", "0",
                               "--http-port", "0", "--log-format", "text"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, what
        assert "error:" in proc.stderr and str(path) in proc.stderr, proc.stderr[-500:]
        assert "rerun" in proc.stderr or "corrupt" in proc.stderr, proc.stderr[-500:]


async def test_router_stays_up_when_an_edge_never_comes_up(model_server, router_config, running_router) -> None:
    async with model_server(tier="cloud") as cloud:
        config = router_config("cascade", [("edge", "127.0.0.1:9", "edge"), ("cloud", cloud.address, "cloud")])
        async with running_router(config) as router, AsyncClient(router.address) as client:
            replies = [await client.generate(f"q{i}", max_new_tokens=2) for i in range(3)]
        assert all(r.route.reason == "edge-unavailable" and r.route.tier == pb.TIER_CLOUD for r in replies)
