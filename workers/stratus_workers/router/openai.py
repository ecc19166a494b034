"""OpenAI-style HTTP API (/v1/chat/completions, /v1/completions, /v1/models) onto the router's policies."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc
from aiohttp import web

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.names import FINISH_FROM_PB, POLICIES, TIER_FROM_PB, policy_value
from stratus_workers.router.router import Router

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 499,
}


class BadRequest(Exception):
    pass


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}}, status=status)


def _number(body: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{key}' must be a number, got {type(value).__name__}")
    if kind is int and (not float(value).is_integer() or value < 0):
        raise BadRequest(f"'{key}' must be a non-negative integer, got {value}")
    return kind(value)


def request_from_body(body: Any, *, chat: bool) -> tuple[pb.GenerateRequest, bool]:
    """Translate an OpenAI request body into a GenerateRequest; returns it and whether to stream."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    request = pb.GenerateRequest(request_id=str(body.get("user") or ""))
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise BadRequest(f"messages[{i}] must be an object with a string 'content'")
            request.chat.messages.add(role=str(message.get("role", "")), content=message["content"])
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string (one prompt per request)")
        request.prompt = prompt
    request.max_new_tokens = _number(body, "max_completion_tokens", int, None) or _number(body, "max_tokens", int, 0)
    request.temperature = _number(body, "temperature", float, 0.0)
    request.top_p = _number(body, "top_p", float, 0.0)
    stop = body.get("stop")
    if isinstance(stop, str):
        request.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        request.stop.extend(stop)
    elif stop is not None:
        raise BadRequest("'stop' must be a string or a list of strings")
    if body.get("seed") is not None:
        request.seed = _number(body, "seed", int, 0)
    request.return_logprobs = bool(body.get("logprobs"))
    if int(_number(body, "n", int, 1)) != 1:
        raise BadRequest("'n' must be 1: one answer per request")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    return request, stream


def _stratus(route: pb.RouteInfo) -> dict[str, Any]:
    info: dict[str, Any] = {
        "tier": TIER_FROM_PB.get(route.tier),
        "reason": route.reason,
        "backend": route.backend,
        "escalated": route.escalated,
        "degraded": route.degraded,
    }
    if route.HasField("confidence"):
        info["confidence"] = route.confidence
        info["threshold"] = route.threshold
    return info


def _usage(usage: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def add_openai_routes(app: web.Application, router: Router, model_name: str) -> None:
    """Mount the OpenAI-style endpoints on `app`; the policy can be chosen with X-Stratus-Policy."""

    async def completions(http: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        try:
            request, stream = request_from_body(body, chat=chat)
        except BadRequest as exc:
            return _error(400, str(exc))
        policy = http.headers.get("X-Stratus-Policy")
        if policy:
            if policy not in POLICIES:
                return _error(400, f"X-Stratus-Policy {policy!r} is not one of {', '.join(POLICIES)}")
            request.policy = policy_value(policy)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        model = str(body.get("model") or model_name)
        if not stream:
            try:
                response = await router.generate(request)
            except ProtocolError as exc:
                return _error(HTTP_STATUS.get(exc.code, 500), exc.message, exc.code.name.lower())
            choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH_FROM_PB.get(response.finish_reason)}
            if chat:
                choice["message"] = {"role": "assistant", "content": response.text}
            else:
                choice["text"] = response.text
            if request.return_logprobs:
                choice["logprobs"] = {
                    "content": [{"token": lp.token, "logprob": lp.logprob} for lp in response.logprobs]
                }
            return web.json_response(
                {
                    "id": ident,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": _usage(response.usage),
                    "stratus": _stratus(response.route),
                },
                headers={"X-Stratus-Tier": TIER_FROM_PB.get(response.route.tier, "")},
            )
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(http)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict[str, Any]) -> None:
            await out.write(f"data: {json.dumps(payload)}\n\n".encode())

        try:
            first = True
            async for chunk in router.stream(request):
                final = chunk.HasField("route")
                if chat:
                    delta: dict[str, Any] = {"content": chunk.text} if chunk.text else {}
                    if first:
                        delta["role"] = "assistant"
                    choice = {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": FINISH_FROM_PB.get(chunk.finish_reason) if final else None,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": chunk.text,
                        "finish_reason": FINISH_FROM_PB.get(chunk.finish_reason) if final else None,
                    }
                payload: dict[str, Any] = {
                    "id": ident,
                    "object": chunk_obj,
                    "created": created,
                    "model": model,
                    "choices": [choice],
                }
                if final:
                    payload["usage"] = _usage(chunk.usage)
                    payload["stratus"] = _stratus(chunk.route)
                if chunk.text or final or first:
                    await send(payload)
                first = False
        except ProtocolError as exc:
            await send({"error": {"message": exc.message, "type": exc.code.name.lower()}})
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def chat_completions(http: web.Request) -> web.StreamResponse:
        return await completions(http, chat=True)

    async def text_completions(http: web.Request) -> web.StreamResponse:
        return await completions(http, chat=False)

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "stratus"}]}
        )

    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", text_completions)
    app.router.add_get("/v1/models", models)
