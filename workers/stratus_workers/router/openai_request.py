"""OpenAI request bodies onto GenerateRequests: every documented parameter either honoured or refused by name.

`PARAMETERS` is the one table of what /v1/chat/completions and /v1/completions accept: each parameter the
OpenAI API documents for them is supported (it changes the answer the way OpenAI says) or refused with a
400 whose `param` names it. A refused parameter may still be sent with its neutral value (`n: 1`,
`tools: []`, `echo: false`, ...), which asks for nothing. A parameter that is not in the table is refused
too (`unknown_parameter`), so nothing a client sends is silently ignored. docs/reliability.md shows the
table (a test checks the copy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.requests import (
    MAX_BIAS,
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
)

Endpoint = Literal["chat", "completions"]
BOTH: tuple[Endpoint, ...] = ("chat", "completions")
CHAT: tuple[Endpoint, ...] = ("chat",)
COMPLETIONS: tuple[Endpoint, ...] = ("completions",)

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Parameter:
    """One request parameter of the OpenAI API and what this router does with it."""

    name: str
    endpoints: tuple[Endpoint, ...]
    supported: bool
    note: str
    # Values of a refused parameter that ask for nothing, and so are accepted (besides null).
    neutral: tuple[Any, ...] = ()


PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "messages",
        CHAT,
        True,
        "text content, as a string or a list of `text` parts; roles `system`, "
        "`developer` (as system), `user`, `assistant`; other part types, `tool`/`function` roles and a "
        "message `name` are refused",
    ),
    Parameter(
        "prompt",
        COMPLETIONS,
        True,
        "one string (or a list holding one); token-id prompts and several prompts are refused",
    ),
    Parameter(
        "model",
        BOTH,
        True,
        "the router's own name (routes by policy) or a tier's model name (that "
        "model only), see `GET /v1/models`; unknown names get 404 `model_not_found`; omitted: the "
        "router's own name",
    ),
    Parameter(
        "max_tokens", BOTH, True, "1 to 2^32-1, and at most the answering server's limit; omitted: the server's default"
    ),
    Parameter("max_completion_tokens", CHAT, True, "as `max_tokens` (give one of them)"),
    Parameter("temperature", BOTH, True, "0 to 2; 0 is greedy"),
    Parameter("top_p", BOTH, True, "0 to 1; 0 keeps only the most likely token (greedy)"),
    Parameter("seed", BOTH, True, "0 to 2^64-1; the same seed and request give the same answer"),
    Parameter(
        "stop", BOTH, True, f"a string or up to {MAX_STOP_SEQUENCES} strings of 1 to {MAX_STOP_LENGTH} characters"
    ),
    Parameter("stream", BOTH, True, "server-sent events, ending with `data: [DONE]`"),
    Parameter(
        "stream_options",
        BOTH,
        True,
        "`include_usage` adds a last chunk with the usage and no choices; "
        "`include_obfuscation: true` is refused; only with `stream: true`",
    ),
    Parameter("logprobs", CHAT, True, "the log-probability of each generated token, streamed too"),
    Parameter(
        "logprobs",
        COMPLETIONS,
        True,
        "0 to 5: each generated token's log-probability (`tokens`, `token_logprobs`, `text_offset`) and, above "
        "0, that many most likely tokens per position (`top_logprobs`); streamed too",
    ),
    Parameter("top_logprobs", CHAT, True, "0 to 20 most likely tokens per position (with `logprobs: true`)"),
    Parameter(
        "frequency_penalty",
        BOTH,
        True,
        "-2 to 2: a token's logit drops by this times the times it appeared in the answer so far",
    ),
    Parameter("presence_penalty", BOTH, True, "-2 to 2: a token's logit drops by this once it appeared in the answer"),
    Parameter(
        "logit_bias",
        BOTH,
        True,
        f"up to {MAX_LOGIT_BIAS} token ids (as strings) with a bias of -100 to 100 added to their logits",
    ),
    Parameter("n", BOTH, True, "1 to 128 choices, generated concurrently; with a `seed`, choice i uses seed + i"),
    Parameter(
        "echo",
        COMPLETIONS,
        True,
        "the prompt comes back before the completion; with `logprobs`, its tokens too (the first one's null)",
    ),
    Parameter("user", BOTH, True, "used as the request id in the router's and servers' logs"),
    Parameter("metadata", CHAT, True, "up to 16 string pairs, returned in the response's `metadata`"),
    Parameter("store", CHAT, False, "nothing is stored", neutral=(False,)),
    Parameter("service_tier", CHAT, False, "there is one processing tier", neutral=("auto", "default")),
    Parameter("modalities", CHAT, False, "text only", neutral=(["text"],)),
    Parameter("best_of", COMPLETIONS, False, "no server-side choice among candidates (use `n`)", neutral=(1,)),
    Parameter("suffix", COMPLETIONS, False, "no insertion", neutral=("",)),
    Parameter(
        "response_format",
        CHAT,
        False,
        "plain text only: JSON modes would need constrained decoding, which the servers do not do",
        neutral=({"type": "text"},),
    ),
    Parameter("tools", CHAT, False, "no tool calling", neutral=([],)),
    Parameter("tool_choice", CHAT, False, "no tool calling", neutral=("none",)),
    Parameter("parallel_tool_calls", CHAT, False, "no tool calling"),
    Parameter("functions", CHAT, False, "no function calling (deprecated by OpenAI)", neutral=([],)),
    Parameter("function_call", CHAT, False, "no function calling (deprecated by OpenAI)", neutral=("none",)),
    Parameter("audio", CHAT, False, "text only"),
    Parameter("prediction", CHAT, False, "no predicted outputs"),
    Parameter("reasoning_effort", CHAT, False, "not a reasoning model"),
    Parameter("verbosity", CHAT, False, "no verbosity control"),
    Parameter("web_search_options", CHAT, False, "no web search"),
    Parameter("moderation", CHAT, False, "no moderation"),
    Parameter("prompt_cache_key", CHAT, False, "no prompt-cache controls"),
    Parameter("prompt_cache_options", CHAT, False, "no prompt-cache controls"),
    Parameter("prompt_cache_retention", CHAT, False, "no prompt-cache controls"),
    Parameter("safety_identifier", CHAT, False, "no abuse monitoring"),
)


def parameters(endpoint: Endpoint) -> dict[str, Parameter]:
    """The parameters of one endpoint by name."""
    return {p.name: p for p in PARAMETERS if endpoint in p.endpoints}


def parameter_table() -> str:
    """The parameter table as markdown (docs/reliability.md holds a copy between `openai-parameters` markers)."""
    rows = ["| parameter | endpoints | here |", "|---|---|---|"]
    for p in PARAMETERS:
        where = ", ".join("chat" if e == "chat" else "completions" for e in p.endpoints)
        if p.supported:
            here = f"supported: {p.note}"
        else:
            accepted = " or ".join(f"`{json.dumps(n)}`" for n in p.neutral)
            here = f"refused with 400 (`unsupported_parameter`){' unless ' + accepted if accepted else ''}: {p.note}"
        rows.append(f"| `{p.name}` | {where} | {here} |")
    return "\n".join(rows) + "\n"


# OpenAI's error `type` for each HTTP status this API answers with (one vocabulary, docs/openai.md).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class HTTPError(Exception):
    """A refusal in OpenAI's error shape: HTTP status, message, the parameter at fault and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> HTTPError:
    return HTTPError(400, message, param=param, code=code)


