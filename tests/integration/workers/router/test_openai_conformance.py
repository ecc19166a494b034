"""OpenAI conformance: the official `openai` SDK drives the router's HTTP API over every documented parameter.

Each answer is validated against the SDK's own types (pydantic, strict: every required field present, no
field the type lacks except the top-level `stratus`), each refusal against OpenAI's error shape (the SDK's
exception class, `type`, `code`, `param`). The parameter list is the SDK's: a parameter the SDK documents
that the router's table lacks fails the suite.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel
from transformers import AutoTokenizer

from stratus_workers.router.config import RouterConfig
from stratus_workers.router.openai_request import PARAMETERS, parameters
from stratus_workers.router.server import RouterServer
from stratus_workers.serve.server import ModelServer, ServerSettings

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ROUTER = "stratus-test"
HELLO = [{"role": "user", "content": "Say hello"}]


class Stack:
    def __init__(self, router: RouterServer, tokenizer: Any) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.base = f"http://127.0.0.1:{router.http_port}/v1"
        self.client = openai.AsyncOpenAI(base_url=self.base, api_key="unused", max_retries=0, timeout=60)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir: Path) -> AsyncIterator[Stack]:
    """An edge and a cloud server (the tiny model, named tiny-edge and tiny-cloud) behind one router."""
    async with AsyncExitStack() as stack:
        backends = []
        for tier in ("edge", "cloud"):
            settings = ServerSettings(
                model=str(tiny_model_dir), name=f"tiny-{tier}", tier=tier, port=0, http_port=0, log_format="text"
            )
            server = ModelServer(settings)
            await server.start()
            stack.push_async_callback(server.stop, 0.5)
            backends.append({"name": tier, "address": server.address, "tier": tier})
        config = RouterConfig.model_validate(
            {
                "routing": {"policy": "cloud-only", "cache": {"enabled": False}},
                "backends": backends,
                "tokenizer": str(tiny_model_dir),
                "healthIntervalSeconds": 0.3,
            }
        )
        router = RouterServer(config, model_name=ROUTER)
        await router.start()
        stack.push_async_callback(router.stop, 0.5)
        yield Stack(router, AutoTokenizer.from_pretrained(tiny_model_dir))


def assert_conforms(data: dict[str, Any], model: type[BaseModel], extra: frozenset[str] = frozenset()) -> Any:
    """`data` validated strictly as the SDK's `model`, with no field the type lacks (bar `extra` at the top)."""
    parsed = model.model_validate(data, strict=True)
    unknown = set(parsed.model_extra or {}) - extra
    assert not unknown, f"{model.__name__} has fields the SDK's type lacks: {unknown}"
    _no_extra(parsed, model.__name__)
    return parsed


