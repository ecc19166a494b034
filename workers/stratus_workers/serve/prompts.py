"""Prompt text to token ids in the frontend: repeated text prefixes reuse their tokens, long text goes to a thread."""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import dataclasses
import json
import os
from typing import Any

from stratus_workers.protocol.requests import encode_text

# Text the cache cannot cover and shorter than this is tokenized on the event loop: a thread hop costs more
# than ~20 µs of tokenizing. Longer text goes to a thread, where the Rust tokenizer releases the GIL.
INLINE_CHARS = 2048
# A cached entry is reused only when it shares at least this many characters with the new text.
MIN_SHARED_CHARS = 256
MAX_CANDIDATES = 4  # entries sharing a text's first characters that are compared with it further (newest first)


@dataclasses.dataclass
class _Entry:
    """A text tokenized before (its key in the cache): its ids, and where its pre-tokenizer's pieces start
    (char offset, token index)."""

    ids: list[int]
    piece_chars: list[int]
    piece_tokens: list[int]


@dataclasses.dataclass
class _Rest:
    """A text after its cut: its ids, and its pieces' starts in the whole text (none when it is not stored)."""

    ids: list[int]
    piece_chars: list[int]
    piece_tokens: list[int]


def _reusable(backend: Any) -> tuple[bool, str]:
    """Whether `backend` (a `tokenizers.Tokenizer`) is a pipeline whose prefix tokens can be reused (and why not).

    Reuse rests on how such a pipeline works: the text is first split at added tokens, then each part by
    the byte-level pre-tokenizer's regex (GPT-2's, no look-behind, left to right, looking at most one
    character past a piece), and BPE then encodes each piece on its own. Two texts that share their first
    L characters therefore split into the same pieces up to any piece start x at least `margin(backend)`
    characters before L, so the tokens before x are the same, and the tokens from x on are those of the
    text from x on, encoded alone. Anything that could see further (a normalizer, a prefix space added to
    the start, added tokens that swallow the whitespace around them, BPE dropout, special tokens added
    around the text, truncation) voids the argument, and such tokenizers are always tokenized whole.
    """
    try:
        config = json.loads(backend.to_str())
    except (AttributeError, ValueError) as exc:
        return False, f"not a tokenizers pipeline ({exc})"
    pre = config.get("pre_tokenizer") or {}
    model = config.get("model") or {}
    if config.get("normalizer") is not None:
        return False, "it has a normalizer"
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return False, "its pre-tokenizer is not byte-level with GPT-2's regex and no prefix space"
    if model.get("type") != "BPE" or model.get("dropout"):
        return False, "its model is not deterministic BPE"
    if backend.truncation is not None or backend.padding is not None:
        return False, "it truncates or pads"
    post = config.get("post_processor")
    if post is not None and (
        post.get("type") != "TemplateProcessing" or backend.post_processor.num_special_tokens_to_add(False)
    ):
        return False, "its post-processor adds special tokens or trims offsets"
    added = config.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return False, "an added token strips whitespace or matches whole words only"
    return True, ""


class PromptEncoder:
    """`encode(text)`: the same ids as `tokenizer.encode(text)`, computed for less.

    Requests that start with the same long text (a system prompt, few-shot examples, a conversation so
    far) are common, and tokenizing a 1,000-token prompt costs the frontend about 2 ms of CPU on the
    event loop's thread, during which no stream is served. The encoder keeps the last `entries` texts it
    tokenized; a new text that shares at least MIN_SHARED_CHARS leading characters with one of them takes
    that entry's tokens up to a piece start safely before the shared part ends (see `_reusable`) and
    tokenizes only the rest. What is still long goes to a thread (`encode_async`).
    """

    def __init__(self, tokenizer: Any, entries: int = 16) -> None:
        self.tokenizer = tokenizer
        backend: Any = getattr(tokenizer, "_tokenizer", None)
        self.backend = backend
        self.reuse, self.why_not = _reusable(backend) if backend is not None else (False, "no fast tokenizer")
        # A/B timing: STRATUS_PROMPT_CACHE=0 tokenizes every text whole on the event loop, as the frontend did before.
        self.inline = os.environ.get("STRATUS_PROMPT_CACHE") == "0"
        if self.inline:
            self.reuse, self.why_not = False, "STRATUS_PROMPT_CACHE=0"
        self.margin = 0
        if self.reuse:
            longest = max((len(t.content) for t in backend.get_added_tokens_decoder().values()), default=0)
            # One character of regex look-ahead, and an added token that starts in the shared part but ends after it.
            self.margin = max(32, longest + 2)
        self.entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # by text, oldest first
        self.capacity = entries
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.reused_chars = 0  # characters whose tokens came from an entry (tests and benchmarks read them)

    # -- the ids -------------------------------------------------------------------------------------

    def encode(self, text: str, special: bool = True) -> list[int]:
        """The ids of `text`, exactly as `tokenizer.encode(text, add_special_tokens=special)` gives them."""
        if not self.reuse:  # (a reusable tokenizer adds no special tokens: `special` changes nothing there)
            return encode_text(self.tokenizer, text, special)
        plan = self._plan(text)
        return self._finish(text, plan, self._rest(text, plan[0], plan[1]))

    async def encode_async(self, text: str, special: bool = True) -> list[int]:
        """`encode(text, special)`, with the part no entry covers tokenized in a thread when it is long."""
        loop = asyncio.get_running_loop()
        if not self.reuse:
            if self.backend is None or self.inline or len(text) <= INLINE_CHARS:
                return encode_text(self.tokenizer, text, special)
            # A fast tokenizer's `encode` goes through `encode_batch`, which releases the GIL while it works.
            return await loop.run_in_executor(self._executor(), encode_text, self.tokenizer, text, special)
        plan = self._plan(text)
        if len(text) - plan[0] <= INLINE_CHARS:
            rest = self._rest(text, plan[0], plan[1])
        else:  # the entries are only touched here, on the loop's thread
            rest = await loop.run_in_executor(self._executor(), self._rest, text, plan[0], plan[1])
        return self._finish(text, plan, rest)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # -- how -----------------------------------------------------------------------------------------

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="stratus-tokenize")
        return self._pool

    def _plan(self, text: str) -> tuple[int, int, _Entry | None]:
        """(char offset, token index, entry) to cut at: the entry's tokens before the cut are this text's."""
        best: tuple[int, int, _Entry | None] = (0, 0, None)
        if len(text) < MIN_SHARED_CHARS:
            return best
        same = self.entries.get(text)
        if same is not None:  # this very text again
            self.entries.move_to_end(text)
            return len(text), len(same.ids), same
        head = text[:MIN_SHARED_CHARS]
        candidates = 0
        for known, entry in reversed(self.entries.items()):
            if not known.startswith(head):
                continue
            candidates += 1
            if candidates > MAX_CANDIDATES:  # requests that share a head mostly share as much with the newest ones
                break
            shared = _shared_length(known, text)
            # The last piece start at least `margin` characters before the shared part ends (see _reusable).
            i = bisect.bisect_right(entry.piece_chars, shared - self.margin) - 1
            if i < 0 or entry.piece_chars[i] < MIN_SHARED_CHARS or entry.piece_chars[i] <= best[0]:
                continue
            best = (entry.piece_chars[i], entry.piece_tokens[i], entry)
        return best

    def _tail(self, text: str, start: int) -> Any:
        """The tokenizer's encoding of `text[start:]` (None when nothing is left)."""
        if start >= len(text):
            return None
        return self.backend.encode_batch([text[start:]], add_special_tokens=False)[0]

    def _rest(self, text: str, start: int, count: int) -> _Rest | None:
        """`text[start:]` tokenized, and (for a text long enough to be stored) where its pieces start, the
        first at token `count` of the whole; this is what a thread runs, so walking the pieces stays off the loop."""
        tail = self._tail(text, start)
        if tail is None:
            return None
        chars: list[int] = []
        tokens: list[int] = []
        if len(text) >= MIN_SHARED_CHARS:
            previous = None
            for n, (word, offset) in enumerate(zip(tail.word_ids, tail.offsets, strict=True)):
                if n == 0 or word is None or word != previous:
                    chars.append(start + offset[0])
                    tokens.append(count + n)
                previous = word
        return _Rest(list(tail.ids), chars, tokens)

    def _finish(self, text: str, plan: tuple[int, int, _Entry | None], rest: _Rest | None) -> list[int]:
        start, count, entry = plan
        self.reused_chars += start
        if len(text) < MIN_SHARED_CHARS:  # nothing reused, nothing stored
            return [] if rest is None else rest.ids
        if rest is None:  # this very text again
            assert entry is not None
            return list(entry.ids)
        if entry is None:
            ids = rest.ids
            chars, tokens = rest.piece_chars, rest.piece_tokens
        else:
            ids = entry.ids[:count] + rest.ids
            kept = bisect.bisect_left(entry.piece_chars, start)  # the entry's pieces before the cut
            chars = entry.piece_chars[:kept] + rest.piece_chars
            tokens = entry.piece_tokens[:kept] + rest.piece_tokens
        self.entries[text] = _Entry(ids, chars, tokens)
        self.entries.move_to_end(text)  # (two requests for one text tokenized at once in threads both store it)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return list(ids)


def _shared_length(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share (binary search over C-speed slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        # Only the part past `lo`, which is known to be shared: a 3,000-token system prompt is ~22,000 characters,
        # and slicing from 0 each time copied ~20 times that per candidate (26 against 6 µs).
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
