"""The operator's per-server certificates under a real gRPC TLS stack: only the router may dial a server, and the
router reaches the server it names, not another one holding a certificate of the same CA."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from operator_harness import ROOT

from stratus_operator.render import RenderOptions
from stratus_operator.spec import LLMDeployment
from stratus_operator.tls import Identity, identities, issue_ca_secret, issue_server_secret
from stratus_workers.security import TLSFiles

pytestmark = pytest.mark.integration


def files(tmp: Path, secret: dict[str, Any]) -> TLSFiles:
    """A Secret's keys as the files a pod sees at /etc/stratus-tls."""
    tmp.mkdir()
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp / key).write_bytes(base64.b64decode(secret["data"][key]))
    return TLSFiles(tmp / "tls.crt", tmp / "tls.key", tmp / "ca.crt")


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, tuple[Identity, TLSFiles]]:
    manifest = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    manifest["metadata"].update(namespace="team-a", uid="u")
    d = LLMDeployment.from_manifest(manifest)
    ca = issue_ca_secret(d, RenderOptions())
    return {i.name: (i, files(tmp_path / i.name, issue_server_secret(d, RenderOptions(), i, ca)))
            for i in identities(d)}


@pytest.fixture()
async def cloud_server(pki: dict[str, tuple[Identity, TLSFiles]]) -> AsyncIterator[int]:
    """A gRPC server with the cloud server's Secret, requiring client certificates (as the model server does)."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", pki["smollm2-cloud"][1].server_credentials())
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def check(port: int, client: TLSFiles, dialled: str) -> bool:
    options = [("grpc.ssl_target_name_override", dialled)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", client.channel_credentials(), options=options) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_only_the_router_reaches_a_server_and_only_the_one_it_names(
        cloud_server: int, pki: dict[str, tuple[Identity, TLSFiles]]) -> None:
    router, edge = pki["smollm2-router"][1], pki["smollm2-edge-int8"][1]
    assert await check(cloud_server, router, "smollm2-cloud.team-a.svc")
    # An edge node's certificate (server use only) does not get in as a client, though the same CA signed it.
    assert not await check(cloud_server, edge, "smollm2-cloud.team-a.svc")
    # The router dialling the edge server's name refuses the cloud server's certificate.
    assert not await check(cloud_server, router, "smollm2-edge-int8.team-a.svc")
