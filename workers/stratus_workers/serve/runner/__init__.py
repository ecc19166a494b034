"""Model runners: batched forward passes of one model over a per-row KV cache, the engine's only compute.

`ModelRunner` is the interface the engine and the speculative sessions use. Two paths implement
it: `modules.ModuleRunner` drives the Hugging Face modules themselves (exactly their arithmetic;
quantized and pruned layers work unchanged), and `fused.FusedRunner` runs fused weights with a
static decode step (`graphs.py`: batch buckets, CUDA graphs, decode-ahead) and can shard over a
tensor-parallel group. `build.build_runner` picks one.

Each row of the cache sits at its own position, which is what lets the engine add and remove
requests between decode steps (continuous batching) and roll a row back (speculative
verification) without rebuilding anything.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stratus_workers.serve.parallel import STOP, ParallelContext
from stratus_workers.serve.runner.cache import KVCache, check_truncation
from stratus_workers.serve.runner.staging import to_device as to_device

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the runner can drive."""


_UNMARKED = contextlib.nullcontext()  # reusable: entering it does nothing


def no_mark(name: str) -> contextlib.AbstractContextManager[Any]:
    """A phase's name on a trace's timeline, when nothing traces (serve/loop.py's StepTrace): nothing (one shared
    context, so the hot path's phases allocate nothing)."""
    return _UNMARKED


def check_supported(model: Any) -> None:
    """Raise UnsupportedModelError naming the model type unless it is a Llama-family causal LM."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type or '?'!r} is not supported by the serving runner; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def new_token_slots(
    first_row: int, starts: Sequence[int], q_lens: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Where each real new token of a padded [batch, q_max] forward goes: (batch index, query index, cache
    row, cache position), one entry per token; None when no row is padded (every row has q_max tokens).

    A padded slot must not be written: past a row's end it could lie past the cache (rows at different
    lengths, as prefix-cache hits and prefill chunks make them) or on a position another write fills.
    """
    if min(q_lens) == max(q_lens):
        return None
    lens = np.asarray(q_lens, dtype=np.int64)
    batch_idx = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    query_idx = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    positions = np.asarray(starts, dtype=np.int64)[batch_idx] + query_idx
    arrays = (batch_idx, query_idx, batch_idx + first_row, positions)
    return tuple(to_device(a, device) for a in arrays)  # type: ignore[return-value]


def check_rows(
    rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int], max_rows: int
) -> None:
    """ValueError unless `forward_rows` can take these: ascending rows of the runner, each with new tokens to
    score (at least one scored)."""
    if not rows or len(rows) != len(tokens) or len(rows) != len(logits_from):
        raise ValueError("forward_rows needs one token list and one logits_from per row, and at least one row")
    if any(b <= a for a, b in itertools.pairwise(rows)):
        raise ValueError(f"forward_rows needs ascending rows, got {list(rows)}")
    if rows[0] < 0 or rows[-1] >= max_rows:
        raise ValueError(f"rows {rows[0]}..{rows[-1]} are outside this runner's {max_rows}")
    if any(not 0 <= start < len(t) for start, t in zip(logits_from, tokens, strict=True)):
        raise ValueError("every row needs new tokens, and logits_from must leave at least one of them to score")


