"""OpenAI request bodies: the parameter table against the SDK's, validation that names the parameter, errors."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import grpc
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_params

from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.router.openai_request import (
    ERROR_TYPES,
    HTTP_STATUS,
    HTTPError,
    parameter_table,
    parameters,
    parse_json,
    parse_request,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[4]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def sdk_parameters(params_module: Any) -> set[str]:
    return set(typing.get_type_hints(params_module.CompletionCreateParamsBase))


def test_the_table_holds_exactly_the_parameters_the_sdk_documents() -> None:
    # `stream` is typed on the SDK's two subclasses (streaming or not), not on the base.
    assert set(parameters("chat")) == sdk_parameters(chat_params) | {"stream"}
    assert set(parameters("completions")) == sdk_parameters(completion_create_params) | {"stream"}


def test_docs_hold_the_table() -> None:
    text = (ROOT / "docs" / "reliability.md").read_text()
    found = re.search(r"<!-- openai-parameters:start -->\n(.*?)<!-- openai-parameters:end -->", text, re.S)
    assert found is not None, "docs/reliability.md lacks the openai-parameters block"
    assert found.group(1) == parameter_table(), "regenerate the block from parameter_table()"


def refused(body: Any, endpoint: str = "chat") -> HTTPError:
    with pytest.raises(HTTPError) as caught:
        parse_request(body, "chat" if endpoint == "chat" else "completions")
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({**CHAT, "max_tokens": 2**32}, "max_tokens", "invalid_value"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({**CHAT, "max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({**CHAT, "max_tokens": True}, "max_tokens", "invalid_type"),
        ({**CHAT, "max_tokens": 3, "max_completion_tokens": 3}, "max_tokens", "invalid_value"),
        ({**CHAT, "seed": 2**64}, "seed", "invalid_value"),
        ({**CHAT, "temperature": "hot"}, "temperature", "invalid_type"),
        ({**CHAT, "top_p": 1.01}, "top_p", "invalid_value"),
        ({**CHAT, "stop": [""]}, "stop", "invalid_value"),
        ({**CHAT, "stop": 3}, "stop", "invalid_type"),
        ({**CHAT, "stream": "yes"}, "stream", "invalid_type"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({**CHAT, "stream": True, "stream_options": {"extra": 1}}, "stream_options.extra", "unknown_parameter"),
        ({**CHAT, "logprobs": 1}, "logprobs", "invalid_type"),
        ({**CHAT, "top_logprobs": 0}, "top_logprobs", "invalid_value"),  # needs logprobs: true
        ({**CHAT, "metadata": {"k": 1}}, "metadata", "invalid_type"),
        ({**CHAT, "model": 5}, "model", "invalid_type"),
        ({**CHAT, "n": 129}, "n", "invalid_value"),
        ({**CHAT, "n": True}, "n", "invalid_type"),  # true is not 1
        ({**CHAT, "frequency_penalty": 2.5}, "frequency_penalty", "invalid_value"),
        ({**CHAT, "presence_penalty": "high"}, "presence_penalty", "invalid_type"),
        ({**CHAT, "logit_bias": {"x": 1}}, "logit_bias", "invalid_value"),
        ({**CHAT, "logit_bias": {"99999999999": 1}}, "logit_bias", "invalid_value"),
        ({**CHAT, "logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
        ({**CHAT, "logit_bias": [5]}, "logit_bias", "invalid_type"),
        ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ({**CHAT, "top_k": 3}, "top_k", "unknown_parameter"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "invalid_type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
            "invalid_type",
        ),
        ({"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages[0].colour", "unknown_parameter"),
        ({}, "messages", "missing_required_parameter"),
    ],
)
def test_chat_refusals_name_the_parameter(body: dict[str, Any], param: str, code: str) -> None:
    error = refused(body)
    assert (error.param, error.code) == (param, code)
    assert param.split(".")[0].split("[")[0] in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
        ({"prompt": [1, 2, 3]}, "prompt", "unsupported_value"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": "x", "logprobs": 6}, "logprobs", "invalid_value"),
        ({"prompt": "x", "echo": 1}, "echo", "invalid_type"),
        ({"prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "unsupported_parameter"),
        ({"prompt": "x", "messages": []}, "messages", "unknown_parameter"),
    ],
)
def test_completion_refusals_name_the_parameter(body: dict[str, Any], param: str, code: str) -> None:
    error = refused(body, "completions")
    assert (error.param, error.code) == (param, code)


def test_a_valid_body_becomes_the_request_it_asks_for() -> None:
    parsed = parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "c", "refusal": None, "tool_calls": []},
                {"role": "user", "content": "d"},
            ],
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 2**64 - 1,
            "stop": "x",
            "logprobs": True,
            "top_logprobs": 0,
            "user": "u",
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "frequency_penalty": 0.0,
            "presence_penalty": -1.5,
            "logit_bias": {"42": -100, "7": 3.5, "9": 0},
            "tools": [],
            "store": False,
            "metadata": {"a": "b"},
        },
        "chat",
    )
    request = parsed.request
    assert [(m.role, m.content) for m in request.chat.messages] == [
        ("system", "a\nb"),
        ("assistant", "c"),
        ("user", "d"),
    ]
    assert (request.model, request.max_new_tokens, request.seed, list(request.stop)) == ("m", 7, 2**64 - 1, ["x"])
    assert (request.temperature, request.return_logprobs, request.request_id) == (0.5, True, "u")
    assert request.top_p == pytest.approx(0.9)
    assert (request.frequency_penalty, request.presence_penalty) == (0.0, -1.5)
    assert dict(request.logit_bias) == {42: -100.0, 7: 3.5, 9: 0.0} and parsed.n == 1
    assert (parsed.stream, parsed.include_usage, parsed.tokens_param, parsed.metadata) == (
        True,
        True,
        "max_completion_tokens",
        {"a": "b"},
    )
    # top_p 0 keeps the single most likely token: greedy, whatever the temperature.
    assert parse_request({**CHAT, "temperature": 1.0, "top_p": 0}, "chat").request.temperature == 0.0
    completion = parse_request({"prompt": ["one"], "logprobs": 0}, "completions")
    assert (completion.request.prompt, completion.request.return_logprobs) == ("one", True)
    assert not parse_request({"prompt": "x"}, "completions").request.return_logprobs
    alternatives = parse_request({"prompt": "x", "logprobs": 3, "echo": True}, "completions")
    assert (alternatives.request.top_logprobs, alternatives.request.echo, alternatives.echo) == (3, True, True)
    # Echo without log-probabilities needs the prompt's text only: the server is not asked to score it.
    plain_echo = parse_request({"prompt": "x", "echo": True}, "completions")
    assert (plain_echo.echo, plain_echo.request.echo) == (True, False)


def test_choices_get_their_own_seed() -> None:
    parsed = parse_request({**CHAT, "n": 3, "seed": 2**64 - 2, "temperature": 1.0, "user": "u"}, "chat")
    requests = parsed.requests()
    assert [r.seed for r in requests] == [2**64 - 2, 2**64 - 1, 0]
    assert [r.request_id for r in requests] == ["u#0", "u#1", "u#2"]
    assert all(r.temperature == 1.0 and r.chat == parsed.request.chat for r in requests)
    unseeded = parse_request({**CHAT, "n": 2}, "chat").requests()
    assert not any(r.HasField("seed") for r in unseeded)


def test_json_that_is_not_json_is_refused() -> None:
    for raw in (b"{", b'{"a": NaN}', b'{"a": Infinity}', b"\xff"):
        with pytest.raises(HTTPError) as caught:
            parse_json(raw)
        assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    assert refused([1]).code == "invalid_type"


@pytest.mark.parametrize(
    ("code", "field", "message", "param", "status", "error_code", "text"),
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens",
            "max_new_tokens is 900; at most 512",
            "max_tokens",
            400,
            "invalid_argument",
            "max_tokens is 900; at most 512",
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat.messages[1].role",
            "chat.messages[1].role is 'x'",
            "messages[1].role",
            400,
            "invalid_argument",
            "messages[1].role is 'x'",
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat",
            "prompt too long: 9 tokens",
            "messages",
            400,
            "context_length_exceeded",
            "prompt too long: 9 tokens",
        ),
        (
            grpc.StatusCode.NOT_FOUND,
            "model",
            "model 'x' does not exist",
            "model",
            404,
            "model_not_found",
            "model 'x' does not exist",
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "policy",
            "model 'e' is served by the edge tier only",
            "X-Stratus-Policy",
            400,
            "invalid_argument",
            "model 'e' is served by the edge tier only",
        ),
        (grpc.StatusCode.UNAVAILABLE, "", "no tier can serve", None, 503, "unavailable", "no tier can serve"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", "late", None, 504, "deadline_exceeded", "late"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "", "busy", None, 429, "resource_exhausted", "busy"),
        (grpc.StatusCode.INTERNAL, "", "boom", None, 500, "internal", "boom"),
    ],
)
def test_backend_refusals_in_http_terms(
    code: grpc.StatusCode, field: str, message: str, param: str | None, status: int, error_code: str, text: str
) -> None:
    parsed = parse_request(CHAT, "chat")
    error = parsed.error(ProtocolError(code, message, field))
    assert (error.status, error.param, error.code, error.message) == (status, param, error_code, text)
    assert error.body()["error"]["type"] == ERROR_TYPES[status]


def test_every_grpc_status_maps_to_a_typed_http_status() -> None:
    assert set(HTTP_STATUS.values()) <= set(ERROR_TYPES)
