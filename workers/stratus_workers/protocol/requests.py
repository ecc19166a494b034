"""What a valid request is: prompt rendering, sampling parameters and the limits every server enforces.

The router renders prompts and validates sampling for the speculative policy with the same functions
the model server uses, so both refuse a bad request with the same message; the compression Job renders
the teacher's prompts with them too, so a distilled student learns on the ids it will be served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.errors import ProtocolError

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 128
MAX_SPECULATIVE_TOKENS = 16
MAX_SESSION_ID = 128
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # token ids with a bias, per request
MAX_PENALTY = 2.0
MAX_BIAS = 100.0

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How tokens are chosen: for an answer (Generate) or for a speculative session (Draft, Verify, Score).

    A speculative session only reads temperature, top_p and seed; the answer's budget, stop sequences,
    penalties, logit bias and what to return besides the text belong to Generate.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per position, with logprobs
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending
    echo: bool = False  # the prompt's tokens with their log-probabilities

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change the logits before a token is chosen."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def render_prompt(tokenizer: Any, request: pb.GenerateRequest) -> list[int]:
    """Token ids for the request's prompt or chat messages (chat template applied)."""
    return encode_text(tokenizer, *prompt_text(tokenizer, request))


def encode_text(tokenizer: Any, text: str, special: bool) -> list[int]:
    """`text`'s ids, with the tokenizer's special tokens added or not (`prompt_text` says which)."""
    return list(tokenizer.encode(text) if special else tokenizer.encode(text, add_special_tokens=False))


def prompt_text(tokenizer: Any, request: pb.GenerateRequest) -> tuple[str, bool]:
    """The text a request's prompt tokenizes from, and whether the tokenizer adds its special tokens to it.

    A chat is rendered by its template (which writes the special tokens itself), exactly as
    `apply_chat_template(..., tokenize=True)` renders it before tokenizing without special tokens.
    """
    kind = request.WhichOneof("input")
    if kind == "chat":
        messages = []
        for i, message in enumerate(request.chat.messages):
            if message.role not in CHAT_ROLES:
                raise ProtocolError(
                    _INVALID,
                    f"chat.messages[{i}].role is {message.role!r}; use one of {', '.join(CHAT_ROLES)}",
                    f"chat.messages[{i}].role",
                )
            messages.append({"role": message.role, "content": message.content})
        if not messages:
            raise ProtocolError(_INVALID, "chat.messages is empty; send at least one message", "chat.messages")
        if getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)), False
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:", True
    if kind == "prompt":
        if not request.prompt:
            raise ProtocolError(_INVALID, "prompt is empty", "prompt")
        return request.prompt, True
    raise ProtocolError(_INVALID, "the request has neither prompt nor chat; set one of them", "prompt")


def _check_distribution(temperature: float, top_p: float, prefix: str) -> None:
    if not 0.0 <= temperature <= 2.0:
        raise ProtocolError(
            _INVALID,
            f"{prefix}temperature is {temperature}; it must be within [0, 2] (0 is greedy)",
            f"{prefix}temperature",
        )
    if not 0.0 <= top_p <= 1.0:
        raise ProtocolError(_INVALID, f"{prefix}top_p is {top_p}; it must be within [0, 1]", f"{prefix}top_p")


def generation_sampling(request: pb.GenerateRequest, *, max_new_tokens: int, default_new_tokens: int) -> Sampling:
    """The validated Sampling of a GenerateRequest, or ProtocolError naming the bad field.

    `max_new_tokens` is the largest budget this server allows; a request that asks for none gets
    `default_new_tokens` (capped by it).
    """
    wanted = request.max_new_tokens or min(default_new_tokens, max_new_tokens)
    if wanted > max_new_tokens:
        raise ProtocolError(
            _INVALID, f"max_new_tokens is {wanted}; this server allows at most {max_new_tokens}", "max_new_tokens"
        )
    _check_distribution(request.temperature, request.top_p, "")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise ProtocolError(_INVALID, f"{len(request.stop)} stop sequences given; at most {MAX_STOP_SEQUENCES}", "stop")
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise ProtocolError(_INVALID, f"stop[{i}] must be 1 to {MAX_STOP_LENGTH} characters", f"stop[{i}]")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if not -MAX_PENALTY <= value <= MAX_PENALTY:  # NaN fails too
            raise ProtocolError(_INVALID, f"{name} is {value}; it must be within [-2, 2] (0 is none)", name)
    if len(request.logit_bias) > MAX_LOGIT_BIAS:
        raise ProtocolError(
            _INVALID, f"logit_bias holds {len(request.logit_bias)} tokens; at most {MAX_LOGIT_BIAS}", "logit_bias"
        )
    for token, bias in request.logit_bias.items():
        if token < 0 or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise ProtocolError(
                _INVALID,
                f"logit_bias[{token}] is {bias}; token ids are non-negative and biases within [-100, 100]",
                "logit_bias",
            )
    if request.top_logprobs > MAX_TOP_LOGPROBS or (request.top_logprobs and not request.return_logprobs):
        raise ProtocolError(
            _INVALID,
            f"top_logprobs is {request.top_logprobs}; it must be 0 to {MAX_TOP_LOGPROBS}, with return_logprobs",
            "top_logprobs",
        )
    return Sampling(
        max_new_tokens=wanted,
        temperature=float(request.temperature),
        top_p=float(request.top_p) or 1.0,
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        logprobs=request.return_logprobs,
        top_logprobs=request.top_logprobs,
        presence_penalty=float(request.presence_penalty),
        frequency_penalty=float(request.frequency_penalty),
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in request.logit_bias.items() if b)),
        echo=request.echo,
    )


def session_sampling(sampling: pb.SpeculativeSampling) -> Sampling:
    """The validated Sampling of a Draft or Verify call, or ProtocolError naming the bad field."""
    _check_distribution(sampling.temperature, sampling.top_p, "sampling.")
    return Sampling(
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p) or 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
    )


def speculative_sampling(request: pb.GenerateRequest) -> pb.SpeculativeSampling:
    """The sampling a speculative answer asks of its Draft and Verify calls: the request's own."""
    sampling = pb.SpeculativeSampling(temperature=request.temperature, top_p=request.top_p)
    if request.HasField("seed"):
        sampling.seed = request.seed
    return sampling


def check_session_id(session_id: str) -> None:
    """ProtocolError unless `session_id` is 1 to MAX_SESSION_ID characters."""
    if not session_id or len(session_id) > MAX_SESSION_ID:
        raise ProtocolError(_INVALID, f"session_id must be 1 to {MAX_SESSION_ID} characters", "session_id")