def _no_extra(value: Any, where: str) -> None:
    if isinstance(value, BaseModel):
        if where.count(".") > 0:
            assert not value.model_extra, f"{where} has fields the SDK's type lacks: {set(value.model_extra or {})}"
        for name in type(value).model_fields:
            _no_extra(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _no_extra(item, f"{where}[{i}]")


async def chat(stack: Stack, **kwargs: Any) -> tuple[ChatCompletion, dict[str, Any]]:
    kwargs.setdefault("model", ROUTER)
    kwargs.setdefault("messages", HELLO)
    raw = await stack.client.chat.completions.with_raw_response.create(**kwargs)
    data = json.loads(raw.text)
    assert_conforms(data, ChatCompletion, frozenset({"stratus"}))
    return raw.parse(), data


def echo_as_typed(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with an echoed prompt's first log-probabilities filled in for validation.

    OpenAI answers `null` for the first echoed token (nothing predicts it), as this router does; the SDK's
    type lists floats only.
    """
    data = json.loads(json.dumps(data))
    for choice in data["choices"]:
        logprobs = choice.get("logprobs") or {}
        if logprobs.get("token_logprobs") and logprobs["token_logprobs"][0] is None:
            logprobs["token_logprobs"][0] = 0.0
        if logprobs.get("top_logprobs") and logprobs["top_logprobs"][0] is None:
            logprobs["top_logprobs"][0] = {}
    return data


async def complete(stack: Stack, **kwargs: Any) -> tuple[Completion, dict[str, Any]]:
    kwargs.setdefault("model", ROUTER)
    kwargs.setdefault("prompt", "Once upon a time")
    raw = await stack.client.completions.with_raw_response.create(**kwargs)
    data = json.loads(raw.text)
    assert_conforms(echo_as_typed(data) if kwargs.get("echo") else data, Completion, frozenset({"stratus"}))
    return raw.parse(), data


async def chat_stream(stack: Stack, **kwargs: Any) -> list[ChatCompletionChunk]:
    kwargs.setdefault("model", ROUTER)
    kwargs.setdefault("messages", HELLO)
    chunks = [chunk async for chunk in await stack.client.chat.completions.create(stream=True, **kwargs)]
    for chunk in chunks:
        assert_conforms(chunk.to_dict(mode="json"), ChatCompletionChunk, frozenset({"stratus"}))
    return chunks


async def complete_stream(stack: Stack, **kwargs: Any) -> list[Completion]:
    kwargs.setdefault("model", ROUTER)
    kwargs.setdefault("prompt", "Once upon a time")
    chunks = [chunk async for chunk in await stack.client.completions.create(stream=True, **kwargs)]
    for i, chunk in enumerate(chunks):
        data = chunk.to_dict(mode="json")
        # The SDK types streamed completions with the whole answer's type, whose finish_reason is never null;
        # OpenAI (and this router) send null until the last choice chunk.
        for choice in data["choices"]:
            if choice["finish_reason"] is None and i < len(chunks) - 1:
                choice["finish_reason"] = "length"
        assert_conforms(echo_as_typed(data) if i == 0 else data, Completion, frozenset({"stratus"}))
    return chunks


def chat_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- refused parameters ------------------------------------------------------------------------------------------


# A value for every refused parameter that asks for something (not its neutral value).
REFUSED_SAMPLES: dict[str, Any] = {
    "store": True,
    "service_tier": "flex",
    "modalities": ["text", "audio"],
    "best_of": 2,
    "suffix": " the end",
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "Hello"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
    "moderation": {"input": {"mode": "block"}},
    "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "implicit"},
    "prompt_cache_retention": "24h",
    "safety_identifier": "someone",
}


async def test_every_refused_parameter_has_a_sample() -> None:
    assert {p.name for p in PARAMETERS if not p.supported} == set(REFUSED_SAMPLES)


@pytest.mark.parametrize(
    ("endpoint", "name"), [(e, p.name) for p in PARAMETERS if not p.supported for e in p.endpoints]
)
async def test_refused_parameters_get_a_400_that_names_them(stack: Stack, endpoint: str, name: str) -> None:
    sample = {name: REFUSED_SAMPLES[name]}
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "chat":
            await stack.client.chat.completions.create(model=ROUTER, messages=HELLO, max_tokens=2, **sample)
        else:
            await stack.client.completions.create(model=ROUTER, prompt="x", max_tokens=2, **sample)
    error = caught.value
    assert (error.param, error.code, error.type) == (name, "unsupported_parameter", "invalid_request_error")
    assert name in error.message


@pytest.mark.parametrize(("endpoint", "name"), [(e, p.name) for p in PARAMETERS if p.neutral for e in p.endpoints])
async def test_neutral_values_of_refused_parameters_are_accepted(stack: Stack, endpoint: str, name: str) -> None:
    spec = parameters("chat" if endpoint == "chat" else "completions")[name]
    neutral = {name: spec.neutral[0]}
    if endpoint == "chat":
        answer, _ = await chat(stack, max_tokens=3, **neutral)
        plain, _ = await chat(stack, max_tokens=3)
        assert answer.choices[0].message.content == plain.choices[0].message.content
    else:
        completion, _ = await complete(stack, max_tokens=3, **neutral)
        plain_completion, _ = await complete(stack, max_tokens=3)
        assert completion.choices[0].text == plain_completion.choices[0].text


async def test_unknown_parameters_are_refused_by_name(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.client.chat.completions.create(model=ROUTER, messages=HELLO, extra_body={"top_k": 5})
    assert (caught.value.param, caught.value.code) == ("top_k", "unknown_parameter")
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.client.completions.create(model=ROUTER, prompt="x", extra_body={"messages": []})
    assert (caught.value.param, caught.value.code) == ("messages", "unknown_parameter")


# -- supported parameters, each with its effect -----------------------------------------------------------------


async def test_chat_shape_and_budget(stack: Stack) -> None:
    answer, data = await chat(stack, max_tokens=5)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert answer.usage is not None and answer.usage.completion_tokens <= 5
    assert choice.finish_reason in ("stop", "length") and (choice.finish_reason == "length") == (
        answer.usage.completion_tokens == 5
    )
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.model == "tiny-cloud"  # the model that answered (cloud-only)
    assert data["stratus"] == {
        "tier": "cloud",
        "policy": "cloud-only",
        "reason": "policy",
        "backend": "cloud",
        "escalated": False,
        "degraded": False,
        "cached": False,
    }
    again, _ = await chat(stack, max_completion_tokens=5)
    assert again.choices[0].message.content == choice.message.content


async def test_completion_shape_and_logprobs(stack: Stack) -> None:
    completion, _ = await complete(stack, max_tokens=6, logprobs=0)
    choice = completion.choices[0]
    assert isinstance(choice, CompletionChoice) and completion.usage is not None
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == completion.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset or []) and (logprobs.text_offset or [0])[0] == 0
    assert logprobs.top_logprobs is None  # no alternatives asked for
    plain, _ = await complete(stack, max_tokens=6)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == choice.text
    streamed = await complete_stream(stack, max_tokens=6, logprobs=0)
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens or [] if c.choices[0].logprobs else [])]
    assert tokens == logprobs.tokens
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    alternatives, _ = await complete(stack, max_tokens=6, logprobs=3)
    top = alternatives.choices[0].logprobs.top_logprobs if alternatives.choices[0].logprobs else None
    assert top is not None and len(top) == len(logprobs.tokens) and all(len(t) <= 3 for t in top)
    assert alternatives.choices[0].text == choice.text  # alternatives change nothing that is chosen
    for position, (token, best) in enumerate(zip(logprobs.tokens, top, strict=True)):
        assert max(best.values()) == pytest.approx(logprobs.token_logprobs[position], abs=1e-4), token


async def test_completion_echo(stack: Stack) -> None:
    prompt = "Once upon a time"
    plain, _ = await complete(stack, prompt=prompt, max_tokens=4, logprobs=1)
    echoed, _ = await complete(stack, prompt=prompt, max_tokens=4, echo=True, logprobs=1)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    logprobs, answer = echoed.choices[0].logprobs, plain.choices[0].logprobs
    assert logprobs is not None and answer is not None and echoed.usage is not None
    assert len(logprobs.tokens or []) == echoed.usage.prompt_tokens + echoed.usage.completion_tokens
    assert "".join((logprobs.tokens or [])[: echoed.usage.prompt_tokens]) == prompt
    assert (logprobs.token_logprobs or [])[0] is None and (logprobs.top_logprobs or [])[0] is None
    assert all(lp <= 0 for lp in (logprobs.token_logprobs or [])[1:])
    assert (logprobs.tokens or [])[echoed.usage.prompt_tokens :] == answer.tokens
    assert (logprobs.text_offset or [])[echoed.usage.prompt_tokens] == len(prompt)
    text_only, _ = await complete(stack, prompt=prompt, max_tokens=4, echo=True)
    assert text_only.choices[0].text == echoed.choices[0].text and text_only.choices[0].logprobs is None
    streamed = await complete_stream(stack, prompt=prompt, max_tokens=4, echo=True, logprobs=1)
    assert streamed[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text
    streamed_tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
    assert streamed_tokens == logprobs.tokens


async def test_chat_logprobs_whole_and_streamed(stack: Stack) -> None:
    answer, _ = await chat(stack, max_tokens=6, logprobs=True, top_logprobs=0)
    content = answer.choices[0].logprobs.content if answer.choices[0].logprobs else None
    assert content is not None and answer.usage is not None and len(content) == answer.usage.completion_tokens
    assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) and t.top_logprobs == [] for t in content)
    chunks = await chat_stream(stack, max_tokens=6, logprobs=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    with_top, _ = await chat(stack, max_tokens=6, logprobs=True, top_logprobs=3)
    top_content = with_top.choices[0].logprobs.content if with_top.choices[0].logprobs else None
    assert top_content is not None and [t.token for t in top_content] == [t.token for t in content]
    for token in top_content:  # greedy: the chosen token is the most likely one
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
    streamed_top = await chat_stream(stack, max_tokens=6, logprobs=True, top_logprobs=2)
    assert all(
        len(t.top_logprobs) == 2
        for c in streamed_top
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    )


async def test_streaming_matches_the_whole_answer(stack: Stack) -> None:
    whole, _ = await chat(stack, max_tokens=8)
    chunks = await chat_stream(stack, max_tokens=8)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chat_text(chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # usage only when asked for
    with_usage = await chat_stream(stack, max_tokens=8, stream_options={"include_usage": True})
    assert with_usage[-1].choices == [] and with_usage[-1].usage == whole.usage
    assert with_usage[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    completion, _ = await complete(stack, max_tokens=8)
    streamed = await complete_stream(stack, max_tokens=8, stream_options={"include_usage": True})
    assert "".join(c.choices[0].text for c in streamed[:-1]) == completion.choices[0].text
    assert streamed[-1].usage == completion.usage
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.client.chat.completions.create(model=ROUTER, messages=HELLO, stream_options={"include_usage": True})
    assert caught.value.param == "stream_options"


async def test_sampling_parameters(stack: Stack) -> None:
    greedy, _ = await chat(stack, max_tokens=8)
    text = greedy.choices[0].message.content
    sampled, _ = await chat(stack, max_tokens=8, temperature=1.5, seed=7)
    same_seed, _ = await chat(stack, max_tokens=8, temperature=1.5, seed=7)
    assert sampled.choices[0].message.content == same_seed.choices[0].message.content
    assert sampled.choices[0].message.content != text  # a near-uniform random model never agrees with argmax
    nucleus_of_one, _ = await chat(stack, max_tokens=8, temperature=1.5, top_p=0, seed=7)
    assert nucleus_of_one.choices[0].message.content == text
    narrow, _ = await chat(stack, max_tokens=8, temperature=1.5, top_p=0.5, seed=3)
    assert narrow.choices[0].message.content  # valid; reproducible below
    assert (await chat(stack, max_tokens=8, temperature=1.5, top_p=0.5, seed=3))[0].choices[0].message.content == (
        narrow.choices[0].message.content
    )
    assert text and len(text) > 4
    stop = text[2:4]
    stopped, _ = await chat(stack, max_tokens=8, stop=stop)
    assert stopped.choices[0].finish_reason == "stop" and stop not in (stopped.choices[0].message.content or "")
    assert text.startswith(stopped.choices[0].message.content or "")
    stopped_list, _ = await complete(stack, max_tokens=8, stop=["zzzz", "qqqq"])
    assert stopped_list.choices[0].finish_reason in ("stop", "length")


async def test_penalties_and_logit_bias(stack: Stack) -> None:
    plain, _ = await chat(stack, max_tokens=10, logprobs=True)
    plain_tokens = [t.token for t in (plain.choices[0].logprobs.content or [])] if plain.choices[0].logprobs else []
    assert len(set(plain_tokens)) < len(plain_tokens)  # the random model repeats itself when greedy
    # Its logits spread far less than 2: a presence penalty of 2 rules out every repeat.
    fresh, _ = await chat(stack, max_tokens=10, logprobs=True, presence_penalty=2)
    fresh_tokens = [t.token for t in (fresh.choices[0].logprobs.content or [])] if fresh.choices[0].logprobs else []
    assert len(set(fresh_tokens)) == len(fresh_tokens) and fresh_tokens[0] == plain_tokens[0]
    frequent, _ = await chat(stack, max_tokens=10, frequency_penalty=2)
    assert frequent.choices[0].message.content == fresh.choices[0].message.content
    # Penalties add up per token: a frequency penalty of -2 undoes the presence penalty of 2 on a first repeat
    # and rewards later ones, so the greedy answer is the plain one again.
    cancelled, _ = await chat(stack, max_tokens=10, presence_penalty=2, frequency_penalty=-2)
    assert cancelled.choices[0].message.content == plain.choices[0].message.content
    forced, _ = await chat(stack, max_tokens=4, logit_bias={"42": 100})
    forced_again, _ = await complete(stack, max_tokens=4, logit_bias={"42": 100})
    assert forced.choices[0].message.content == forced_again.choices[0].text == stack.tokenizer.decode([42] * 4)
    first = stack.tokenizer.encode(plain_tokens[0], add_special_tokens=False)
    assert len(first) == 1
    banned, _ = await chat(stack, max_tokens=10, logprobs=True, logit_bias={str(first[0]): -100})
    assert banned.choices[0].logprobs and banned.choices[0].logprobs.content
    assert banned.choices[0].logprobs.content[0].token != plain_tokens[0]
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.client.chat.completions.create(model=ROUTER, messages=HELLO, logit_bias={"100000000": 5})
    assert caught.value.param == "logit_bias" and "vocabulary" in caught.value.message


async def test_several_choices(stack: Stack) -> None:
    sampled, data = await complete(stack, max_tokens=5, n=3, temperature=1.5, seed=11)
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len(data["stratus"]["choices"]) == 3
    texts = [c.text for c in sampled.choices]
    assert len(set(texts)) == 3  # choice i samples with seed + i
    assert [c.text for c in (await complete(stack, max_tokens=5, n=3, temperature=1.5, seed=11))[0].choices] == texts
    assert (await complete(stack, max_tokens=5, temperature=1.5, seed=12))[0].choices[0].text == texts[1]
    usage = sampled.usage
    assert usage is not None and usage.completion_tokens == 15 and usage.total_tokens == usage.prompt_tokens + 15
    greedy, _ = await chat(stack, max_tokens=5, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    chunks = await chat_stream(
        stack, max_tokens=5, n=2, temperature=1.5, seed=3, stream_options={"include_usage": True}
    )
    for index in (0, 1):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].choices[0].delta.role == "assistant" and mine[-1].choices[0].finish_reason == "length"
        whole, _ = await chat(stack, max_tokens=5, temperature=1.5, seed=3 + index)
        assert chat_text(mine) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


async def test_content_parts_metadata_user_and_roles(stack: Stack) -> None:
    plain, _ = await chat(stack, messages=[{"role": "system", "content": "Be brief."}, *HELLO], max_tokens=5)
    parts, _ = await chat(
        stack,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Say hello"}]},
        ],
        max_tokens=5,
        metadata={"purpose": "conformance"},
        user="tester-1",
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.metadata == {"purpose": "conformance"}
    for messages, param, code in [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type",
            "unsupported_value",
        ),
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role", "unsupported_value"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name", "unsupported_parameter"),
        ([{"role": "robot", "content": "x"}], "messages[0].role", "invalid_value"),
        ([], "messages", "invalid_type"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            await stack.client.chat.completions.create(model=ROUTER, messages=messages)
        assert (caught.value.param, caught.value.code) == (param, code), messages


async def test_out_of_range_values_are_400_naming_the_parameter(stack: Stack) -> None:
    for kwargs, param in [
        ({"max_tokens": 2**32}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100000}, "max_tokens"),  # within range, over the server's limit
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            await stack.client.chat.completions.create(model=ROUTER, messages=HELLO, **kwargs)
        assert caught.value.param == param, kwargs
        assert param in caught.value.message and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.client.chat.completions.create(model=ROUTER, messages=HELLO, max_tokens=100000, stream=True)
    assert caught.value.param == "max_tokens"  # refused before the stream starts: a plain 400


async def test_model_names(stack: Stack) -> None:
    listed = await stack.client.models.list()
    assert [m.id for m in listed.data] == [ROUTER, "tiny-cloud", "tiny-edge"]
    for name in (ROUTER, "tiny-cloud", "tiny-edge"):
        model = await stack.client.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", "stratus")
    with pytest.raises(openai.NotFoundError) as caught:
        await stack.client.models.retrieve("gpt-4o")
    assert (caught.value.code, caught.value.param, caught.value.type) == (
        "model_not_found",
        "model",
        "invalid_request_error",
    )
    with pytest.raises(openai.NotFoundError) as caught:
        await stack.client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")
    edge, data = await chat(stack, model="tiny-edge", max_tokens=3)
    assert edge.model == "tiny-edge" and (data["stratus"]["tier"], data["stratus"]["policy"]) == ("edge", "edge-only")
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.client.chat.completions.create(
            model="tiny-edge", messages=HELLO, extra_headers={"X-Stratus-Policy": "cloud-only"}
        )
    assert caught.value.param == "X-Stratus-Policy"


async def test_stratus_object_reports_policy_cache_and_speculation(stack: Stack) -> None:
    _, speculative = await chat(stack, max_tokens=6, extra_headers={"X-Stratus-Policy": "speculative"})
    info = speculative["stratus"]
    assert (info["policy"], info["tier"], info["reason"]) == ("speculative", "cloud", "speculative")
    assert info["rounds"] >= 1 and 0 <= info["accepted_tokens"] <= info["draft_tokens"]


async def test_http_errors_have_openais_shape(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await stack.client.get("/nowhere", cast_to=object)
    assert (missing.value.type, missing.value.code) == ("invalid_request_error", "not_found")
    assert "POST /v1/chat/completions" in missing.value.message
    with pytest.raises(openai.APIStatusError) as wrong_method:
        await stack.client.get("/chat/completions", cast_to=object)
    assert wrong_method.value.status_code == 405
    assert (wrong_method.value.type, wrong_method.value.code) == ("invalid_request_error", "method_not_allowed")
    async with aiohttp.ClientSession() as http:
        for raw, code in [
            (b"{not json", "invalid_json"),
            (b'{"messages": NaN}', "invalid_json"),
            (b"[1]", "invalid_type"),
        ]:
            async with http.post(f"{stack.base}/chat/completions", data=raw) as resp:
                body = await resp.json()
            assert resp.status == 400 and set(body) == {"error"}
            assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
