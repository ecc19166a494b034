"""Incremental detokenization with stop sequences: turns generated token ids into safe text deltas."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, from its Rust tokenizer directly where that is all the
    transformers call does (a fast tokenizer that cleans up no spaces): the frontend decodes twice per stream
    message, and transformers' conversions around the call cost more than the decode (~4 against ~2 µs
    for 12 ids on the development CPU)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


class TextAssembler:
    """Tracks one answer's tokens and text; `add` returns the text that is safe to emit now.

    Text is held back while the last token ends in the middle of a multi-byte character, or while
    the end of the text could still grow into a stop sequence, so a caller never sees text that
    is later taken back.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.decode = text_decoder(tokenizer)
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        # Incremental detokenization: only tokens[_prefix:] are decoded per call, so a token costs
        # the same at the end of a long answer as at its start (a full decode per token is O(n),
        # and the server decodes once per token of every sequence in the batch).
        self._decoded = ""  # text of tokens[:_read]
        self._prefix = 0  # start of the decode window: a few tokens of context before _read
        self._read = 0

    def _decode_more(self) -> str | None:
        """All text so far, or None while the last token ends inside a multi-byte character."""
        decode = self.decode
        before = decode(self.tokens[self._prefix : self._read])
        window = decode(self.tokens[self._prefix :])
        if window.endswith("\ufffd"):
            return None
        # Decoding the window with its context gives the same spacing as decoding everything.
        self._decoded += window[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        return self._decoded

    def add(self, token: int) -> str:
        """Append a token; returns the new safe text. Sets `stopped` when a stop sequence matched."""
        self.tokens.append(token)
        return self._advance()

    def extend(self, tokens: Sequence[int]) -> str:
        """Append several tokens with one decode (a stream that fell behind); returns the new safe text.

        Without stop sequences this is `add` for each token, joined. With them, call `add` per token:
        only that says which token completed a stop sequence.
        """
        self.tokens.extend(tokens)
        return self._advance()

    def _advance(self) -> str:
        full = self._decode_more()
        if full is None:
            return ""
        self.text = full
        stop_at = find_stop(full, self.stop, self.emitted)
        if stop_at is not None:
            self.text = full[:stop_at]
            self.stopped = True
            return self.flush()
        safe = len(full) - partial_stop_len(full, self.stop)
        delta = full[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the answer)."""
        rest = self.text[self.emitted :]
        self.emitted = len(self.text)
        return rest


def find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    """Where the earliest stop sequence starts in `text`, looking only where it could overlap new text."""
    best: int | None = None
    for stop in stops:
        idx = text.find(stop, max(0, emitted - len(stop)))
        if idx != -1 and (best is None or idx < best):
            best = idx
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest
