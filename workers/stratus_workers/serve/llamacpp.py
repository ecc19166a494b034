"""Model runner over llama.cpp: the engine's forward passes on a GGUF model, all rows in one llama context.

The engine and the speculative sessions drive a runner through `serve.runner.ModelRunner`:
`forward(first_row, tokens)` appends tokens to consecutive rows and returns logits, `reset`,
`truncate` and `move` edit one row's cache, and `lengths` says how long each row is. This runner
gives that interface over llama.cpp, so the engine's continuous batching, sampling,
log-probabilities, speculative Draft/Verify, Score, deadlines and cancellation all run unchanged
(and with the same arithmetic on the logits) whichever runner computes them.

Batching: each row is a llama.cpp sequence id in one context whose KV cache is unified (cells
shared by every sequence), so a decode step of n rows is one `llama_decode` of n tokens, a prefill
of several prompts is one (or, past `batch_tokens`, a few) more, and editing a row is a cheap
metadata operation on the cache (`llama_memory_seq_rm` / `seq_cp`). Logits come back as one
host array per call, copied into a torch tensor for the engine.

Imported only by a server that loads a GGUF artifact (and by the compression Job that evaluates
one), so nothing else needs llama-cpp-python installed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import torch

from stratus_workers.models.gguf_artifact import GGUFModel
from stratus_workers.runtimes import LLAMACPP_KV_VALUE_BYTES, kv_bytes_per_token
from stratus_workers.serve.runner import Decoded, ModelRunner, decoded
from stratus_workers.serve.runner.cache import check_truncation

log = logging.getLogger(__name__)

_BACKEND = threading.Lock()
_backend_ready = False
_MODELS: dict[Path, Any] = {}

# ggml's log levels (ggml.h): the binding's own callback maps an older numbering and prints every
# INFO line of a model load to stderr, so llama.cpp's messages go through Python logging instead.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_GGML_CONT = 5
_log_state = {"level": logging.INFO, "threshold": logging.WARNING}
_log_buffer: list[str] = []


def _route_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level != _GGML_CONT:
        _log_state["level"] = _GGML_LEVELS.get(level, logging.INFO)
    if _log_state["level"] < _log_state["threshold"]:
        return
    _log_buffer.append(text.decode("utf-8", "replace"))
    if _log_buffer[-1].endswith("\n"):
        message = "".join(_log_buffer).rstrip()
        _log_buffer.clear()
        # A unified cache lets one sequence reach n_ctx cells, so llama.cpp warns that n_ctx exceeds the
        # training context; the engine caps every row at max_len (at most the model's context) itself.
        if "possible training context overflow" not in message:
            log.log(_log_state["level"], "llama.cpp: %s", message)


_ROUTE_LOG = llama_cpp.llama_log_callback(_route_log)  # held here: llama.cpp keeps only the pointer
llama_cpp.llama_log_set(_ROUTE_LOG, ctypes.c_void_p(0))


def set_log_threshold(level: int) -> int:
    """Log llama.cpp's messages at `level` and above (WARNING by default); returns the previous threshold."""
    previous = _log_state["threshold"]
    _log_state["threshold"] = level
    return previous


