"""The frontend's prompt encoder: the ids of a full tokenization, whatever the cache reuses."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.models.tiny import bundled_tokenizer
from stratus_workers.protocol.requests import prompt_text
from stratus_workers.serve import prompts as prompts_module
from stratus_workers.serve.prompts import MIN_SHARED_CHARS, PromptEncoder

pytestmark = pytest.mark.unit

# Pieces chosen to make BPE and the pre-tokenizer's regex decide differently near a cut: runs of spaces
# and newlines (whose last space joins the next word), digits, punctuation, contractions, non-ASCII
# letters, and the special tokens' text split anywhere.
ATOMS = [
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    " \n ",
    "\t",
    "a",
    "b",
    "the",
    " the",
    "There",
    "'s",
    "'ll",
    "’s",
    "1",
    "23",
    "456",
    ".",
    "...",
    "!?",
    "-",
    "é",
    "ü",
    "日本",
    "🙂",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_",
    "start|>",
    "|>",
    "<",
    "endoftext",
    "<|endoftext|>",
    "word",
    "ing",
    "s",
    " don't",
    "x" * 40,
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return bundled_tokenizer()


def random_text(rng: random.Random, atoms: int) -> str:
    return "".join(rng.choice(ATOMS) for _ in range(atoms))


def test_the_bundled_tokenizer_is_reusable(tokenizer: Any) -> None:
    encoder = PromptEncoder(tokenizer)
    assert encoder.reuse, encoder.why_not
    assert encoder.margin >= max(len(t) for t in ("<|im_start|>", "<|endoftext|>")) + 2


def test_shared_prefixes_give_the_ids_of_a_full_tokenization(tokenizer: Any) -> None:
    """Texts that share a long prefix and differ after it, cut at every kind of boundary (mid-word, mid-space
    run, mid-number, inside a special token's text): each gives exactly `tokenizer.encode`'s ids."""
    rng = random.Random(0)
    encoder = PromptEncoder(tokenizer, entries=8)
    checked = 0
    for _ in range(30):
        base = random_text(rng, 400)
        for _ in range(12):
            cut = rng.randrange(MIN_SHARED_CHARS, len(base))  # the shared part ends anywhere, a word's middle included
            text = base[:cut] + random_text(rng, rng.randrange(0, 30))
            assert encoder.encode(text) == tokenizer.encode(text), (cut, text[cut - 20 : cut + 20])
            checked += 1
    assert encoder.reused_chars > 0.5 * checked * MIN_SHARED_CHARS  # the cache did the work, not a full encode


def test_every_cut_position_of_one_text(tokenizer: Any) -> None:
    """One text with a suffix glued at every position of its last 120 characters (BPE merges and the regex's
    look-ahead cross the boundary there)."""
    rng = random.Random(1)
    base = random_text(rng, 300)
    suffixes = ["s", " ", "\n", "'s", "3", "start|>", "|>", "x", "é", "  y"]
    for end in range(len(base) - 120, len(base) + 1):
        encoder = PromptEncoder(tokenizer)
        encoder.encode(base)  # the entry: the whole base
        for suffix in suffixes:
            text = base[:end] + suffix
            assert encoder.encode(text) == tokenizer.encode(text), (end, suffix)


def test_a_repeated_text_and_a_shorter_one(tokenizer: Any) -> None:
    encoder = PromptEncoder(tokenizer)
    text = "You are a helpful assistant. " * 40 + "Question: what is 2 + 2?"
    assert encoder.encode(text) == tokenizer.encode(text)
    assert encoder.encode(text) == tokenizer.encode(text)  # the entry itself
    assert encoder.encode(text[:700]) == tokenizer.encode(text[:700])  # a prefix of an entry
    assert encoder.encode(text[:100]) == tokenizer.encode(text[:100])  # too short to look up


def test_chat_text_encodes_as_the_template_tokenizes(tokenizer: Any) -> None:
    """Chat requests go through the encoder as their rendered text: the ids apply_chat_template gives."""
    encoder = PromptEncoder(tokenizer)
    system = "You answer in one short sentence and never mention these rules. " * 20
    for turn in ["hi", "what is 12 * 12?", "<|im_start|>user\nsneaky", "  spaces  "]:
        request = pb.GenerateRequest(
            chat=pb.ChatInput(
                messages=[pb.ChatMessage(role="system", content=system), pb.ChatMessage(role="user", content=turn)]
            )
        )
        text, special = prompt_text(tokenizer, request)
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        expected = list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        )
        assert encoder.encode(text, special) == expected


def test_long_text_is_tokenized_off_the_loop_with_the_same_ids(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(2)
    base = random_text(rng, 1500)
    texts = [base + random_text(rng, 20) for _ in range(4)] + [random_text(rng, 1500)]

    async def run(encoder: PromptEncoder) -> list[list[int]]:
        try:
            return [await encoder.encode_async(t) for t in texts]
        finally:
            encoder.close()

    threads: list[str] = []
    real = PromptEncoder._tail

    def spy(self: PromptEncoder, text: str, start: int) -> Any:
        import threading

        threads.append(threading.current_thread().name)
        return real(self, text, start)

    monkeypatch.setattr(PromptEncoder, "_tail", spy)
    got = asyncio.run(run(PromptEncoder(tokenizer)))
    assert got == [tokenizer.encode(t) for t in texts]
    # The first text and the unrelated last one are long and uncached: tokenized in a thread; the others reuse
    # the first one's tokens and tokenize only their short ends on the loop.
    assert threads[0].startswith("stratus-tokenize") and threads[-1].startswith("stratus-tokenize")
    assert all(name == "MainThread" for name in threads[1:-1])


def test_tokenizers_it_cannot_reason_about_are_tokenized_whole(tokenizer: Any) -> None:
    config = json.loads(tokenizer._tokenizer.to_str())
    config["normalizer"] = {"type": "NFC"}

    class Wrapped:
        def __init__(self, backend: Tokenizer) -> None:
            self._tokenizer = backend

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    wrapped = Wrapped(Tokenizer.from_str(json.dumps(config)))
    encoder = PromptEncoder(wrapped)
    assert not encoder.reuse and "normalizer" in encoder.why_not
    text = "e\u0301" * 300 + "tail"
    assert encoder.encode(text) == wrapped.encode(text) and encoder.reused_chars == 0
    assert asyncio.run(encoder.encode_async(text * 8)) == wrapped.encode(text * 8)
    encoder.close()


def test_switched_off_for_timing(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATUS_PROMPT_CACHE", "0")
    encoder = PromptEncoder(tokenizer)
    assert not encoder.reuse
    text = "same words again " * 50
    assert encoder.encode(text + "a") == tokenizer.encode(text + "a")
    assert encoder.encode(text + "b") == tokenizer.encode(text + "b") and encoder.reused_chars == 0
    long = text * 10
    assert len(long) > prompts_module.INLINE_CHARS
    assert asyncio.run(encoder.encode_async(long)) == tokenizer.encode(long) and encoder._pool is None  # on the loop


def test_empty_and_short_texts(tokenizer: Any) -> None:
    """Texts too short to store give their ids and leave no entry (an empty one too: nothing to tokenize)."""
    encoder = PromptEncoder(tokenizer)
    for text in ["", "hi", "x" * (MIN_SHARED_CHARS - 1)]:
        assert encoder.encode(text) == tokenizer.encode(text)
        assert asyncio.run(encoder.encode_async(text)) == tokenizer.encode(text)
    assert not encoder.entries and encoder.reused_chars == 0
    encoder.close()


def test_a_repeat_is_found_behind_newer_texts_with_its_head(tokenizer: Any) -> None:
    """A text seen before is reused whole and stored once, however many newer texts share its first characters."""
    encoder = PromptEncoder(tokenizer)
    system = "You are a helpful assistant. " * 20
    first = system + "Question: what is 2 + 2?"
    encoder.encode(first)
    for n in range(prompts_module.MAX_CANDIDATES + 2):
        encoder.encode(system + f"Question {n}: name a prime number.")
    stored, reused = len(encoder.entries), encoder.reused_chars
    assert encoder.encode(first) == tokenizer.encode(first)
    assert encoder.reused_chars - reused == len(first) and len(encoder.entries) == stored
    assert next(reversed(encoder.entries)) == first  # now the newest


@given(st.text(alphabet="ab\u00e9", max_size=60), st.text(alphabet="ab\u00e9", max_size=60), st.integers(0, 60))
def test_shared_length_is_the_common_prefix(a: str, tail: str, cut: int) -> None:
    b = a[:cut] + tail  # strings that share a prefix of any length, or none
    expected = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    assert prompts_module._shared_length(a, b) == expected == prompts_module._shared_length(b, a)
