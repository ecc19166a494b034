"""Model server: hosts one model behind the stratus.v1 Inference gRPC service, with health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.api_server import add_inference_servicer
from stratus_workers.models import LoadedModel, load_shared_model
from stratus_workers.ops import ops_app, start_http
from stratus_workers.security import TLSFiles
from stratus_workers.serve.engine import (
    Engine,
    EngineOverloaded,
    EngineStopped,
    FinishEvent,
    SamplingParams,
    SpecSampling,
    TokenEvent,
    TokenLogprob,
)
from stratus_workers.serve.runtime import runner_for
from stratus_workers.serve.speculative import SparseDist

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
TIERS = {"edge": pb.TIER_EDGE, "cloud": pb.TIER_CLOUD}
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "cancelled": pb.FINISH_REASON_CANCELLED}
CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 128
MAX_SPECULATIVE_TOKENS = 16
MAX_SESSION_ID = 128


@dataclass
class ServerConfig:
    """Model server settings; each is also read from STRATUS_<NAME> (e.g. STRATUS_MAX_BATCH_SIZE)."""

    model: str = field(metadata={"help": "Model source: bundled://smollm2-135m-instruct, a directory, an artifact."})
    name: str = field(default="", metadata={"help": "Model name reported to clients (default: from the source)."})
    tier: str = field(default="cloud", metadata={"help": "Tier this server plays.", "choices": ["edge", "cloud"]})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0 in a pod)."})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)."})
    http_port: int = field(default=8080, metadata={"help": "HTTP port for /healthz, /readyz, /metrics (0: free)."})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    max_batch_size: int = field(default=8, metadata={"help": "Requests decoded together."})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "Longest accepted prompt, in tokens."})
    max_new_tokens: int = field(default=512, metadata={"help": "Largest accepted max_new_tokens."})
    default_new_tokens: int = field(
        default=128, metadata={"help": "max_new_tokens when a request gives 0 (capped by max_new_tokens)."}
    )
    max_sessions: int = field(default=4, metadata={"help": "Speculative-decoding sessions held at once."})
    max_queue: int = field(
        default=256, metadata={"help": "Requests waiting for a batch slot before RESOURCE_EXHAUSTED."}
    )
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "Largest gRPC message accepted."})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate; with tls_key and tls_ca, serve mTLS."})
    tls_key: str = field(default="", metadata={"help": "PEM private key of tls_cert."})
    tls_ca: str = field(default="", metadata={"help": "CA whose certificates callers must present (mTLS)."})
    threads: int = field(
        default=0,
        metadata={"help": "CPU threads: torch intra-op, or llama.cpp's for a GGUF model (0: the engine's default)."},
    )
    tensor_parallel: int = field(
        default=1, metadata={"help": "GPUs this server spans (tensor parallel; >1 starts one process per GPU)."}
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error."})
    log_format: str = field(default="json", metadata={"help": "json or text.", "choices": ["json", "text"]})

    def validate(self) -> None:
        for name in (
            "max_batch_size",
            "max_prompt_tokens",
            "max_new_tokens",
            "default_new_tokens",
            "max_queue",
            "max_sessions",
            "tensor_parallel",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class ServerMetrics:
    """Prometheus series of one model server (own registry, so tests can host several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stratus_server_requests", "Requests by method and gRPC code.", ["method", "code"], registry=r
        )
        self.prompt_tokens = Counter("stratus_server_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generated_tokens = Counter("stratus_server_generated_tokens", "Tokens generated.", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram(
            "stratus_server_request_seconds", "Request latency.", ["method"], buckets=buckets, registry=r
        )
        self.ttft = Histogram("stratus_server_ttft_seconds", "Time to first token.", buckets=buckets, registry=r)
        self.queue_wait = Histogram(
            "stratus_server_queue_seconds", "Wait for a batch slot.", buckets=buckets, registry=r
        )
        self.active = Gauge("stratus_server_active_sequences", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge(
            "stratus_server_waiting_requests", "Requests waiting for a slot (queue depth).", registry=r
        )
        self.steps = Counter("stratus_server_engine_steps", "Engine iterations.", registry=r)

    def on_step(self, active: int, waiting: int) -> None:
        self.active.set(active)
        self.waiting.set(waiting)
        self.steps.inc()


class RequestError(Exception):
    """A request the server refuses; carries the gRPC status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """The engine's refusals as the gRPC status a caller should see."""
    try:
        yield
    except EngineOverloaded as exc:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
    except EngineStopped as exc:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
    except ValueError as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc


def render_prompt(tokenizer: Any, request: pb.GenerateRequest) -> list[int]:
    """Token ids for the request's prompt or chat messages (chat template applied)."""
    kind = request.WhichOneof("input")
    if kind == "chat":
        messages = []
        for i, message in enumerate(request.chat.messages):
            if message.role not in CHAT_ROLES:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"chat.messages[{i}].role is {message.role!r}; use one of {', '.join(CHAT_ROLES)}",
                )
            messages.append({"role": message.role, "content": message.content})
        if not messages:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "chat.messages is empty; send at least one message")
        if getattr(tokenizer, "chat_template", None):
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
            return list(encoded["input_ids"])
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return list(tokenizer.encode(text))
    if kind == "prompt":
        if not request.prompt:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        return list(tokenizer.encode(request.prompt))
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the request has neither prompt nor chat; set one of them")