def default_threads() -> int:
    """Half the cores this process may run on, at least one (llama-cpp-python's own default).

    ggml's worker threads spin while they wait for each other: on cores the server's Python thread,
    the gRPC loop or other processes also need, a second thread costs far more than it gives
    (measured on 2 shared cores: about 65 tokens/s with one thread, 13 with two; docs/edge-runtime.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def load_llama_model(path: Path) -> Any:
    """A llama_model handle for `path`, loaded once per process (weights are memory-mapped, read-only)."""
    global _backend_ready
    path = Path(path).resolve()
    with _BACKEND:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
        model = _MODELS.get(path)
        if model is None:
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = 0
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
            if not model:
                raise RuntimeError(f"llama.cpp could not load {path}; is it a GGUF file this llama.cpp reads?")
            _MODELS[path] = model
    return model


class LlamaCppRunner(ModelRunner):
    """Rows 0..max_rows-1 are llama.cpp sequences 0..max_rows-1 of one context; each holds up to max_len tokens.

    It implements ModelRunner's public calls itself: the base class's constructor and cache are torch's.
    """

    def __init__(
        self,
        model: GGUFModel,
        *,
        max_rows: int,
        max_len: int,
        threads: int = 0,
        batch_tokens: int = 512,
        kv_tokens: int = 0,
    ) -> None:
        if max_rows < 1 or max_len < 2:
            raise ValueError(f"max_rows must be >= 1 and max_len >= 2, got {max_rows} and {max_len}")
        self.model = model
        self.config = model.config
        self.max_rows = max_rows
        self.max_len = max_len
        self.parallel = None
        self.pool_tokens = 0  # no prefix pool: the engine core runs without a prefix cache over llama.cpp
        self._lengths = [0] * max_rows
        self.passes = 0  # ModelRunner's compute counters (the server exports them)
        self.positions = 0
        self.threads = threads or default_threads()
        self.batch_tokens = batch_tokens
        self._model = load_llama_model(model.path)
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        params = llama_cpp.llama_context_default_params()
        # Every row may grow to max_len, so the shared cache holds that many cells per row by default.
        params.n_ctx = kv_tokens or max_rows * max_len
        params.n_batch = batch_tokens
        params.n_ubatch = batch_tokens
        params.n_seq_max = max_rows
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.kv_unified = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise RuntimeError(
                f"llama.cpp could not create a context of {params.n_ctx} cache cells for {max_rows} rows; "
                "lower max_batch_size, max_sessions or the token limits"
            )
        self._ctx = ctx
        self._finalizer = weakref.finalize(self, llama_cpp.llama_free, ctx)
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.kv_cells = int(llama_cpp.llama_n_ctx(ctx))
        self._init_batch(batch_tokens)

    def _init_batch(self, size: int) -> None:
        # The batch's arrays are numpy buffers, filled with slices rather than per-token ctypes calls.
        self._tokens = np.zeros(size, dtype=np.int32)
        self._pos = np.zeros(size, dtype=np.int32)
        self._n_seq = np.ones(size, dtype=np.int32)
        self._seq = np.zeros(size, dtype=np.int32)
        self._outputs = np.zeros(size, dtype=np.int8)
        seq_ptr = ctypes.POINTER(llama_cpp.llama_seq_id)
        base = self._seq.ctypes.data
        self._seq_ptrs = (seq_ptr * size)(*[ctypes.cast(base + 4 * i, seq_ptr) for i in range(size)])
        # Fields in llama_batch's order: n_tokens, token, embd, pos, n_seq_id, seq_id, logits.
        self._batch = llama_cpp.llama_batch(
            0,
            self._tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            None,
            self._pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            self._n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            self._seq_ptrs,
            self._outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    # -- cache management ---------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """Tokens held by each row."""
        return self._lengths

    @property
    def capacity(self) -> int:
        return self.max_len

    def cache_bytes(self) -> int:
        """The KV cache llama.cpp allocated: every cell, keys and values in f16, for every layer."""
        return self.kv_cells * kv_bytes_per_token(self.config, LLAMACPP_KV_VALUE_BYTES)

    def reset(self, row: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, row, -1, -1)
        self.lengths[row] = 0

    def truncate(self, row: int, length: int) -> None:
        """Forget everything after `length` tokens in `row` (rejected speculative tokens)."""
        check_truncation(self.lengths, [row], [length])
        if length < self.lengths[row]:
            llama_cpp.llama_memory_seq_rm(self._memory, row, length, -1)
        self.lengths[row] = length

    def truncate_rows(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        check_truncation(self.lengths, rows, lengths)
        for row, length in zip(rows, lengths, strict=True):
            self.truncate(row, length)

    def move(self, src: int, dst: int) -> None:
        """Move row `src`'s cache into row `dst` (the unified cache relabels cells; nothing is copied)."""
        if src == dst:
            return
        llama_cpp.llama_memory_seq_rm(self._memory, dst, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, src, -1, -1)
        self.lengths[dst] = self.lengths[src]
        self.lengths[src] = 0

    def close(self) -> None:
        """Free the llama.cpp context (the model stays loaded for other runners in this process)."""
        self._finalizer()

    def warmup(self, max_kv_len: int | None = None, batch_sizes: Sequence[int] | None = None) -> int:
        """One decode step, so the first request does not pay for llama.cpp's graph and weight repacking."""
        row = self.max_rows - 1
        self.forward(row, [[0]])
        self.reset(row)
        return 0

    def _forward(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
        logits_from: int = 0,
    ) -> torch.Tensor:
        return self.forward(first_row, tokens, all_logits=all_logits, logits_from=logits_from)

    # -- forward ------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self, first_row: int, tokens: Sequence[Sequence[int]], *, all_logits: bool = False, logits_from: int = 0
    ) -> torch.Tensor:
        """Append `tokens[i]` to row `first_row + i` and return logits.

        Returns [B, V] logits of each row's last new token, or [B, Q, V] for every new token
        when `all_logits` (Q is the longest row; shorter rows are padded at the end with zeros);
        with `logits_from`, of the new tokens from that index on only ([B, Q - logits_from, V]).
        """
        batch = len(tokens)
        if batch == 0:
            raise ValueError("forward needs at least one row")
        if first_row < 0 or first_row + batch > self.max_rows:
            raise ValueError(f"rows {first_row}..{first_row + batch - 1} are outside 0..{self.max_rows - 1}")
        q_lens = [len(t) for t in tokens]
        if min(q_lens) == 0:
            raise ValueError("every row needs at least one new token")
        if logits_from and not (all_logits and 0 <= logits_from < max(q_lens)):
            raise ValueError(
                f"logits_from={logits_from} needs all_logits=True and a value below the longest row's {max(q_lens)} "
                "new tokens"
            )
        rows = range(first_row, first_row + batch)
        for row, q in zip(rows, q_lens, strict=True):
            if self.lengths[row] + q > self.max_len:
                raise ValueError(
                    f"sequence of {self.lengths[row] + q} tokens exceeds the cache limit of {self.max_len}"
                )
        self.passes += 1
        self.positions += sum(q_lens)
        ids = np.fromiter((t for row_tokens in tokens for t in row_tokens), dtype=np.int64, count=sum(q_lens))
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be within 0..{self.vocab_size - 1}")
        seqs = np.repeat(np.arange(first_row, first_row + batch, dtype=np.int32), q_lens)
        positions = np.concatenate(
            [np.arange(self.lengths[r], self.lengths[r] + q, dtype=np.int32) for r, q in zip(rows, q_lens, strict=True)]
        )
        wanted = np.zeros(ids.size, dtype=np.int8)
        if all_logits:  # each row's tokens from index logits_from on
            wanted[np.arange(ids.size) - np.repeat(np.cumsum(q_lens) - q_lens, q_lens) >= logits_from] = 1
        else:
            wanted[np.cumsum(q_lens) - 1] = 1
        logits = self._decode_chunks(ids.astype(np.int32), positions, seqs, wanted, rows)
        for row, q in zip(rows, q_lens, strict=True):
            self.lengths[row] += q
        if not all_logits:
            return torch.from_numpy(logits)
        out = torch.zeros((batch, max(q_lens) - logits_from, self.vocab_size), dtype=torch.float32)
        start = 0
        for i, q in enumerate(q_lens):
            scored = max(0, q - logits_from)
            out[i, :scored] = torch.from_numpy(logits[start : start + scored])
            start += scored
        return out

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
        """A decode step: feed `ids[i]` to row i (rows 0..len(ids)-1, one token each); `join` and `hold` are hints
        it needs not (it launches nothing ahead), and it refuses `then` (nothing is queued to run it behind)."""
        if not 0 < len(ids) <= self.max_rows:
            raise ValueError(f"a decode step of {len(ids)} rows does not fit this runner's {self.max_rows}")
        if then is not None:
            raise ValueError("llama.cpp decodes one step at a time: nothing to run `then` behind")
        result = decoded(self.forward(0, [[t] for t in ids]), logprobs)
        if isinstance(join, torch.Tensor):
            result.joined = join.tolist()
        return result

    def _decode_chunks(
        self, ids: np.ndarray, positions: np.ndarray, seqs: np.ndarray, wanted: np.ndarray, rows: range
    ) -> np.ndarray:
        """Feed the tokens in chunks of at most `batch_tokens`; the requested logits, in batch order."""
        chunks: list[np.ndarray] = []
        size = self.batch_tokens
        for start in range(0, ids.size, size):
            n = min(size, ids.size - start)
            self._tokens[:n] = ids[start : start + n]
            self._pos[:n] = positions[start : start + n]
            self._seq[:n] = seqs[start : start + n]
            self._outputs[:n] = wanted[start : start + n]
            self._batch.n_tokens = n
            status = llama_cpp.llama_decode(self._ctx, self._batch)
            if status != 0:
                # Undo what earlier chunks (or this one, partly) stored, so each row is as it was.
                for row in rows:
                    llama_cpp.llama_memory_seq_rm(self._memory, row, self.lengths[row], -1)
                reason = "no room in the KV cache" if status == 1 else f"llama_decode returned {status}"
                raise RuntimeError(f"llama.cpp forward pass failed: {reason}")
            outputs = int(wanted[start : start + n].sum())
            if outputs:
                pointer = llama_cpp.llama_get_logits(self._ctx)
                chunks.append(np.ctypeslib.as_array(pointer, shape=(outputs, self.vocab_size)).copy())
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
