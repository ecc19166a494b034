"""OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) onto the router's policies.

Requests are validated by `openai_request` (every documented parameter honoured or refused by name);
answers take the shapes of the official SDK's types (a conformance test checks them with the SDK), plus a
`stratus` object saying how the router answered. Every error, 404 and 405 included, is OpenAI's JSON
error shape. A client that disconnects cancels its request: the handler is cancelled, and with it the
backend call.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.names import FINISH_FROM_PB, POLICIES, POLICY_FROM_PB, TIER_FROM_PB, policy_value
from stratus_workers.router.openai_request import HTTPError, OpenAIRequest, bad, parse_json, parse_request
from stratus_workers.router.router import Router

POLICY_HEADER = "X-Stratus-Policy"
ENDPOINTS = "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{model}"


def error_response(error: HTTPError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def openai_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    """Every HTTP error of the router in OpenAI's shape: unknown paths, wrong methods, oversized bodies."""
    try:
        return await handler(request)
    except HTTPError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}; this router serves {ENDPOINTS}"
            return error_response(HTTPError(404, message, code="not_found"))
        if exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed on {request.path}; use {allowed}"
            return error_response(HTTPError(405, message, code="method_not_allowed"))
        return error_response(HTTPError(exc.status, exc.text or exc.reason, code=exc.reason.lower().replace(" ", "_")))


def _stratus(route: pb.RouteInfo) -> dict[str, Any]:
    """How the router answered (docs/cooperation.md): the same fields as the gRPC RouteInfo."""
    info: dict[str, Any] = {
        "tier": TIER_FROM_PB.get(route.tier),
        "policy": POLICY_FROM_PB.get(route.policy),
        "reason": route.reason,
        "backend": route.backend,
        "escalated": route.escalated,
        "degraded": route.degraded,
        "cached": route.cached,
    }
    if route.HasField("confidence"):
        info["confidence"] = route.confidence
        info["threshold"] = route.threshold
    if route.policy == pb.ROUTING_POLICY_SPECULATIVE:
        info["draft_tokens"] = route.draft_tokens
        info["accepted_tokens"] = route.accepted_tokens
        info["rounds"] = route.rounds
    return info


