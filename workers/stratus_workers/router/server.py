"""Router process: the Inference gRPC service and the OpenAI-style HTTP API over one Router."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.models import load_tokenizer
from stratus_workers.ops import ops_app, start_http
from stratus_workers.router.backends import BackendPool
from stratus_workers.router.config import RouterConfig
from stratus_workers.router.openai import add_openai_routes
from stratus_workers.router.router import TIER_PB, Router, RouterError
from stratus_workers.serve.server import SERVICE_NAME

log = logging.getLogger(__name__)


@dataclass
class RouterSettings:
    """Router process settings; each is also read from STRATUS_<NAME>."""

    config: str = field(metadata={"help": "Path of the RouterConfig JSON (policy, backends)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0 in a pod)."})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)."})
    http_port: int = field(default=8080, metadata={"help": "HTTP port: OpenAI API, /healthz, /readyz, /metrics."})
    model_name: str = field(default="stratus", metadata={"help": "Model name the HTTP API reports."})
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "Largest gRPC message accepted."})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error."})
    log_format: str = field(default="json", metadata={"help": "json or text.", "choices": ["json", "text"]})


class RouterServicer(pb_grpc.InferenceServicer):
    def __init__(self, router: Router, model_name: str) -> None:
        self.router = router
        self.model_name = model_name

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        try:
            return await self.router.generate(request, context.time_remaining())
        except RouterError as exc:
            await context.abort(exc.code, exc.message)
            raise

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            async for chunk in self.router.stream(request, context.time_remaining()):
                yield chunk
        except RouterError as exc:
            await context.abort(exc.code, exc.message)

    async def Draft(self, request: pb.DraftRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.DraftResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the router drafts through its edge servers; call one")
        raise AssertionError("unreachable")

    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.VerifyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the router verifies through its cloud servers; call one")
        raise AssertionError("unreachable")

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfoResponse:
        info = pb.ModelInfoResponse(model=self.model_name)
        for b in self.router.pool.backends:
            info.backends.add(name=b.name, address=b.config.address, tier=TIER_PB[b.tier], healthy=b.healthy)
        return info


class RouterServer:
    """Owns the backend pool, the router, the gRPC server and the HTTP server of one process."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        http_port: int = 0,
        model_name: str = "stratus",
        max_message_bytes: int = 4 << 20,
        tokenizer: Any = None,
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.http_port = http_port
        self.model_name = model_name
        self.max_message_bytes = max_message_bytes
        self.tokenizer = tokenizer
        self.pool = BackendPool(
            config.backends, interval=config.health_interval_seconds, max_message_bytes=max_message_bytes
        )
        self.router = Router(config, self.pool, tokenizer)
        self.health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._http: Any = None

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> RouterServer:
        config = RouterConfig.from_file(Path(settings.config))
        return cls(
            config,
            host=settings.host,
            port=settings.port,
            http_port=settings.http_port,
            model_name=settings.model_name,
            max_message_bytes=settings.max_message_bytes,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _ready(self) -> tuple[bool, str]:
        healthy = [b.name for b in self.pool.backends if b.healthy]
        if not healthy:
            return False, "no healthy backend"
        return True, "healthy backends: " + ", ".join(healthy)

    async def start(self) -> None:
        if self.tokenizer is None and self.config.tokenizer:
            loop = asyncio.get_running_loop()
            self.tokenizer = await loop.run_in_executor(None, load_tokenizer, self.config.tokenizer)
            self.router.tokenizer = self.tokenizer
        app = ops_app(self.router.metrics.registry, self._ready)
        add_openai_routes(app, self.router, self.model_name)
        self._http, self.http_port = await start_http(app, self.host, self.http_port)
        self.pool.start()
        await self.pool.wait_checked()
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        self._grpc = grpc.aio.server(options=options)
        pb_grpc.add_InferenceServicer_to_server(RouterServicer(self.router, self.model_name), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        self.port = self._grpc.add_insecure_port(f"{self.host}:{self.port}")
        await self._grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "router ready",
            extra={
                "grpc": self.address,
                "http_port": self.http_port,
                "policy": self.config.routing.policy,
                "backends": [b.name for b in self.pool.backends],
            },
        )

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.pool.close()
        if self._http is not None:
            await self._http.cleanup()