# gRPC status codes as HTTP statuses. CANCELLED reaches a caller only when a server gave up on the
# request (shutting down), not when the caller left: a server-side failure.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,
}


@dataclass
class OpenAIRequest:
    """A validated request body: the GenerateRequest to route, and how to shape its answer."""

    endpoint: Endpoint
    request: pb.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    tokens_param: str = "max_tokens"
    metadata: dict[str, str] | None = None
    n: int = 1
    echo: bool = False  # completions: the prompt comes back before the completion

    def requests(self) -> list[pb.GenerateRequest]:
        """One GenerateRequest per choice; with a seed, choice i samples with seed + i."""
        if self.n == 1:
            return [self.request]
        choices = []
        for i in range(self.n):
            request = pb.GenerateRequest()
            request.CopyFrom(self.request)
            if request.HasField("seed"):
                request.seed = (request.seed + i) % (UINT64_MAX + 1)
            if request.request_id:
                request.request_id = f"{request.request_id}#{i}"
            choices.append(request)
        return choices

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat"

    def param_of(self, proto_field: str) -> str | None:
        """The HTTP parameter a GenerateRequest field came from (for a backend's refusal)."""
        if not proto_field:
            return None
        if proto_field == "max_new_tokens":
            return self.tokens_param
        if proto_field == "policy":
            return "X-Stratus-Policy"
        if proto_field in ("chat", "prompt", "input"):
            return "messages" if self.chat else "prompt"
        if proto_field.startswith("chat.messages"):
            return "messages" + proto_field.removeprefix("chat.messages")
        return proto_field

    def error(self, exc: ProtocolError) -> HTTPError:
        """A router or backend refusal in OpenAI's shape, naming the HTTP parameter."""
        param = self.param_of(exc.field)
        message = exc.message
        if exc.field and param and message.startswith(exc.field):
            message = param + message[len(exc.field) :]
        code = exc.code.name.lower()
        if exc.code == grpc.StatusCode.NOT_FOUND and exc.field == "model":
            code = "model_not_found"
        elif exc.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt too long" in message:
            code = "context_length_exceeded"
        return HTTPError(HTTP_STATUS.get(exc.code, 500), message, param=param, code=code)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; HTTPError when it is not (NaN and Infinity included)."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(None, f"the request body is not valid JSON: {exc}", "invalid_json") from exc


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _integer(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise bad(key, f"{key} must be an integer, got {json.dumps(value)}", "invalid_type")
    number = int(value)
    if not low <= number <= high:
        raise bad(key, f"{key} is {number}; it must be within [{low}, {high}]")
    return number


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(key, f"{key} must be a number, got {_type_name(value)}", "invalid_type")
    if not math.isfinite(value) or not low <= value <= high:
        raise bad(key, f"{key} is {value}; it must be within [{low:g}, {high:g}]")
    return float(value)


def _boolean(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(key, f"{key} must be true or false, got {_type_name(value)}", "invalid_type")
    return value


def _check_names(body: dict[str, Any], endpoint: Endpoint) -> None:
    """Refuse parameters this endpoint does not know, and refused ones sent with a value."""
    known = parameters(endpoint)
    for key, value in body.items():
        spec = known.get(key)
        if spec is None:
            where = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            raise bad(
                key, f"unknown parameter {key!r} for {where}; docs/reliability.md lists them", "unknown_parameter"
            )
        if not spec.supported and value is not None and not _neutral(value, spec.neutral):
            raise bad(
                key,
                f"{key} is not supported here ({spec.note}); leave it out"
                + (f" or send {json.dumps(spec.neutral[0])}" if spec.neutral else ""),
                "unsupported_parameter",
            )


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # 0 and 0.0 are one neutral value; True is not 1.
    return any(type(value) is type(n) or {type(value), type(n)} == {int, float} for n in neutral if value == n)


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad(where, f"{where} must be a string or a non-empty list of text parts", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad(at, f'{at} must be an object like {{"type": "text", "text": ...}}', "invalid_type")
        if part.get("type") != "text":
            raise bad(
                f"{at}.type", f"{at}.type is {part.get('type')!r}; only text parts are supported", "unsupported_value"
            )
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise bad(f"{at}.{extra[0]}", f"{at}.{extra[0]} is not supported here", "unsupported_parameter")
        if not isinstance(part.get("text"), str):
            raise bad(f"{at}.text", f"{at}.text must be a string", "invalid_type")
        texts.append(part["text"])
    return "\n".join(texts)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(body: dict[str, Any], request: pb.GenerateRequest) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad(
            "messages",
            "messages must be a non-empty list of {role, content} objects",
            "missing_required_parameter" if messages is None else "invalid_type",
        )
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"{where} must be an object with role and content", "invalid_type")
        role = message.get("role")
        if role in ("tool", "function"):
            raise bad(
                f"{where}.role",
                f"{where}.role {role!r} needs tool calling, which is not supported here",
                "unsupported_value",
            )
        if role not in _ROLES:
            raise bad(f"{where}.role", f"{where}.role is {role!r}; use one of {', '.join(_ROLES)}")
        for key in message:
            if key in ("role", "content"):
                continue
            if key in ("refusal", "tool_calls", "function_call", "audio") and message[key] in (None, []):
                continue
            known = key in ("name", "refusal", "tool_calls", "function_call", "audio", "tool_call_id")
            raise bad(
                f"{where}.{key}",
                f"{where}.{key} is not supported here" if known else f"unknown parameter {where}.{key}",
                "unsupported_parameter" if known else "unknown_parameter",
            )
        if "content" not in message or message["content"] is None:
            raise bad(f"{where}.content", f"{where}.content is missing", "missing_required_parameter")
        request.chat.messages.add(role=_ROLES[role], content=_text_content(message["content"], f"{where}.content"))


def _prompt(body: dict[str, Any], request: pb.GenerateRequest) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise bad("prompt", f"prompt holds {len(prompt)} prompts; send one per request", "unsupported_value")
    if isinstance(prompt, list) and prompt and all(isinstance(p, int | list) for p in prompt):
        raise bad("prompt", "prompt as token ids is not supported; send text", "unsupported_value")
    if prompt is None:
        raise bad("prompt", "prompt is required", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise bad("prompt", f"prompt must be a string, got {_type_name(prompt)}", "invalid_type")
    request.prompt = prompt


def _stop(body: dict[str, Any], request: pb.GenerateRequest) -> None:
    stop = body.get("stop")
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "stop must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad("stop", f"stop holds {len(stops)} sequences; at most {MAX_STOP_SEQUENCES}")
    for i, s in enumerate(stops):
        if not 1 <= len(s) <= MAX_STOP_LENGTH:
            raise bad("stop", f"stop[{i}] must be 1 to {MAX_STOP_LENGTH} characters")
    request.stop.extend(stops)


def _logit_bias(body: dict[str, Any], request: pb.GenerateRequest) -> None:
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise bad("logit_bias", "logit_bias must be an object of token ids (as strings) to biases", "invalid_type")
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"logit_bias holds {len(bias)} tokens; at most {MAX_LOGIT_BIAS}")
    for key, value in bias.items():
        if not key.isdigit() or int(key) > 2**31 - 1:
            raise bad("logit_bias", f'logit_bias key {key!r} is not a token id; use token ids as strings, e.g. "42"')
        if isinstance(value, bool) or not isinstance(value, int | float) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise bad(
                "logit_bias", f"logit_bias[{key!r}] is {json.dumps(value)}; it must be a number within [-100, 100]"
            )
        request.logit_bias[int(key)] = float(value)


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    metadata = body.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("metadata", "metadata must be an object of string values", "invalid_type")
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise bad("metadata", "metadata holds at most 16 pairs, keys of up to 64 and values of up to 512 characters")
    return dict(metadata)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict):
        raise bad("stream_options", "stream_options must be an object", "invalid_type")
    for key, value in options.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise bad(f"stream_options.{key}", f"unknown parameter stream_options.{key}", "unknown_parameter")
        if not isinstance(value, bool):
            raise bad(f"stream_options.{key}", f"stream_options.{key} must be true or false", "invalid_type")
    if options.get("include_obfuscation"):
        raise bad(
            "stream_options.include_obfuscation",
            "stream_options.include_obfuscation is not supported here; leave it out or send false",
            "unsupported_value",
        )
    return bool(options.get("include_usage"))


def parse_request(body: Any, endpoint: Endpoint) -> OpenAIRequest:
    """Validate an OpenAI request body into the GenerateRequest to route; HTTPError naming what is wrong."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_type")
    _check_names(body, endpoint)
    request = pb.GenerateRequest()
    parsed = OpenAIRequest(endpoint, request)
    if endpoint == "chat":
        _messages(body, request)
    else:
        _prompt(body, request)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model must be a string, got {_type_name(model)}", "invalid_type")
    request.model = model or ""
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"user must be a string, got {_type_name(user)}", "invalid_type")
    request.request_id = (user or "")[:128]

    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("max_tokens", "give max_tokens or max_completion_tokens, not both")
    if body.get("max_completion_tokens") is not None:
        parsed.tokens_param = "max_completion_tokens"
    budget = _integer(body, parsed.tokens_param, 1, UINT32_MAX)
    request.max_new_tokens = budget or 0
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    request.temperature = 0.0 if top_p == 0.0 else (temperature if temperature is not None else 0.0)
    request.top_p = top_p if top_p is not None else 0.0
    seed = _integer(body, "seed", 0, UINT64_MAX)
    if seed is not None:
        request.seed = seed
    _stop(body, request)

    request.presence_penalty = _number(body, "presence_penalty", -MAX_PENALTY, MAX_PENALTY) or 0.0
    request.frequency_penalty = _number(body, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY) or 0.0
    _logit_bias(body, request)
    parsed.n = _integer(body, "n", 1, 128) or 1
    if endpoint == "chat":
        request.return_logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not request.return_logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        request.top_logprobs = top or 0
        parsed.metadata = _metadata(body)
    else:
        alternatives = _integer(body, "logprobs", 0, 5)
        request.return_logprobs = alternatives is not None
        request.top_logprobs = alternatives or 0
        parsed.echo = _boolean(body, "echo")
        request.echo = parsed.echo and request.return_logprobs  # the prompt's text needs no model

    parsed.stream = _boolean(body, "stream")
    parsed.include_usage = _stream_options(body, parsed.stream)
    return parsed


__all__ = [
    "ERROR_TYPES",
    "HTTP_STATUS",
    "PARAMETERS",
    "HTTPError",
    "OpenAIRequest",
    "Parameter",
    "parameter_table",
    "parameters",
    "parse_json",
    "parse_request",
]
