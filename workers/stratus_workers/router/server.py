"""Router process: the Inference gRPC service and the OpenAI-style HTTP API over one Router."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.models.files import ModelLoadError
from stratus_workers.models.tokenizer import load_tokenizer
from stratus_workers.ops_http import ops_app, start_http
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.names import SERVICE_NAME, TIER_TO_PB
from stratus_workers.protocol.servicer import add_inference_servicer
from stratus_workers.router.backends import BackendPool
from stratus_workers.router.config import RouterConfig
from stratus_workers.router.openai import add_openai_routes, openai_errors
from stratus_workers.router.openai_request import HTTPError
from stratus_workers.router.router import Router
from stratus_workers.security import BearerAuthInterceptor, TLSFiles, TokenStore

log = logging.getLogger(__name__)


@dataclass
class RouterSettings:
    """Router process settings; each is also read from STRATUS_<NAME>."""

    config: str = field(metadata={"help": "Path of the RouterConfig JSON (policy, backends)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0 in a pod)."})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)."})
    http_port: int = field(default=8080, metadata={"help": "HTTP port: OpenAI API, /healthz, /readyz, /metrics."})
    model_name: str = field(
        default="stratus",
        metadata={"help": "The router's own model name (routes by policy); each tier also answers to its own."},
    )
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "Largest gRPC message accepted."})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate the router presents to model servers."})
    tls_key: str = field(default="", metadata={"help": "PEM private key of tls_cert."})
    tls_ca: str = field(default="", metadata={"help": "CA that signs the model servers' certificates (mTLS)."})
    client_tls: bool = field(default=False, metadata={"help": "Also serve callers over TLS with tls_cert."})
    tokens_file: str = field(default="", metadata={"help": "Accepted bearer tokens, one per line (a Secret)."})
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
        except ProtocolError as exc:
            await exc.abort(context)
            raise

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            async for chunk in self.router.stream(request, context.time_remaining()):
                yield chunk
        except ProtocolError as exc:
            await exc.abort(context)

    async def Draft(self, request: pb.DraftRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.DraftResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the router drafts through its edge servers; call one")
        raise AssertionError("unreachable")

    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.VerifyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the router verifies through its cloud servers; call one")
        raise AssertionError("unreachable")

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ScoreResponse:
        try:
            return await self.router.score(request, context.time_remaining())
        except ProtocolError as exc:
            await exc.abort(context)
            raise

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfoResponse:
        info = pb.ModelInfoResponse(model=self.model_name)
        for b in self.router.pool.backends:
            info.backends.add(
                name=b.name, address=b.config.address, tier=TIER_TO_PB[b.tier], healthy=b.healthy, model=b.model
            )
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
        tls: TLSFiles | None = None,
        client_tls: bool = False,
        tokens: TokenStore | None = None,
    ) -> None:
        if client_tls and tls is None:
            raise ValueError("client_tls needs tls_cert, tls_key and tls_ca")
        self.tls = tls
        self.client_tls = client_tls
        self.tokens = tokens
        self.config = config
        self.host = host
        self.port = port
        self.http_port = http_port
        self.model_name = model_name
        self.max_message_bytes = max_message_bytes
        self.tokenizer = tokenizer
        self.pool = BackendPool(
            config.backends,
            interval=config.health_interval_seconds,
            stall_timeout=config.stall_timeout_seconds,
            max_message_bytes=max_message_bytes,
            tls=tls,
            link=config.routing.link,
        )
        self.router = Router(config, self.pool, tokenizer, name=model_name)
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
            tls=TLSFiles.from_paths(settings.tls_cert, settings.tls_key, settings.tls_ca),
            client_tls=settings.client_tls,
            tokens=TokenStore(Path(settings.tokens_file)) if settings.tokens_file else None,
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
            try:
                self.tokenizer = await loop.run_in_executor(None, load_tokenizer, self.config.tokenizer)
            except ModelLoadError as exc:
                # Routing still works without it: the edge enforces its own prompt limit, and the
                # speculative policy answers from the cloud, marked with reason "no-tokenizer".
                log.warning(
                    "no tokenizer; prompt-length routing and speculative decoding are off",
                    extra={"source": self.config.tokenizer, "error": str(exc)},
                )
            self.router.tokenizer = self.tokenizer
        middlewares = [openai_errors, self._http_auth] if self.tokens else [openai_errors]
        app = ops_app(self.router.metrics.registry, self._ready, middlewares=middlewares)
        add_openai_routes(app, self.router)
        self._http, self.http_port = await start_http(app, self.host, self.http_port)
        self.pool.start()
        await self.pool.wait_checked()
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        interceptors = [BearerAuthInterceptor(self.tokens, self._rejected("grpc"))] if self.tokens else []
        self._grpc = grpc.aio.server(options=options, interceptors=interceptors)
        add_inference_servicer(RouterServicer(self.router, self.model_name), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        bind = f"{self.host}:{self.port}"
        if self.client_tls and self.tls is not None:
            # Edge devices authenticate with bearer tokens, not certificates: TLS without client auth.
            self.port = self._grpc.add_secure_port(bind, self.tls.server_credentials(require_client_cert=False))
        else:
            self.port = self._grpc.add_insecure_port(bind)
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

    def _rejected(self, surface: str) -> Callable[[str], None]:
        def count(method: str) -> None:
            self.router.metrics.auth_rejections.labels(surface).inc()
            log.info("unauthenticated call rejected", extra={"surface": surface, "method": method})

        return count

    @web.middleware
    async def _http_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if (
            request.path.startswith("/v1/")
            and self.tokens is not None
            and not self.tokens.check(request.headers.get("Authorization"))
        ):
            self._rejected("http")(request.path)
            message = "missing or invalid bearer token: send 'Authorization: Bearer <token>'"
            raise HTTPError(401, message, code="invalid_api_key")
        response: web.StreamResponse = await handler(request)
        return response

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.pool.close()
        if self._http is not None:
            await self._http.cleanup()
