"""Incremental detokenization gives exactly the text of a full decode, also across split characters; stops cut it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from stratus_workers.protocol.text import TextAssembler, find_stop, partial_stop_len, text_decoder

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


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_direct_decoder_gives_what_the_tokenizers_decode_gives(tokenizer: Any, data: st.DataObject) -> None:
    # Any ids: special ones (skipped by both), byte tokens that split a character, plain words.
    specials = sorted(tokenizer.all_special_ids)
    ids = data.draw(st.lists(st.one_of(st.integers(0, len(tokenizer) - 1), st.sampled_from(specials)), max_size=24))
    decode = text_decoder(tokenizer)
    assert decode.func == tokenizer.backend_tokenizer.decode  # the bundled tokenizer cleans up no spaces
    assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_tokenizer_that_cleans_up_spaces_decodes_through_transformers(tiny_model_dir: Path) -> None:
    cleaning = AutoTokenizer.from_pretrained(tiny_model_dir, clean_up_tokenization_spaces=True)
    decode = text_decoder(cleaning)
    assert decode.func == cleaning.decode
    ids = cleaning.encode("a , b . c 's", add_special_tokens=False)
    assert decode(ids) == cleaning.decode(ids, skip_special_tokens=True)


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
