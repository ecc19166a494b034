"""Incremental detokenization with stop sequences: turns generated token ids into safe text deltas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextAssembler:
    """Tracks one answer's tokens and text; `add` returns the text that is safe to emit now.

    Text is held back while the last token ends in the middle of a multi-byte character, or while
    the end of the text could still grow into a stop sequence, so a caller never sees text that
    is later taken back.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; returns the new safe text. Sets `stopped` when a stop sequence matched."""
        self.tokens.append(token)
        full: str = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if full.endswith("\ufffd"):
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