def sampling_params(request: pb.GenerateRequest, *, max_new_tokens: int, default_new_tokens: int) -> SamplingParams:
    """Validated sampling parameters, or RequestError naming the bad field."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    wanted = request.max_new_tokens or min(default_new_tokens, max_new_tokens)
    if wanted > max_new_tokens:
        raise RequestError(invalid, f"max_new_tokens is {wanted}; this server allows at most {max_new_tokens}")
    if not 0.0 <= request.temperature <= 2.0:
        raise RequestError(invalid, f"temperature is {request.temperature}; it must be within [0, 2] (0 is greedy)")
    if not 0.0 <= request.top_p <= 1.0:
        raise RequestError(invalid, f"top_p is {request.top_p}; it must be within [0, 1]")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise RequestError(invalid, f"{len(request.stop)} stop sequences given; at most {MAX_STOP_SEQUENCES}")
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise RequestError(invalid, f"stop[{i}] must be 1 to {MAX_STOP_LENGTH} characters")
    return SamplingParams(
        max_new_tokens=wanted,
        temperature=float(request.temperature),
        top_p=float(request.top_p) or 1.0,
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        logprobs=request.return_logprobs,
    )


def _logprobs_pb(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=i.token_id, token=i.token, logprob=i.logprob) for i in items]


class InferenceServicer(pb_grpc.InferenceServicer):
    """The Inference service over one Engine."""

    def __init__(self, loaded: LoadedModel, engine: Engine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.loaded = loaded
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tier = TIERS[config.tier]
        self.name = config.name or loaded.name

    def _route(self) -> pb.RouteInfo:
        return pb.RouteInfo(tier=self.tier, reason="served", backend=self.name)

    def _prepare(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        if request.model and request.model != self.name:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here; this server hosts {self.name!r}",
            )
        prompt = render_prompt(self.loaded.tokenizer, request)
        if len(prompt) > self.config.max_prompt_tokens:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt too long: {len(prompt)} tokens; this {self.config.tier} server accepts at most "
                f"{self.config.max_prompt_tokens} (max_prompt_tokens); shorten it or send it to a larger tier",
            )
        params = sampling_params(
            request, max_new_tokens=self.config.max_new_tokens, default_new_tokens=self.config.default_new_tokens
        )
        return prompt, params

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _events(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        prompt, params = self._prepare(request)
        self.metrics.prompt_tokens.inc(len(prompt))
        with engine_errors():
            async for event in self.engine.stream(prompt, params, self._deadline(context)):
                yield event

    def _finish_status(self, finish: FinishEvent) -> None:
        self.metrics.generated_tokens.inc(finish.completion_tokens)
        self.metrics.ttft.observe(finish.ttft_ms / 1e3)
        self.metrics.queue_wait.observe(finish.queue_ms / 1e3)
        if finish.reason == "deadline":
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed after {finish.completion_tokens} tokens"
            )
        if finish.reason == "error":
            raise RequestError(grpc.StatusCode.INTERNAL, f"generation failed: {finish.error}")
        if finish.reason == "cancelled":
            raise RequestError(grpc.StatusCode.CANCELLED, finish.error or "the request was cancelled")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            parts: list[str] = []
            logprobs: list[TokenLogprob] = []
            async for event in self._events(request, context):
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                    logprobs.extend(event.logprobs)
                    continue
                self._finish_status(event)
                return pb.GenerateResponse(
                    text="".join(parts),
                    finish_reason=FINISH[event.reason],
                    usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
                    logprobs=_logprobs_pb(logprobs),
                    route=self._route(),
                    timing=pb.Timing(queue_ms=event.queue_ms, ttft_ms=event.ttft_ms, total_ms=event.total_ms),
                    model=self.name,
                    request_id=request.request_id,
                )
            raise RequestError(grpc.StatusCode.INTERNAL, "generation ended without a result")
        except RequestError as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.requests.labels("Generate", code.name).inc()
            self.metrics.latency.labels("Generate").observe(time.perf_counter() - started)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            async for event in self._events(request, context):
                if isinstance(event, TokenEvent):
                    if event.text or event.logprobs:
                        yield pb.GenerateStreamResponse(text=event.text, logprobs=_logprobs_pb(event.logprobs))
                    continue
                self._finish_status(event)
                yield pb.GenerateStreamResponse(
                    finish_reason=FINISH[event.reason],
                    usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
                    route=self._route(),
                    timing=pb.Timing(queue_ms=event.queue_ms, ttft_ms=event.ttft_ms, total_ms=event.total_ms),
                    model=self.name,
                    request_id=request.request_id,
                )
        except RequestError as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.requests.labels("GenerateStream", code.name).inc()
            self.metrics.latency.labels("GenerateStream").observe(time.perf_counter() - started)

    def _spec_sampling(self, sampling: pb.SpeculativeSampling) -> SpecSampling:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not 0.0 <= sampling.temperature <= 2.0:
            raise RequestError(invalid, f"sampling.temperature is {sampling.temperature}; it must be within [0, 2]")
        if not 0.0 <= sampling.top_p <= 1.0:
            raise RequestError(invalid, f"sampling.top_p is {sampling.top_p}; it must be within [0, 1]")
        seed = sampling.seed if sampling.HasField("seed") else None
        return SpecSampling(float(sampling.temperature), float(sampling.top_p) or 1.0, seed)

    @staticmethod
    def _check_session(session_id: str) -> None:
        if not session_id or len(session_id) > MAX_SESSION_ID:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"session_id must be 1 to {MAX_SESSION_ID} characters")

    async def _speculative_call(
        self, method: str, call: Callable[[], Awaitable[Any]], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        code = grpc.StatusCode.OK
        try:
            with engine_errors():
                return await call()
        except RequestError as exc:
            code = exc.code
            await context.abort(exc.code, exc.message)
        finally:
            self.metrics.requests.labels(method, code.name).inc()

    async def Draft(self, request: pb.DraftRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.DraftResponse:
        async def call() -> pb.DraftResponse:
            self._check_session(request.session_id)
            if request.end_session and not request.context:
                await self.engine.end_session(request.session_id)
                return pb.DraftResponse()
            if not 1 <= request.max_tokens <= MAX_SPECULATIVE_TOKENS:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"max_tokens is {request.max_tokens}; use 1 to {MAX_SPECULATIVE_TOKENS}",
                )
            sampling = self._spec_sampling(request.sampling)
            result = await self.engine.draft(
                request.session_id,
                list(request.context),
                request.max_tokens,
                sampling,
                top_k=request.top_k or 32,
                end=request.end_session,
            )
            self.metrics.generated_tokens.inc(len(result.tokens))
            return pb.DraftResponse(
                tokens=result.tokens,
                distributions=[
                    pb.SparseDistribution(token_ids=d.token_ids, probs=d.probs) for d in result.distributions
                ],
                eos=result.eos,
            )

        response: pb.DraftResponse = await self._speculative_call("Draft", call, context)
        return response

    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.VerifyResponse:
        async def call() -> pb.VerifyResponse:
            self._check_session(request.session_id)
            if request.end_session and not request.context:
                await self.engine.end_session(request.session_id)
                return pb.VerifyResponse()
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            if len(request.draft) > MAX_SPECULATIVE_TOKENS:
                raise RequestError(invalid, f"{len(request.draft)} draft tokens; at most {MAX_SPECULATIVE_TOKENS}")
            sampling = self._spec_sampling(request.sampling)
            dists = [SparseDist(tuple(d.token_ids), tuple(d.probs)) for d in request.distributions]
            if not sampling.greedy and len(dists) != len(request.draft):
                raise RequestError(invalid, "a sampled draft needs one distribution per draft token")
            if any(len(d.token_ids) != len(d.probs) for d in dists):
                raise RequestError(invalid, "each distribution needs one probability per token id")
            result = await self.engine.verify(
                request.session_id,
                list(request.context),
                list(request.draft),
                dists,
                sampling,
                end=request.end_session,
            )
            self.metrics.generated_tokens.inc(result.accepted + 1)
            return pb.VerifyResponse(
                accepted=result.accepted, next_token=result.next_token, logprobs=result.logprobs, eos=result.eos
            )

        response: pb.VerifyResponse = await self._speculative_call("Verify", call, context)
        return response

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ScoreResponse:
        async def call() -> pb.ScoreResponse:
            prompt = render_prompt(self.loaded.tokenizer, request.request)
            continuation = list(self.loaded.tokenizer.encode(request.continuation, add_special_tokens=False))
            if len(prompt) + len(continuation) > self.config.max_prompt_tokens + self.config.max_new_tokens:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompt and continuation hold {len(prompt) + len(continuation)} tokens; this server scores "
                    f"at most {self.config.max_prompt_tokens + self.config.max_new_tokens}",
                )
            logprobs = await self.engine.score(prompt, continuation)
            mean = sum(logprobs) / len(logprobs) if logprobs else 0.0
            return pb.ScoreResponse(logprobs=logprobs, mean_logprob=mean, tokens=len(logprobs), model=self.name)

        response: pb.ScoreResponse = await self._speculative_call("Score", call, context)
        return response

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfoResponse:
        self.metrics.requests.labels("ModelInfo", "OK").inc()
        return pb.ModelInfoResponse(
            model=self.name,
            source=self.loaded.source,
            tier=self.tier,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            device=str(self.loaded.device),
            parameters=self.loaded.parameters,
            max_context_tokens=self.engine.max_len,
            max_prompt_tokens=self.config.max_prompt_tokens,
            max_new_tokens=self.config.max_new_tokens,
            max_batch_size=self.config.max_batch_size,
            compression=self.loaded.compression,
            vocab_size=self.engine.vocab_size,
        )


class ModelServer:
    """Owns the model, the engine, the gRPC server and the ops HTTP server of one process."""

    def __init__(self, config: ServerConfig, loaded: LoadedModel | None = None) -> None:
        config.validate()
        self.config = config
        # Checked before the model loads, so a bad certificate path fails in seconds, not minutes.
        self.tls = TLSFiles.from_paths(config.tls_cert, config.tls_key, config.tls_ca)
        self.loaded = loaded
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.engine: Engine | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: Any = None
        self.port = config.port
        self.http_port = config.http_port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def _ready(self) -> tuple[bool, str]:
        if self.engine is None:
            return False, "loading model"
        return True, f"serving {self.config.name or (self.loaded.name if self.loaded else '')}"

    async def start(self) -> None:
        # Health and metrics come up first so that probes see "not ready" rather than nothing.
        self._http, self.http_port = await start_http(
            ops_app(self.metrics.registry, self._ready), self.config.host, self.config.http_port
        )
        if self.loaded is None:
            loop = asyncio.get_running_loop()
            self.loaded = await loop.run_in_executor(
                None,
                lambda: load_shared_model(  # one copy per process, however many servers use it
                    self.config.model, dtype=self.config.dtype, device=self.config.device, name=self.config.name or None
                ),
            )
        loaded = self.loaded
        max_len = min(loaded.max_context_tokens, self.config.max_prompt_tokens + self.config.max_new_tokens)
        self.engine = Engine(
            loaded.model,
            loaded.tokenizer,
            max_batch_size=self.config.max_batch_size,
            max_len=max_len,
            max_queue=self.config.max_queue,
            max_sessions=self.config.max_sessions,
            on_step=self.metrics.on_step,
            runner=runner_for(
                loaded.model,
                max_rows=self.config.max_batch_size + self.config.max_sessions,
                max_len=max_len,
                threads=self.config.threads,
            ),
        )
        # Capture the decode graphs (CUDA) before taking traffic, so no early request pays for it.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.runner.warmup)
        self.engine.start()
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        self._grpc = grpc.aio.server(options=options)
        add_inference_servicer(InferenceServicer(loaded, self.engine, self.config, self.metrics), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        tls = self.tls
        bind = f"{self.config.host}:{self.config.port}"
        # With TLS configured only the router (holding a certificate from the same CA) may call.
        self.port = (
            self._grpc.add_secure_port(bind, tls.server_credentials()) if tls else self._grpc.add_insecure_port(bind)
        )
        await self._grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "model server ready",
            extra={
                "model": self.config.name or loaded.name,
                "tier": self.config.tier,
                "grpc": self.address,
                "http_port": self.http_port,
            },
        )

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self.engine is not None:
            self.engine.shutdown()
        if self._http is not None:
            await self._http.cleanup()

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()