def _usage(usage: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _finish(reason: pb.FinishReason.ValueType) -> str:
    name = FINISH_FROM_PB.get(reason)
    if name not in ("stop", "length"):
        # A backend gave up on the answer (it is shutting down): no OpenAI finish reason says so.
        raise HTTPError(503, "the answering server cancelled the request; try again", code="cancelled")
    return name


class _Logprobs:
    """Per-token log-probabilities in the endpoint's shape; completions' `text_offset` runs on across chunks."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.offset = 0

    def shape(self, items: Any) -> dict[str, Any]:
        tokens = [(lp.token, lp.logprob) for lp in items]
        if self.chat:
            content = [
                {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
                for token, logprob in tokens
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for token, _ in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {
            "tokens": [t for t, _ in tokens],
            "token_logprobs": [lp for _, lp in tokens],
            "top_logprobs": None,
            "text_offset": offsets,
        }


class _Answer:
    """The fixed fields of one answer's response objects."""

    def __init__(self, parsed: OpenAIRequest, fallback_model: str) -> None:
        self.parsed = parsed
        self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.fallback_model = fallback_model
        self.logprobs = _Logprobs(parsed.chat)

    def envelope(self, obj: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        payload: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": model}
        payload["choices"] = choices
        return payload

    def model(self, answered: str) -> str:
        return answered or self.fallback_model

    def whole(self, response: pb.GenerateResponse) -> dict[str, Any]:
        parsed = self.parsed
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(response.finish_reason)}
        if parsed.chat:
            choice["message"] = {"role": "assistant", "content": response.text, "refusal": None}
        else:
            choice["text"] = response.text
        choice["logprobs"] = self.logprobs.shape(response.logprobs) if parsed.request.return_logprobs else None
        obj = "chat.completion" if parsed.chat else "text_completion"
        payload = self.envelope(obj, self.model(response.model), [choice])
        payload["usage"] = _usage(response.usage)
        if parsed.chat and parsed.metadata is not None:
            payload["metadata"] = parsed.metadata
        payload["stratus"] = _stratus(response.route)
        return payload

    def chunks(self, chunk: pb.GenerateStreamResponse, first: bool) -> list[dict[str, Any]]:
        """The server-sent events for one chunk of the router's stream (none for an empty middle chunk)."""
        parsed = self.parsed
        final = chunk.HasField("route")
        if not (chunk.text or chunk.logprobs or final or first):
            return []
        finish = _finish(chunk.finish_reason) if final else None
        choice: dict[str, Any] = {"index": 0}
        if parsed.chat:
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text else {}
            if first:
                delta = {"role": "assistant", "content": chunk.text}
            choice["delta"] = delta
        else:
            choice["text"] = chunk.text
        wants = parsed.request.return_logprobs
        choice["logprobs"] = self.logprobs.shape(chunk.logprobs) if wants and chunk.logprobs else None
        choice["finish_reason"] = finish
        obj = "chat.completion.chunk" if parsed.chat else "text_completion"
        events = [self.envelope(obj, self.model(chunk.model), [choice])]
        if final:
            events[0]["stratus"] = _stratus(chunk.route)
            if parsed.include_usage:
                usage = self.envelope(obj, self.model(chunk.model), [])
                usage["usage"] = _usage(chunk.usage)
                events.append(usage)
        return events


def add_openai_routes(app: web.Application, router: Router) -> None:
    """Mount the OpenAI-style endpoints on `app`; the policy can be chosen with X-Stratus-Policy.

    Install `openai_errors` among the app's middlewares so that every error has OpenAI's shape.
    """

    async def parse(http: web.Request, endpoint: str) -> OpenAIRequest:
        parsed = parse_request(parse_json(await http.read()), "chat" if endpoint == "chat" else "completions")
        policy = http.headers.get(POLICY_HEADER)
        if policy:
            if policy not in POLICIES:
                raise bad(POLICY_HEADER, f"{POLICY_HEADER} {policy!r} is not one of {', '.join(POLICIES)}")
            parsed.request.policy = policy_value(policy)
        return parsed

    async def completions(http: web.Request, endpoint: str) -> web.StreamResponse:
        parsed = await parse(http, endpoint)
        answer = _Answer(parsed, router.name)
        if not parsed.stream:
            try:
                response = await router.generate(parsed.request)
            except ProtocolError as exc:
                raise parsed.error(exc) from exc
            tier = TIER_FROM_PB.get(response.route.tier, "")
            return web.json_response(answer.whole(response), headers={"X-Stratus-Tier": tier})
        async with contextlib.aclosing(router.stream(parsed.request)) as chunks:
            try:
                # Refusals come before the first chunk: answer them with their HTTP status, not a stream.
                head = await anext(chunks)
                first_events = answer.chunks(head, first=True)
            except StopAsyncIteration as exc:
                raise HTTPError(500, "the answer ended before it began", code="internal") from exc
            except ProtocolError as exc:
                raise parsed.error(exc) from exc
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await out.prepare(http)
            await _send(out, first_events)
            try:
                async for chunk in chunks:
                    await _send(out, answer.chunks(chunk, first=False))
            except ProtocolError as exc:
                await _send(out, [parsed.error(exc).body()])
            except HTTPError as exc:
                await _send(out, [exc.body()])
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def chat_completions(http: web.Request) -> web.StreamResponse:
        return await completions(http, "chat")

    async def text_completions(http: web.Request) -> web.StreamResponse:
        return await completions(http, "completions")

    def model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "stratus"}

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [model_object(name) for name in router.models()]})

    async def model(http: web.Request) -> web.Response:
        name = http.match_info["model"]
        if name not in router.models():
            known = ", ".join(repr(n) for n in router.models())
            message = f"model {name!r} does not exist here; use one of {known}"
            raise HTTPError(404, message, param="model", code="model_not_found")
        return web.json_response(model_object(name))

    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", text_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)


async def _send(out: web.StreamResponse, events: list[dict[str, Any]]) -> None:
    for event in events:
        await out.write(f"data: {json.dumps(event)}\n\n".encode())
