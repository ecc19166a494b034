"""Prompt rendering and request validation: each refusal names the field and what to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from transformers import AutoTokenizer

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError
from stratus_workers.protocol.requests import (
    MAX_SESSION_ID,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    Sampling,
    check_session_id,
    generation_sampling,
    render_prompt,
    session_sampling,
    speculative_sampling,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


class PlainTokenizer:
    """A tokenizer without a chat template: one id per character."""

    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def chat(*messages: tuple[str, str]) -> pb.GenerateRequest:
    request = pb.GenerateRequest()
    request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    return request


def test_render_prompt_and_chat(tokenizer: Any) -> None:
    assert render_prompt(tokenizer, pb.GenerateRequest(prompt="Hello there")) == tokenizer.encode("Hello there")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert render_prompt(tokenizer, chat(("system", "Be brief."), ("user", "Hi"))) == list(expected)
    # Without a chat template the roles are written out, ending where the assistant speaks.
    plain = render_prompt(PlainTokenizer(), chat(("user", "Hi")))
    assert "".join(map(chr, plain)) == "user: Hi\nassistant:"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.GenerateRequest(), "the request has neither prompt nor chat; set one of them"),
        (pb.GenerateRequest(prompt=""), "prompt is empty"),
        (chat(), "chat.messages is empty; send at least one message"),
        (chat(("user", "a"), ("robot", "b")), "chat.messages[1].role is 'robot'; use one of system, user, assistant"),
    ],
)
def test_render_prompt_refusals(tokenizer: Any, request_: pb.GenerateRequest, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        render_prompt(tokenizer, request_)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(message)


def test_generation_sampling_defaults_and_fields() -> None:
    sampling = generation_sampling(pb.GenerateRequest(prompt="x"), max_new_tokens=64, default_new_tokens=128)
    assert sampling == Sampling(max_new_tokens=64, top_p=1.0) and sampling.greedy
    request = pb.GenerateRequest(
        prompt="x", max_new_tokens=5, temperature=0.7, top_p=0.9, stop=["\n"], seed=3, return_logprobs=True
    )
    sampling = generation_sampling(request, max_new_tokens=64, default_new_tokens=16)
    assert sampling == Sampling(
        max_new_tokens=5, temperature=pytest.approx(0.7), top_p=pytest.approx(0.9), stop=("\n",), seed=3, logprobs=True
    )
    assert not sampling.greedy


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_new_tokens": 65}, "max_new_tokens is 65; this server allows at most 64"),
        ({"temperature": 2.5}, "temperature is 2.5; it must be within [0, 2] (0 is greedy)"),
        ({"top_p": 1.5}, "top_p is 1.5; it must be within [0, 1]"),
        ({"stop": ["s"] * (MAX_STOP_SEQUENCES + 1)}, f"{MAX_STOP_SEQUENCES + 1} stop sequences given; at most 8"),
        ({"stop": ["ok", ""]}, f"stop[1] must be 1 to {MAX_STOP_LENGTH} characters"),
        ({"stop": ["x" * (MAX_STOP_LENGTH + 1)]}, f"stop[0] must be 1 to {MAX_STOP_LENGTH} characters"),
    ],
)
def test_generation_sampling_refusals(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        generation_sampling(pb.GenerateRequest(prompt="x", **fields), max_new_tokens=64, default_new_tokens=16)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == message


def test_session_sampling_and_ids() -> None:
    assert session_sampling(pb.SpeculativeSampling()) == Sampling()
    seeded = session_sampling(pb.SpeculativeSampling(temperature=1.0, top_p=0.5, seed=9))
    assert (seeded.temperature, seeded.top_p, seeded.seed, seeded.greedy) == (1.0, 0.5, 9, False)
    with pytest.raises(ProtocolError, match=r"sampling.temperature is -1.0; it must be within \[0, 2\]"):
        session_sampling(pb.SpeculativeSampling(temperature=-1.0))
    with pytest.raises(ProtocolError, match=r"sampling.top_p is 2.0"):
        session_sampling(pb.SpeculativeSampling(top_p=2.0))
    check_session_id("s" * MAX_SESSION_ID)
    for bad in ("", "s" * (MAX_SESSION_ID + 1)):
        with pytest.raises(ProtocolError, match="session_id must be 1 to 128 characters"):
            check_session_id(bad)


def test_speculative_sampling_carries_the_request_s_own() -> None:
    request = pb.GenerateRequest(prompt="x", temperature=0.8, top_p=0.95, seed=4)
    answer = generation_sampling(request, max_new_tokens=1, default_new_tokens=1)
    session = session_sampling(speculative_sampling(request))
    assert (session.temperature, session.top_p, session.seed) == (answer.temperature, answer.top_p, answer.seed)
    assert not speculative_sampling(pb.GenerateRequest(prompt="x")).HasField("seed")
