"""OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) onto the router's policies.

Requests are validated by `openai_request` (every documented parameter honoured or refused by name);
answers take the shapes of the official SDK's types (a conformance test checks them with the SDK), plus a
`stratus` object saying how the router answered. Every error, 404 and 405 included, is OpenAI's JSON
error shape. A client that disconnects cancels its request: the handler is cancelled, and with it the
backend call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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
    """One choice's per-token log-probabilities in the endpoint's shape.

    Completions' `text_offset` runs on across chunks, from the start of the choice's text (the echoed
    prompt included); each token's offset advances by the length of its text.
    """

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.offset = 0

    def shape(self, items: Any, *, first_unknown: bool = False) -> dict[str, Any]:
        """`items` (pb.TokenLogprob); with `first_unknown`, the first one has no log-probability (a prompt's)."""
        items = list(items)
        if self.chat:
            content = [
                {
                    "token": lp.token,
                    "logprob": lp.logprob,
                    "bytes": list(lp.token.encode()),
                    "top_logprobs": [
                        {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                        for t in lp.top_logprobs
                    ],
                }
                for lp in items
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for lp in items:
            offsets.append(self.offset)
            self.offset += len(lp.token)
        unknown = [first_unknown] + [False] * (len(items) - 1)
        return {
            "tokens": [lp.token for lp in items],
            "token_logprobs": [None if u else lp.logprob for lp, u in zip(items, unknown, strict=False)],
            "top_logprobs": [
                None if u else {t.token: t.logprob for t in lp.top_logprobs}
                for lp, u in zip(items, unknown, strict=False)
            ]
            if any(lp.top_logprobs for lp in items)
            else None,
            "text_offset": offsets,
        }

    @staticmethod
    def join(echoed: dict[str, Any] | None, answer: dict[str, Any] | None) -> dict[str, Any] | None:
        """A completion choice's echoed prompt and answer log-probabilities as one."""
        if echoed is None or answer is None:
            return echoed or answer
        joined = {key: echoed[key] + answer[key] for key in ("tokens", "token_logprobs", "text_offset")}
        tops = echoed["top_logprobs"], answer["top_logprobs"]
        joined["top_logprobs"] = (
            None
            if tops == (None, None)
            else [*(tops[0] or [None] * len(echoed["tokens"])), *(tops[1] or [None] * len(answer["tokens"]))]
        )
        return joined


class _Choice:
    """The state of one choice while its answer is shaped: its index, log-probability offsets, whether it began."""

    def __init__(self, index: int, parsed: OpenAIRequest) -> None:
        self.index = index
        self.parsed = parsed
        self.logprobs = _Logprobs(parsed.chat)
        self.started = False

    def _echo(self, prompt_logprobs: Any) -> tuple[str, dict[str, Any] | None]:
        """The echoed prompt's text and, when asked for, its tokens' log-probabilities."""
        prompt = self.parsed.request.prompt
        shaped = self.logprobs.shape(prompt_logprobs, first_unknown=True) if prompt_logprobs else None
        self.logprobs.offset = len(prompt)  # the answer's offsets count from the end of the prompt's text
        return prompt, shaped

    def whole(self, response: pb.GenerateResponse) -> dict[str, Any]:
        parsed = self.parsed
        choice: dict[str, Any] = {"index": self.index, "finish_reason": _finish(response.finish_reason)}
        prompt, echoed = self._echo(response.prompt_logprobs) if parsed.echo else ("", None)
        answer = self.logprobs.shape(response.logprobs) if parsed.request.return_logprobs else None
        if parsed.chat:
            choice["message"] = {"role": "assistant", "content": response.text, "refusal": None}
        else:
            choice["text"] = prompt + response.text
        choice["logprobs"] = _Logprobs.join(echoed, answer)
        return choice

    def delta(self, chunk: pb.GenerateStreamResponse) -> dict[str, Any] | None:
        """The choice's part of a stream event for `chunk` (None for an empty chunk in the middle)."""
        parsed = self.parsed
        final = chunk.HasField("route")
        first = not self.started
        if not (chunk.text or chunk.logprobs or chunk.prompt_logprobs or final or first):
            return None
        self.started = True
        choice: dict[str, Any] = {"index": self.index}
        prompt, echoed = self._echo(chunk.prompt_logprobs) if parsed.echo and first else ("", None)
        wants = parsed.request.return_logprobs
        answer = self.logprobs.shape(chunk.logprobs) if wants and chunk.logprobs else None
        if parsed.chat:
            choice["delta"] = (
                {"role": "assistant", "content": chunk.text}
                if first
                else ({"content": chunk.text} if chunk.text else {})
            )
        else:
            choice["text"] = prompt + chunk.text
        choice["logprobs"] = _Logprobs.join(echoed, answer)
        choice["finish_reason"] = _finish(chunk.finish_reason) if final else None
        return choice


class _Answer:
    """One request's response objects: the fixed fields, and its choices as they are shaped."""

    def __init__(self, parsed: OpenAIRequest, fallback_model: str) -> None:
        self.parsed = parsed
        self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.fallback_model = fallback_model
        self.choices = [_Choice(i, parsed) for i in range(parsed.n)]
        self.object = (
            ("chat.completion.chunk" if parsed.stream else "chat.completion") if parsed.chat else "text_completion"
        )

    def envelope(self, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        payload: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created}
        payload["model"] = model or self.fallback_model
        payload["choices"] = choices
        return payload

    def whole(self, responses: list[pb.GenerateResponse]) -> dict[str, Any]:
        first = responses[0]
        payload = self.envelope(first.model, [c.whole(r) for c, r in zip(self.choices, responses, strict=True)])
        payload["usage"] = _total_usage([r.usage for r in responses])
        if self.parsed.chat and self.parsed.metadata is not None:
            payload["metadata"] = self.parsed.metadata
        payload["stratus"] = _stratus_of([r.route for r in responses])
        return payload

    def event(self, index: int, chunk: pb.GenerateStreamResponse) -> dict[str, Any] | None:
        """The stream event for choice `index`'s `chunk`; its last one says how the router answered it."""
        choice = self.choices[index].delta(chunk)
        if choice is None:
            return None
        event = self.envelope(chunk.model, [choice])
        if chunk.HasField("route"):
            event["stratus"] = _stratus(chunk.route)
        return event

    def usage_event(self, usages: list[pb.Usage]) -> dict[str, Any]:
        event = self.envelope("", [])
        event["usage"] = _total_usage(usages)
        return event


def _total_usage(usages: list[pb.Usage]) -> dict[str, int]:
    """The usage of all choices: the prompt counted once, every choice's completion tokens."""
    prompt = usages[0].prompt_tokens if usages else 0
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stratus_of(routes: list[pb.RouteInfo]) -> dict[str, Any]:
    """How the router answered: the first choice's route, and with several choices each one's."""
    info = _stratus(routes[0])
    if len(routes) > 1:
        info["choices"] = [_stratus(route) for route in routes]
    return info


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

    async def whole(parsed: OpenAIRequest, answer: _Answer) -> web.Response:
        try:
            async with asyncio.TaskGroup() as group:  # one choice failing cancels the others
                tasks = [group.create_task(router.generate(r)) for r in parsed.requests()]
        except* ProtocolError as failed:
            raise parsed.error(failed.exceptions[0]) from None  # type: ignore[arg-type]
        responses = [t.result() for t in tasks]
        tier = TIER_FROM_PB.get(responses[0].route.tier, "")
        return web.json_response(answer.whole(responses), headers={"X-Stratus-Tier": tier})

    async def streamed(http: web.Request, parsed: OpenAIRequest, answer: _Answer) -> web.StreamResponse:
        async with contextlib.AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(contextlib.aclosing(router.stream(r))) for r in parsed.requests()
            ]
            try:
                # Refusals come before the first chunk: answer them with their HTTP status, not a stream.
                async with asyncio.TaskGroup() as group:
                    heads = [group.create_task(anext(s)) for s in streams]
            except* ProtocolError as failed:
                raise parsed.error(failed.exceptions[0]) from None  # type: ignore[arg-type]
            except* StopAsyncIteration:
                raise HTTPError(500, "an answer ended before it began", code="internal") from None
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await out.prepare(http)
            usages: list[pb.Usage] = [pb.Usage()] * len(streams)
            try:
                async for index, chunk in _merged([h.result() for h in heads], streams):
                    if chunk.HasField("route"):
                        usages[index] = chunk.usage
                    await _send(out, [answer.event(index, chunk)])
                if parsed.include_usage:
                    await _send(out, [answer.usage_event(usages)])
            except ProtocolError as exc:
                await _send(out, [parsed.error(exc).body()])
            except HTTPError as exc:
                await _send(out, [exc.body()])
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def completions(http: web.Request, endpoint: str) -> web.StreamResponse:
        parsed = await parse(http, endpoint)
        answer = _Answer(parsed, router.name)
        if parsed.stream:
            return await streamed(http, parsed, answer)
        return await whole(parsed, answer)

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


async def _merged(
    heads: Sequence[pb.GenerateStreamResponse], streams: Sequence[AsyncIterator[pb.GenerateStreamResponse]]
) -> AsyncIterator[tuple[int, pb.GenerateStreamResponse]]:
    """Each stream's chunks tagged with its index, as they come (the heads first); the first failure ends it."""
    for index, head in enumerate(heads):
        yield index, head
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, pb.GenerateStreamResponse | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[pb.GenerateStreamResponse]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except Exception as exc:
            await queue.put((index, exc))
        await queue.put((index, None))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _send(out: web.StreamResponse, events: list[dict[str, Any] | None]) -> None:
    for event in events:
        if event is not None:
            await out.write(f"data: {json.dumps(event)}\n\n".encode())
