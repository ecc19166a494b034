"""Model server: hosts one model behind the stratus.v1 Inference gRPC service, with health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.ops_http import ops_app, start_http
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.names import SERVICE_NAME, TIERS, finish_value, tier_value
from stratus_workers.protocol.requests import (
    MAX_SPECULATIVE_TOKENS,
    Sampling,
    check_session_id,
    generation_sampling,
    prompt_text,
    session_sampling,
)
from stratus_workers.protocol.servicer import add_inference_servicer
from stratus_workers.runtimes import DEFAULT_MAX_SESSIONS
from stratus_workers.security import TLSFiles
from stratus_workers.serve.core import EngineStats
from stratus_workers.serve.engine import (
    DEFAULT_STEP_TIMEOUT,
    MESSAGE_RATE,
    AsyncEngine,
    ProcessTransport,
    ThreadTransport,
    Transport,
)
from stratus_workers.serve.errors import EngineOverloaded, EngineStopped
from stratus_workers.serve.prompts import PromptEncoder
from stratus_workers.serve.surface import (
    FinishEvent,
    ServingEngine,
    SparseDist,
    TokenEvent,
    TokenLogprob,
    VerifyResult,
)

if TYPE_CHECKING:
    from stratus_workers.models import LoadedModel
    from stratus_workers.serve.loop import EngineSettings
    from stratus_workers.serve.parallel import ParallelContext

log = logging.getLogger(__name__)
# A cancellation this close to the call's deadline is its deadline (see InferenceServicer._cancel_code).
DEADLINE_SLACK = 0.1

ENGINE_MODES = ("auto", "process", "thread")


@dataclass
class ServerSettings:
    """Model server settings; each is also read from STRATUS_<NAME> (e.g. STRATUS_MAX_BATCH_SIZE)."""

    model: str = field(metadata={"help": "Model source: bundled://smollm2-135m-instruct, a directory, an artifact."})
    name: str = field(default="", metadata={"help": "Model name reported to clients (default: from the source)."})
    tier: str = field(default="cloud", metadata={"help": "Tier this server plays.", "choices": list(TIERS)})
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
    max_sessions: int = field(
        default=DEFAULT_MAX_SESSIONS, metadata={"help": "Speculative-decoding sessions held at once."}
    )
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
    engine: str = field(
        default="auto",
        metadata={
            "help": "Where the engine loop runs: process (a process of its own, the default with a GPU), "
            "thread (a thread of the server process, the default on a CPU), or auto.",
            "choices": list(ENGINE_MODES),
        },
    )
    prefill_chunk_tokens: int = field(
        default=512,
        metadata={"help": "Prompt tokens prefilled per engine step; longer prompts are split (chunked prefill)."},
    )
    prefix_cache_tokens: int = field(
        default=-1,
        metadata={"help": "Tokens of shared prompt prefixes kept for reuse (-1: sized from memory; 0: off)."},
    )
    stream_message_rate: float = field(
        default=MESSAGE_RATE,
        metadata={
            "help": "Stream messages per second the server sends, all streams together: with n streams running, a "
            "stream's next message goes out n / rate s after its last, carrying every token since (its first token "
            "and its end at once); 0 sends every engine step's tokens at once."
        },
    )
    engine_step_timeout: float = field(
        default=DEFAULT_STEP_TIMEOUT,
        metadata={
            "help": "Seconds the engine may go without finishing a step while work waits before it counts as hung."
        },
    )
    tensor_parallel: int = field(
        default=1, metadata={"help": "GPUs this server spans (tensor parallel; >1 starts one process per GPU)."}
    )
    pipeline_parallel: int = field(
        default=1,
        metadata={
            "help": "Pipeline stages: the decoder layers split into N contiguous stages, one process and "
            "device each, or tensor_parallel of them (>1 runs the engine in a process, which starts the others)."
        },
    )
    pipeline_microbatches: int = field(
        default=0,
        metadata={
            "help": "Micro-batches a step's rows are split into under pipeline parallel (0: one per stage for a "
            "prefill, one for a decode step)."
        },
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
            "pipeline_parallel",
            "prefill_chunk_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.prefix_cache_tokens < -1:
            raise ValueError(
                f"prefix_cache_tokens must be -1 (automatic), 0 (off) or a size, got {self.prefix_cache_tokens}"
            )
        if self.engine not in ENGINE_MODES:
            raise ValueError(f"engine must be one of {', '.join(ENGINE_MODES)}, got {self.engine!r}")
        if self.pipeline_microbatches < 0:
            raise ValueError(
                f"pipeline_microbatches must be 0 (one per stage) or more, got {self.pipeline_microbatches}"
            )
        if self.pipeline_parallel > 1 and self.engine == "thread":
            raise ValueError("pipeline_parallel runs the engine in a process of its own; use engine=process or auto")
        if self.stream_message_rate < 0:
            raise ValueError(f"stream_message_rate must be 0 (unpaced) or positive, got {self.stream_message_rate}")
        if self.engine_step_timeout <= 0:
            raise ValueError(f"engine_step_timeout must be positive, got {self.engine_step_timeout}")


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
        self.prefill_tokens = Counter(
            "stratus_server_prefill_tokens", "Prompt tokens computed (not taken from the prefix cache).", registry=r
        )
        self.prefill_steps = Counter(
            "stratus_server_prefill_steps",
            "Engine steps that prefilled prompt tokens (fewer, with more prompts each, under prefill grouping).",
            registry=r,
        )
        self.forward_passes = Counter(
            "stratus_server_forward_passes",
            "Forward passes of the model (decode steps, prefill chunks, Draft, Verify and Score calls).",
            registry=r,
        )
        self.forward_positions = Counter(
            "stratus_server_forward_positions", "Token positions computed by the model's forward passes.", registry=r
        )
        self.prefix_queried = Counter(
            "stratus_server_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter(
            "stratus_server_prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values came from the prefix cache (computation saved).",
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "stratus_server_prefix_cache_hit_rate",
            "Share of looked-up prompt tokens found cached, since start.",
            registry=r,
        )
        self.prefix_evictions = Counter(
            "stratus_server_prefix_cache_evicted_blocks", "Prefix-cache blocks evicted to make room.", registry=r
        )
        self.prefix_blocks = Gauge("stratus_server_prefix_cache_blocks", "Blocks the prefix cache holds.", registry=r)
        self.shared_prefix_rows = Gauge(
            "stratus_server_shared_prefix_rows",
            "Rows reading a cached prefix from the one shared copy (cascade attention), not a copy of their own.",
            registry=r,
        )
        self.cascade_steps = Counter(
            "stratus_server_cascade_steps", "Decode steps that read the shared prefix once for its rows.", registry=r
        )
        self._last = EngineStats()

    def on_stats(self, stats: EngineStats) -> None:
        """The engine's counters after its latest step (cumulative ones are added as increments)."""
        last, self._last = self._last, stats
        self.active.set(stats.active)
        self.waiting.set(stats.waiting)
        self.steps.inc(max(0, stats.steps - last.steps))
        self.prefill_tokens.inc(max(0, stats.prefill_tokens - last.prefill_tokens))
        self.prefill_steps.inc(max(0, stats.prefill_steps - last.prefill_steps))
        self.forward_passes.inc(max(0, stats.forward_passes - last.forward_passes))
        self.forward_positions.inc(max(0, stats.forward_positions - last.forward_positions))
        self.prefix_queried.inc(max(0, stats.prefix_queried_tokens - last.prefix_queried_tokens))
        self.prefix_hits.inc(max(0, stats.prefix_hit_tokens - last.prefix_hit_tokens))
        self.prefix_evictions.inc(max(0, stats.prefix_evicted_blocks - last.prefix_evicted_blocks))
        self.prefix_blocks.set(stats.prefix_blocks)
        self.shared_prefix_rows.set(stats.shared_prefix_rows)
        self.cascade_steps.inc(max(0, stats.cascade_steps - last.cascade_steps))
        if stats.prefix_queried_tokens:
            self.prefix_hit_rate.set(stats.prefix_hit_tokens / stats.prefix_queried_tokens)


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """The engine's refusals as the gRPC status a caller should see."""
    try:
        yield
    except EngineOverloaded as exc:
        raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
    except EngineStopped as exc:
        raise ProtocolError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
    except ValueError as exc:
        raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc


