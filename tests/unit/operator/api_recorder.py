"""A loopback HTTP server standing in for the API server in unit tests: it records requests, answers as told."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from aiohttp import web

from stratus_operator.kube import Kube


class Recorder:
    """A loopback HTTP server that records each request and answers with the next canned response."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: list[tuple[int, dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.requests.append({"method": request.method, "path": request.path, "query": dict(request.query),
                              "content_type": request.headers.get("Content-Type", ""),
                              "body": json.loads(body) if body else None})
        status, payload = self.answers.pop(0) if self.answers else (200, {})
        return web.json_response(payload, status=status)


@pytest.fixture()
async def api_server() -> AsyncIterator[tuple[Recorder, Kube]]:
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kube = Kube(lambda: kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token="t"))
    try:
        yield recorder, kube
    finally:
        await kube.close()
        await runner.cleanup()
