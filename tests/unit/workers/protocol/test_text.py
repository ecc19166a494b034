"""Incremental detokenization gives exactly the text of a full decode, also across split characters; stops cut it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from stratus_workers.protocol.text import TextAssembler, find_stop, partial_stop_len

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def full_decode_text(tokenizer: Any, ids: list[int]) -> str:
    """What a full decode after every token settles on: the longest prefix not ending mid-character."""
    for end in range(len(ids), 0, -1):
        text: str = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            return text
    return ""


def test_incremental_text_equals_full_decode(tokenizer: Any) -> None:
    rng = random.Random(3)
    multibyte = tokenizer.encode(" héllo wörld 🙂 ü 日本語", add_special_tokens=False)
    for _ in range(20):
        # Random ids (byte tokens among them, so characters split across tokens) and real text.
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)] + multibyte
        rng.shuffle(ids)
        text = TextAssembler(tokenizer)
        streamed = "".join(text.add(t) for t in ids) + text.flush()
        assert streamed == full_decode_text(tokenizer, ids)
    text = TextAssembler(tokenizer)
    assert "".join(text.add(t) for t in multibyte) + text.flush() == " héllo wörld 🙂 ü 日本語"


def test_stop_sequence_still_cuts_the_text(tokenizer: Any) -> None:
    text = TextAssembler(tokenizer, stop=(" three",))
    out = ""
    for t in tokenizer.encode("one two three four", add_special_tokens=False):
        out += text.add(t)
        if text.stopped:
            break
    assert out == "one two" and text.stopped


def test_partial_stop_holdback() -> None:
    assert partial_stop_len("hello wor", ("world",)) == 3
    assert partial_stop_len("hello", ("xyz",)) == 0
    assert partial_stop_len("ab", ("b", "abc")) == 2


def test_find_stop_takes_the_earliest_and_skips_what_was_checked() -> None:
    assert find_stop("a STOP b END", ("END", "STOP"), 0) == 2
    assert find_stop("abc", ("x",), 0) is None
    # Text emitted before could not hold a whole stop sequence, so the search starts just before it.
    assert find_stop("END and more END", ("END",), 10) == 13