def _logprobs_pb(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(token_id=i.token_id, token=i.token, logprob=i.logprob, top_logprobs=_logprobs_pb(i.top))
        for i in items
    ]


def verify_arguments(
    request: pb.VerifyRequest,
) -> tuple[str, list[int], list[int], list[SparseDist], Sampling, bool]:
    """A Verify request's checked arguments for `ServingEngine.verify`: session id, context, draft,
    distributions, sampling, end; ProtocolError naming what is wrong."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if len(request.draft) > MAX_SPECULATIVE_TOKENS:
        raise ProtocolError(invalid, f"{len(request.draft)} draft tokens; at most {MAX_SPECULATIVE_TOKENS}")
    sampling = _session_sampling(request.sampling.SerializeToString(deterministic=True))
    dists = [SparseDist(tuple(d.token_ids), tuple(d.probs)) for d in request.distributions]
    if not sampling.greedy and len(dists) != len(request.draft):
        raise ProtocolError(invalid, "a sampled draft needs one distribution per draft token")
    if any(len(d.token_ids) != len(d.probs) for d in dists):
        raise ProtocolError(invalid, "each distribution needs one probability per token id")
    # A slice copies a repeated field into a list faster than list() does.
    return request.session_id, request.context[:], request.draft[:], dists, sampling, request.end_session


@functools.lru_cache(maxsize=1024)
def _session_sampling(wire: bytes) -> Sampling:
    """`session_sampling` of a SpeculativeSampling's bytes, made once per setting (a session sends the same one
    every round; Sampling is frozen). Keyed on the whole message, so a field added to it later reaches
    `session_sampling` as it is (serializing it costs about what reading its three fields did: 0.36 against
    0.32 µs on the benchmark CPU)."""
    return session_sampling(pb.SpeculativeSampling.FromString(wire))


def verify_response(result: VerifyResult) -> pb.VerifyResponse:
    return pb.VerifyResponse(
        accepted=result.accepted, next_token=result.next_token, logprobs=result.logprobs, eos=result.eos
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    """The Inference service over one engine (anything that implements surface.ServingEngine)."""

    def __init__(self, engine: ServingEngine, tokenizer: Any, config: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        self.tier = tier_value(config.tier)
        self.name = config.name or engine.info.name
        self.prompts = PromptEncoder(tokenizer)

    def _route(self) -> pb.RouteInfo:
        return pb.RouteInfo(tier=self.tier, reason="served", backend=self.name)

    async def _prompt(self, request: pb.GenerateRequest) -> list[int]:
        """The request's prompt ids: repeated text prefixes reuse their tokens, long text is tokenized in a thread."""
        text, special = prompt_text(self.tokenizer, request)
        return await self.prompts.encode_async(text, special)

    async def _prepare(self, request: pb.GenerateRequest) -> tuple[list[int], Sampling]:
        if request.model and request.model != self.name:
            raise ProtocolError(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here; this server hosts {self.name!r}",
                "model",
            )
        prompt = await self._prompt(request)
        if len(prompt) > self.config.max_prompt_tokens:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt too long: {len(prompt)} tokens; this {self.config.tier} server accepts at most "
                f"{self.config.max_prompt_tokens} (max_prompt_tokens); shorten it or send it to a larger tier",
                "chat" if request.HasField("chat") else "prompt",
            )
        params = generation_sampling(
            request, max_new_tokens=self.config.max_new_tokens, default_new_tokens=self.config.default_new_tokens
        )
        vocab_size = self.engine.info.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab_size:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"logit_bias names token {params.logit_bias[-1][0]}; this model's vocabulary holds "
                f"{vocab_size} tokens (0 to {vocab_size - 1})",
                "logit_bias",
            )
        return prompt, params

    @staticmethod
    def _cancel_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
        """Why gRPC cancelled a handler: its deadline passed (while queued, say) or the client went away.

        The client's deadline timer fires before this server's by the call's transit time (the server counts
        the timeout from arrival), so a deadline usually reaches us as the client's cancellation a few
        milliseconds early: one within DEADLINE_SLACK of the deadline is counted as the deadline.
        """
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _events(
        self, prompt: list[int], params: Sampling, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        self.metrics.prompt_tokens.inc(len(prompt))
        with engine_errors():
            async for event in self.engine.stream(prompt, params, self._deadline(context)):
                yield event

    async def _echo(self, prompt: list[int], params: Sampling) -> list[pb.TokenLogprob]:
        """The prompt's tokens with their log-probabilities, when the request asks to echo it."""
        if not params.echo:
            return []
        with engine_errors():
            return _logprobs_pb(await self.engine.prompt_logprobs(prompt, params.top_logprobs))

    def _finish_status(self, finish: FinishEvent) -> None:
        self.metrics.generated_tokens.inc(finish.completion_tokens)
        self.metrics.ttft.observe(finish.ttft_ms / 1e3)
        self.metrics.queue_wait.observe(finish.queue_ms / 1e3)
        if finish.reason == "deadline":
            raise ProtocolError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed after {finish.completion_tokens} tokens"
            )
        if finish.reason == "error":
            raise ProtocolError(grpc.StatusCode.INTERNAL, f"generation failed: {finish.error}")
        if finish.reason == "unavailable":
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, finish.error)
        if finish.reason == "cancelled":
            raise ProtocolError(grpc.StatusCode.CANCELLED, finish.error or "the request was cancelled")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            parts: list[str] = []
            logprobs: list[TokenLogprob] = []
            prompt, params = await self._prepare(request)
            echoed = await self._echo(prompt, params)
            async for event in self._events(prompt, params, context):
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                    logprobs.extend(event.logprobs)
                    continue
                self._finish_status(event)
                return pb.GenerateResponse(
                    text="".join(parts),
                    finish_reason=finish_value(event.reason),
                    usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
                    logprobs=_logprobs_pb(logprobs),
                    route=self._route(),
                    timing=pb.Timing(queue_ms=event.queue_ms, ttft_ms=event.ttft_ms, total_ms=event.total_ms),
                    model=self.name,
                    request_id=request.request_id,
                    prompt_logprobs=echoed,
                )
            raise ProtocolError(grpc.StatusCode.INTERNAL, "generation ended without a result")
        except ProtocolError as exc:
            code = exc.code
            await exc.abort(context)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            code = self._cancel_code(context)
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
            prompt, params = await self._prepare(request)
            echoed = await self._echo(prompt, params)
            if echoed:
                yield pb.GenerateStreamResponse(prompt_logprobs=echoed)
            async for event in self._events(prompt, params, context):
                if isinstance(event, TokenEvent):
                    if event.text or event.logprobs:
                        yield pb.GenerateStreamResponse(text=event.text, logprobs=_logprobs_pb(event.logprobs))
                    continue
                self._finish_status(event)
                yield pb.GenerateStreamResponse(
                    finish_reason=finish_value(event.reason),
                    usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
                    route=self._route(),
                    timing=pb.Timing(queue_ms=event.queue_ms, ttft_ms=event.ttft_ms, total_ms=event.total_ms),
                    model=self.name,
                    request_id=request.request_id,
                )
        except ProtocolError as exc:
            code = exc.code
            await exc.abort(context)
        except asyncio.CancelledError:
            code = self._cancel_code(context)
            raise
        finally:
            self.metrics.requests.labels("GenerateStream", code.name).inc()
            self.metrics.latency.labels("GenerateStream").observe(time.perf_counter() - started)

    async def _speculative_call(
        self, method: str, call: Callable[[], Awaitable[Any]], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        code = grpc.StatusCode.OK
        try:
            with engine_errors():
                return await call()
        except ProtocolError as exc:
            code = exc.code
            await exc.abort(context)
        finally:
            self.metrics.requests.labels(method, code.name).inc()

    async def Draft(self, request: pb.DraftRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.DraftResponse:
        async def call() -> pb.DraftResponse:
            check_session_id(request.session_id)
            if request.end_session and not request.context:
                await self.engine.end_session(request.session_id)
                return pb.DraftResponse()
            if not 1 <= request.max_tokens <= MAX_SPECULATIVE_TOKENS:
                raise ProtocolError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"max_tokens is {request.max_tokens}; use 1 to {MAX_SPECULATIVE_TOKENS}",
                )
            sampling = session_sampling(request.sampling)
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
            check_session_id(request.session_id)
            if request.end_session and not request.context:
                await self.engine.end_session(request.session_id)
                return pb.VerifyResponse()
            sid, tokens, draft, dists, sampling, end = verify_arguments(request)
            result = await self.engine.verify(sid, tokens, draft, dists, sampling, end=end)
            self.metrics.generated_tokens.inc(result.accepted + 1)
            return verify_response(result)

        response: pb.VerifyResponse = await self._speculative_call("Verify", call, context)
        return response

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ScoreResponse:
        async def call() -> pb.ScoreResponse:
            prompt = await self._prompt(request.request)
            continuation = list(self.tokenizer.encode(request.continuation, add_special_tokens=False))
            if len(prompt) + len(continuation) > self.config.max_prompt_tokens + self.config.max_new_tokens:
                raise ProtocolError(
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
        info = self.engine.info
        return pb.ModelInfoResponse(
            model=self.name,
            source=info.source,
            tier=self.tier,
            dtype=info.dtype,
            device=info.device,
            parameters=info.parameters,
            max_context_tokens=info.max_len,
            max_prompt_tokens=self.config.max_prompt_tokens,
            max_new_tokens=self.config.max_new_tokens,
            max_batch_size=self.config.max_batch_size,
            compression=info.compression,
            vocab_size=info.vocab_size,
        )


def engine_mode(config: ServerSettings, *, preloaded: bool = False) -> str:
    """Where the engine loop runs: "process" or "thread" (config.engine, or chosen for "auto").

    A model object loaded in this process (`preloaded`) can only be served from a thread of it.
    """
    if config.engine != "auto":
        return config.engine
    if preloaded:
        return "thread"
    if config.device == "cuda" or config.pipeline_parallel > 1:  # the engine process starts the stages
        return "process"
    if config.device == "auto":
        import torch

        return "process" if torch.cuda.is_available() else "thread"
    return "thread"


def stage_argv(config: ServerSettings) -> tuple[str, ...]:
    """The command line of a pipeline rank (`python -m stratus_workers.serve ...`): what it needs to load
    the model and join the pipeline (and its stage's tensor-parallel group), taken from the settings (a
    server built in-process has no argv)."""
    c = config
    return (
        "--model", c.model, "--name", c.name, "--dtype", c.dtype, "--device", c.device, "--threads", str(c.threads),
        "--pipeline-parallel", str(c.pipeline_parallel), "--pipeline-microbatches", str(c.pipeline_microbatches),
        "--tensor-parallel", str(c.tensor_parallel),
        "--log-level", c.log_level, "--log-format", c.log_format,
    )  # fmt: skip


class ModelServer:
    """Owns the engine, the gRPC server and the ops HTTP server of one model server.

    The engine loop runs in a process of its own (`engine="process"`, the default with a GPU) or in
    a thread of this one (`engine="thread"`, the default on a CPU, and the only way for a `loaded`
    model object). `loader` is a picklable zero-argument callable returning a models.LoadedModel
    (default: the configured source); the engine process calls it. If the engine dies, health turns
    NOT_SERVING, every request ends with UNAVAILABLE, and `engine_dead` is set: the entrypoint then
    exits so that Kubernetes (or whoever runs the server) restarts the whole pod.
    """

    def __init__(
        self,
        config: ServerSettings,
        loaded: LoadedModel | None = None,
        *,
        parallel: ParallelContext | None = None,
        loader: Callable[[], Any] | None = None,
        argv: tuple[str, ...] = (),
    ) -> None:
        config.validate()
        self.config = config
        # Checked before the model loads, so a bad certificate path fails in seconds, not minutes.
        self.tls = TLSFiles.from_paths(config.tls_cert, config.tls_key, config.tls_ca)
        if loaded is not None and config.engine == "process":
            raise ValueError("a model object of this process runs in-process (engine=thread); pass loader= instead")
        self.loaded = loaded
        self.loader = loader
        self.argv = argv
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.parallel = parallel  # rank 0 of a tensor-parallel group (in-process engine): the runner shards over it
        self.engine: AsyncEngine | None = None
        self.servicer: InferenceServicer | None = None
        self.engine_dead = asyncio.Event()
        self._failure_tasks: set[asyncio.Task[None]] = set()
        self._grpc: grpc.aio.Server | None = None
        self._http: Any = None
        self.port = config.port
        self.http_port = config.http_port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def mode(self) -> str:
        """Where the engine loop runs: "process" or "thread"."""
        return engine_mode(self.config, preloaded=self.loaded is not None or self.parallel is not None)

    def _ready(self) -> tuple[bool, str]:
        if self.engine is None or self.engine.tokenizer is None:
            return False, "loading model"
        if self.engine.failure is not None:
            return False, self.engine.failure
        return True, f"serving {self.config.name or self.engine.info.name}"

    def _settings(self) -> EngineSettings:
        from stratus_workers.serve.loop import EngineSettings

        c = self.config
        return EngineSettings(
            max_batch_size=c.max_batch_size,
            max_tokens=c.max_prompt_tokens + c.max_new_tokens,
            max_sessions=c.max_sessions,
            prefill_chunk=c.prefill_chunk_tokens,
            prefix_cache_tokens=c.prefix_cache_tokens,
            tensor_parallel=c.tensor_parallel if self.parallel is None else 1,
            pipeline_parallel=c.pipeline_parallel,
            pipeline_microbatches=c.pipeline_microbatches,
            argv=self.argv if c.pipeline_parallel == 1 else stage_argv(c),
            log_level=c.log_level,
            log_format=c.log_format,
            threads=c.threads,
        )

    def _transport(self) -> Transport:
        c = self.config
        if self.mode == "process":
            load = self.loader or functools.partial(
                _load_model, c.model, dtype=c.dtype, device=c.device, name=c.name or None
            )
            return ProcessTransport(self._settings(), load, step_timeout=c.engine_step_timeout)
        load = self.loader or functools.partial(
            _load_shared_model, c.model, dtype=c.dtype, device=c.device, name=c.name or None
        )
        return ThreadTransport(
            self._settings(), loaded=self.loaded, load=load, parallel=self.parallel, step_timeout=c.engine_step_timeout
        )

    async def start(self) -> None:
        # Health and metrics come up first so that probes see "not ready" rather than nothing.
        self._http, self.http_port = await start_http(
            ops_app(self.metrics.registry, self._ready), self.config.host, self.config.http_port
        )
        self.engine = AsyncEngine(
            self._transport(),
            max_batch_size=self.config.max_batch_size,
            max_queue=self.config.max_queue,
            on_stats=self.metrics.on_stats,
            on_failure=self._engine_failed,
            stall_timeout=self.config.engine_step_timeout,
            message_rate=self.config.stream_message_rate,
        )
        # Loads the model and captures the decode graphs (CUDA) before taking traffic.
        await self.engine.start()
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        self._grpc = grpc.aio.server(options=options)
        servicer = self.servicer = InferenceServicer(self.engine, self.engine.tokenizer, self.config, self.metrics)
        add_inference_servicer(servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        tls = self.tls
        bind = f"{self.config.host}:{self.config.port}"
        # With TLS configured only the router (holding a certificate from the same CA) may call.
        self.port = (
            self._grpc.add_secure_port(bind, tls.server_credentials()) if tls else self._grpc.add_insecure_port(bind)
        )
        await self._grpc.start()
        # What this process loaded stays for good: keep it out of every full collection (worker.py says why).
        gc.collect()
        gc.freeze()
        serving = self.engine.failure is None  # an engine that died while starting is not serving
        await self._set_health(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        log.info(
            "model server ready",
            extra={
                "model": self.config.name or self.engine.info.name,
                "tier": self.config.tier,
                "grpc": self.address,
                "http_port": self.http_port,
                "engine": self.engine.mode,
                "engine_pid": self.engine.pid,
                "runner": self.engine.info.runner,
                "prefix_cache_tokens": self.engine.info.prefix_cache_tokens,
            },
        )

    def _engine_failed(self, message: str) -> None:
        # Health turns NOT_SERVING at once, so callers (the router) stop sending here and fail over.
        log.error("model server stops serving", extra={"reason": message})
        task = asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self._failure_tasks.add(task)
        task.add_done_callback(self._failure_tasks.discard)
        self.engine_dead.set()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self.servicer is not None:
            self.servicer.prompts.close()
        if self.engine is not None:
            await self.engine.stop()  # under tensor parallel: the other ranks leave follow() and exit
        if self._http is not None:
            await self._http.cleanup()

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


def _load_model(source: str, **kwargs: Any) -> LoadedModel:
    """models.load_model, imported where it runs (the engine process), so this module stays torch-free."""
    from stratus_workers.models import load_model

    return load_model(source, **kwargs)


def _load_shared_model(source: str, **kwargs: Any) -> LoadedModel:
    from stratus_workers.models import load_shared_model

    return load_shared_model(source, **kwargs)