def env_flag(name: str, default: bool) -> bool:
    """A STRATUS_* switch: unset or empty gives `default`; 0, false, no, off turn it off."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def env_int(name: str, default: int, lo: int, hi: int) -> int:
    """A STRATUS_* number: unset or empty gives `default`; ValueError, naming the variable, outside lo..hi."""
    value = (os.environ.get(name) or "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = lo - 1
    if not lo <= number <= hi:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    return number


@dataclass
class Decoded:
    """One decode step's result: every row's logits, greedy choice, and that choice's log-probability.

    `greedy` and `greedy_logprobs` come from the step itself (on the fused path, computed on the
    device before the next step is launched ahead), so a greedy caller reads them without waiting
    on the logits; `greedy_logprobs` is None unless the step was asked for them.
    """

    logits: torch.Tensor
    greedy: list[int]
    greedy_logprobs: list[float] | None
    joined: list[int] | None = None  # a device `join`'s tokens, read back (see ModelRunner.decode)


def decoded(logits: torch.Tensor, logprobs: bool) -> Decoded:
    """A decode step's result from its [rows, vocab] logits: the greedy choices (and their log-probabilities)."""
    best = logits.argmax(dim=-1)
    picked = None
    if logprobs:
        picked = (logits.gather(1, best[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).tolist()
    return Decoded(logits, best.tolist(), picked)


class ModelRunner(abc.ABC):
    """One model and a KV cache of `max_rows` rows; the engine keeps its decode rows contiguous from 0.

    Every entry point runs in inference mode, so tensors one call makes are updated in place by the
    next whatever thread calls, and on rank 0 of a tensor-parallel group each is repeated to the
    other ranks first. Subclasses provide `_forward` (and may capture work ahead in `_warmup`).
    """

    cache: KVCache
    # Whether the engine should run a step's decode rows and prefill chunks as one pass (`forward_mixed`): where
    # that pass is the packed one (runner/fused.py), one read of the weights instead of two.
    mixed_step = False
    # Names phases on a trace's timeline (the packed pass: "pass"); serve/loop.py's StepTrace sets its own.
    mark: Callable[[str], contextlib.AbstractContextManager[Any]] = staticmethod(no_mark)

    def __init__(
        self,
        model: Any,
        *,
        max_rows: int,
        max_len: int,
        parallel: ParallelContext | None = None,
        pool_tokens: int = 0,
    ) -> None:
        check_supported(model)
        config = model.config
        self.model = model
        self.config = config
        self.max_rows = max_rows
        self.max_len = max_len
        self.pool_tokens = pool_tokens
        self.parallel = parallel
        self.layers = list(model.model.layers)
        self.vocab_size = int(config.vocab_size)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.scale = self.head_dim**-0.5
        self.device = next(model.parameters()).device
        # Quantized layers hold integer codes; activations (and the cache) follow the norms' dtype.
        self.dtype = model.model.norm.weight.dtype
        # What the model has computed since start: forward passes, and the token positions they held.
        self.passes = 0
        self.positions = 0

    # -- the interface --------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """Tokens held by each row."""
        return self.cache.lengths

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def cache_bytes(self) -> int:
        return self.cache.bytes()

    @torch.inference_mode()
    def forward(
        self, first_row: int, tokens: Sequence[Sequence[int]], *, all_logits: bool = False, logits_from: int = 0
    ) -> torch.Tensor:
        """Append `tokens[i]` to row `first_row + i` and return logits.

        Returns [B, V] logits of each row's last new token, or [B, Q, V] for every new token
        when `all_logits` (Q is the longest row; shorter rows are padded at the end). With
        `logits_from`, only new tokens from that index on are scored ([B, Q - logits_from, V]): the
        earlier ones go into the cache without the vocabulary projection (a verification's context).
        """
        batch = len(tokens)
        if batch == 0:
            raise ValueError("forward needs at least one row")
        if first_row < 0 or first_row + batch > self.max_rows:
            raise ValueError(f"rows {first_row}..{first_row + batch - 1} are outside this runner's {self.max_rows}")
        q_lens = [len(t) for t in tokens]
        if min(q_lens) == 0:
            raise ValueError("every row needs at least one new token")
        if logits_from and not (all_logits and 0 <= logits_from < max(q_lens)):
            raise ValueError(
                f"logits_from={logits_from} needs all_logits=True and a value below the longest row's {max(q_lens)} "
                "new tokens"
            )
        starts = self.cache.lengths[first_row : first_row + batch]
        self.cache.grow(max(s + q for s, q in zip(starts, q_lens, strict=True)))
        # Before computing: the other ranks must join this call's all-reduces.
        self._lead("forward", first_row, [list(t) for t in tokens], all_logits=all_logits, logits_from=logits_from)
        self.passes += 1
        self.positions += sum(q_lens)
        return self._forward(first_row, tokens, starts, q_lens, all_logits, logits_from)

    @torch.inference_mode()
    def forward_rows(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int]
    ) -> torch.Tensor:
        """Append `tokens[i]` to row `rows[i]` (any rows, ascending) and score them from index `logits_from[i]` on.

        Returns [sum over i of len(tokens[i]) - logits_from[i], V]: the scored tokens' logits, row after row
        (a verification of many sessions at once). Here one padded `forward` over rows min..max does it:
        a row in between that is not named gets one throwaway token, rolled back at once, and every row is
        padded to the longest; `FusedRunner` packs the tokens instead, with no padding and no row in between.
        """
        check_rows(rows, tokens, logits_from, self.max_rows)
        lo, hi = rows[0], rows[-1]
        named = dict(zip(rows, range(len(rows)), strict=True))
        feed = [list(tokens[named[row]]) if row in named else [0] for row in range(lo, hi + 1)]
        kept = {row: self.lengths[row] for row in range(lo, hi + 1) if row not in named}
        skip = min(logits_from)
        try:
            logits = self.forward(lo, feed, all_logits=True, logits_from=skip)
        finally:
            for row, length in kept.items():
                self.truncate(row, length)
        parts = [
            logits[row - lo, start - skip : len(row_tokens) - skip]
            for row, row_tokens, start in zip(rows, tokens, logits_from, strict=True)
        ]
        return torch.cat(parts)

    def forward_rows_greedy(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int], plan: np.ndarray
    ) -> tuple[torch.Tensor, int] | None:
        """`forward_rows` and the greedy verdicts of its scores (`speculative.greedy_verdicts`) in one, where a
        runner has a faster way to both (`FusedRunner`); else None, with nothing run. `plan` [2, S]: per scored
        position the draft token it predicts (-1 at a row's last) and its row's index in `rows`. Returns the device
        values [stops (R), tokens (R), log-probabilities (at least S)] and R; rows past len(rows) mean nothing."""
        return None

    @torch.inference_mode()
    def forward_mixed(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], from_decode: int = 0
    ) -> torch.Tensor:
        """Append `tokens[i]` to row `rows[i]` (ascending; decoding rows with one token each, prefilling rows with
        a chunk of their prompts) in one pass; [len(rows), V] logits of each row's last new token.

        `from_decode` > 0: rows 0..from_decode-1 come first and their tokens (placeholders in `tokens`) are the
        greedy choices of the decode step just queued, taken on the device (a runner that decodes ahead only).
        """
        if from_decode:
            raise ValueError(f"{type(self).__name__} has no decode step's choices on the device")
        return self.forward_rows(rows, tokens, [len(t) - 1 for t in tokens])

    def ahead_in_flight(self) -> bool:
        """Whether a decode step launched ahead of time (decode-ahead) waits to be taken by the next `decode`."""
        return False

    def prefill_beside(self, rows: Sequence[int], slots: Sequence[int]) -> contextlib.AbstractContextManager[bool]:
        """A context for the work of one prefill (its rows' resets and prefix loads, its `forward`) that writes only
        `rows` and reads the prefix pool's blocks `slots`: where a runner can, that work runs beside the decode step
        launched ahead instead of queued behind it, and the context says True; work after it is queued behind both.
        Here: as ever, False."""
        return contextlib.nullcontext(False)

    def prime_decode(self, ids: Sequence[int] | torch.Tensor) -> None:
        """A path that decodes ahead starts the decode step of rows 0..len(ids)-1 fed `ids` now (a device tensor:
        tokens the caller is about to choose, still being computed); the next `decode` with these ids takes it.
        Others do nothing (the next `decode` computes it)."""
        return None

    def primed_tokens(self) -> list[int] | None:
        """The tokens the decode step last primed with a device tensor was fed (the pass's greedy choices), read
        back once they reach the host, which is before that step runs: a caller reads a pass's argmax here without
        queueing work behind the step primed on it; None where no step primed so waits to be taken."""
        return None

    @torch.inference_mode()
    def decode(
        self,
        ids: Sequence[int],
        *,
        logprobs: bool = False,
        join: Sequence[int] | torch.Tensor = (),
        hold: bool = False,
        then: Callable[[], None] | None = None,
    ) -> Decoded:
        """A decode step: feed `ids[i]` to row i (rows 0..len(ids)-1, one token each).

        `join`: the first tokens of the rows after them that join the batch at the next step (a path
        that starts the next step ahead of time starts theirs too; the others need not know). Given as
        a device tensor (only to a runner whose `device_join` is true), they come back as `joined`.

        `hold`, `then` (a path that decodes ahead; others launch nothing ahead and refuse `then`): launch no step
        ahead after this one (the caller mixes the tokens after it with a prefill), and call `then` once this step
        is queued, before waiting for it. Both apply to this call only, whether it returns or raises.
        """
        batch = len(ids)
        if not 0 < batch <= self.max_rows:
            raise ValueError(f"a decode step of {batch} rows does not fit this runner's {self.max_rows}")
        self.cache.grow(max(self.cache.lengths[:batch]) + 1)
        self._lead("decode", list(ids), logprobs=logprobs)
        self.passes += 1
        self.positions += batch
        return self._decode(list(ids), logprobs, join, hold, then)

    @torch.inference_mode()
    def save_prefix(self, row: int, positions: list[int], slots: list[int], block: int) -> None:
        """Copy blocks of `row` (starting at `positions`) into the prefix pool's `slots`."""
        self.cache.save_blocks(row, positions, slots, block)
        self._lead("save_prefix", row, positions, slots, block)

    @torch.inference_mode()
    def load_prefix(self, row: int, slots: list[int], block: int, ids: Sequence[int] = ()) -> None:
        """Fill the empty `row` with the prefix pool's blocks `slots`, in order (`ids`: the prefix cache's ids of
        those blocks, by which a cache that keeps a shared prefix knows the row holds it: KVCache.share)."""
        self.cache.load_blocks(row, slots, block, ids)
        self._lead("load_prefix", row, slots, block, list(ids))

    @torch.inference_mode()
    def reset(self, row: int) -> None:
        """Empty `row` (a request left, or a session row is taken)."""
        self.cache.reset(row)
        self._lead("reset", row)

    @torch.inference_mode()
    def truncate(self, row: int, length: int) -> None:
        """Forget everything after `length` tokens in `row` (rejected speculative tokens)."""
        self.cache.truncate(row, length)
        self._lead("truncate", row, length)  # after: a refused call is not repeated

    @torch.inference_mode()
    def truncate_rows(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """`truncate` of several rows at once (verified sessions): one update of the device's lengths, not one per
        row; ValueError, and no change, when a length is past its row's end."""
        rows, lengths = list(rows), list(lengths)
        check_truncation(self.cache.lengths, rows, lengths)
        if rows:
            self.cache.set_row_lengths(rows, lengths)
            self._lead("truncate_rows", rows, lengths)  # after: a refused call is not repeated

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Move row `src`'s cache into row `dst` (keeps active rows contiguous after one leaves)."""
        if src != dst:
            self.cache.move(src, dst)
            self._lead("move", src, dst)

    @torch.inference_mode()
    def warmup(self, max_kv_len: int | None = None, batch_sizes: Sequence[int] | None = None) -> int:
        """Prepare work ahead of traffic (decode graphs on CUDA); returns how many graphs exist."""
        self._lead("warmup", max_kv_len, batch_sizes)
        return self._warmup(max_kv_len, batch_sizes)

    def close(self) -> None:
        """On rank 0: release the other ranks from `follow()` (they return and their processes exit)."""
        self._lead(STOP)

    def describe(self) -> str:
        """What the engine reports as its runner (EngineInfo.runner)."""
        return type(self).__name__

    # -- what a path provides -------------------------------------------------------------

    @abc.abstractmethod
    def _forward(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
        logits_from: int = 0,
    ) -> torch.Tensor:
        """Run the rows (the cache already holds room for them) and set their new lengths."""

    def _decode(
        self,
        ids: list[int],
        logprobs: bool,
        join: Sequence[int] | torch.Tensor,
        hold: bool = False,
        then: Callable[[], None] | None = None,
    ) -> Decoded:
        """A decode step through `_forward`; paths with a static step of their own replace it."""
        if then is not None:
            raise ValueError(f"{type(self).__name__} decodes one step at a time: nothing to run `then` behind")
        starts = self.cache.lengths[: len(ids)]
        result = decoded(self._forward(0, [[t] for t in ids], starts, [1] * len(ids), False), logprobs)
        if isinstance(join, torch.Tensor):
            result.joined = join.tolist()
        return result

    def _warmup(self, max_kv_len: int | None, batch_sizes: Sequence[int] | None) -> int:
        return 0

    # -- a forward in parts (pipeline stages run them on different processes) ---------------

    def padded_ids(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """[B, Q] token ids on the device, each row padded at the end to the longest."""
        ids = np.zeros((len(tokens), max(len(t) for t in tokens)), dtype=np.int64)
        for i, row_tokens in enumerate(tokens):
            ids[i, : len(row_tokens)] = row_tokens
        return to_device(ids, self.device)

    def last_tokens(self, h: torch.Tensor, q_lens: Sequence[int]) -> torch.Tensor:
        """[B, Q, H] -> [B, H]: each row's last real token."""
        last = to_device([q - 1 for q in q_lens], h.device)
        return h[torch.arange(h.shape[0], device=h.device), last]

    # The torch runners provide these; a runner that cannot run in parts (llama.cpp's) cannot be a stage.
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, Q] ids -> [B, Q, hidden] activations (the model's embedding)."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot run a forward in parts (a pipeline stage)")

    def extend_hidden(self, first_row: int, h: torch.Tensor, starts: list[int], q_lens: list[int]) -> torch.Tensor:
        """Run this runner's decoder layers over rows first_row.. ([B, Q, hidden], row i's `q_lens[i]` real
        tokens from position `starts[i]`), write their keys and values, set their lengths; the residual out."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot run a forward in parts (a pipeline stage)")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [..., hidden] -> [..., vocab] float32 logits."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot run a forward in parts (a pipeline stage)")

    def _lead(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.parallel is not None:
            self.parallel.lead(method, *args, **kwargs)
