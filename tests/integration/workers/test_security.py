"""mTLS between router and model servers, bearer tokens for edge clients, counted rejections."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import grpc
import pytest

from stratus_workers.client import AsyncClient
from stratus_workers.security import SecurityError, TLSFiles, TokenStore, issue_ca, issue_cert, local_pki

pytestmark = pytest.mark.integration


@pytest.fixture
def pki(tmp_path: Path) -> TLSFiles:
    return local_pki(tmp_path / "pki")


def tls_flags(tls: TLSFiles) -> dict[str, str]:
    return {"tls_cert": str(tls.cert), "tls_key": str(tls.key), "tls_ca": str(tls.ca)}


async def test_mtls_links_and_bearer_tokens(model_server, router_config, running_router, pki, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per line\ns3cret-device-token\n")
    async with model_server(tier="cloud", name="cloud", **tls_flags(pki)) as cloud:
        config = router_config("cloud-only", [("cloud", cloud.address, "cloud")])
        async with running_router(config, tls=pki, client_tls=True, tokens=TokenStore(tokens)) as router:
            # The router reaches the server over mTLS; the caller authenticates with a token over TLS.
            async with AsyncClient(router.address, tls_ca=str(pki.ca), token="s3cret-device-token") as client:
                reply = await client.generate("hello", max_new_tokens=3)
                assert reply.usage.completion_tokens > 0
                assert await client.healthy()
            for token in (None, "wrong"):
                async with AsyncClient(router.address, tls_ca=str(pki.ca), token=token) as client:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await client.generate("hello", max_new_tokens=3)
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "bearer token" in (caught.value.details() or "")
                    assert await client.healthy()  # probes need no token
            # Rotating the Secret's file takes effect without a restart.
            tokens.write_text("rotated-token\n")
            os.utime(tokens, (1, 1))
            async with AsyncClient(router.address, tls_ca=str(pki.ca), token="rotated-token") as client:
                assert (await client.generate("again", max_new_tokens=2)).usage.completion_tokens > 0
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{router.http_port}/v1/completions"
                async with http.post(url, json={"prompt": "x", "max_tokens": 2}) as resp:
                    assert resp.status == 401
                headers = {"Authorization": "Bearer rotated-token"}
                async with http.post(url, json={"prompt": "x", "max_tokens": 2}, headers=headers) as resp:
                    assert resp.status == 200
                async with http.get(f"http://127.0.0.1:{router.http_port}/metrics") as resp:
                    metrics = await resp.text()
        assert 'stratus_router_auth_rejections_total{surface="grpc"} 2.0' in metrics
        assert 'stratus_router_auth_rejections_total{surface="http"} 1.0' in metrics


async def test_model_server_refuses_callers_without_our_certificate(model_server, pki, tmp_path) -> None:
    other_ca, other_key = issue_ca(tmp_path / "other", name="someone-else")
    stranger_cert, stranger_key = issue_cert(tmp_path / "other", "stranger", other_ca, other_key, ["127.0.0.1"])
    async with model_server(tier="edge", **tls_flags(pki)) as edge:
        async with AsyncClient(edge.address, tls_ca=str(pki.ca), tls_cert=str(pki.cert), tls_key=str(pki.key)) as ok:
            assert (await ok.generate("hi", max_new_tokens=2)).usage.completion_tokens > 0
        attempts = [
            AsyncClient(edge.address, timeout=3),  # plaintext
            AsyncClient(edge.address, tls_ca=str(pki.ca), timeout=3),  # TLS but no client certificate
            AsyncClient(edge.address, tls_ca=str(pki.ca), tls_cert=str(stranger_cert), tls_key=str(stranger_key),
                        timeout=3),  # a certificate from another CA
        ]
        for client in attempts:
            async with client:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.generate("hi", max_new_tokens=2)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_partial_or_missing_tls_settings_fail_fast(tmp_path: Path, pki: TLSFiles) -> None:
    with pytest.raises(SecurityError, match="missing: tls_ca"):
        TLSFiles.from_paths(str(pki.cert), str(pki.key), "")
    with pytest.raises(SecurityError, match="does not exist"):
        TLSFiles.from_paths(str(pki.cert), str(pki.key), str(tmp_path / "nope.crt"))
    assert TLSFiles.from_paths("", "", "") is None
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    with pytest.raises(SecurityError, match="holds no token"):
        TokenStore(empty)
