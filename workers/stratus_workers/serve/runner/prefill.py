"""Prefill over fixed device buffers: (rows, length, keys) buckets, one CUDA graph each, rows of any lengths together.

An eager prefill of a small model is a thousand kernel launches and dozens of compiled calls,
each checked by dynamo's guards: on an H200 it cost the engine 4-6 ms of host time per admission
for a 135M model whose whole decode step is one millisecond of GPU time, and at 64 streams a
request arrives about every other step (issue 14). Here a prefill of `b` rows (each its own
number of new tokens, from its own position) runs padded to a bucket (rows, longest chunk, keys
read) and, on CUDA, as a graph captured once per bucket: one host copy of the packed inputs,
one replay. Padded slots write their keys at the cache's spare slot (a position no row reads),
padded rows have no tokens; the arithmetic of every real token is the eager prefill's.

The body is the runner's (`prefill_body`); on the CPU it runs eagerly from the same buffers,
which is how the CPU tests check the padded arithmetic against the eager prefill.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from stratus_workers.serve.runner import to_device
from stratus_workers.serve.runner.cache import KVCache
from stratus_workers.serve.runner.graphs import BATCH_BUCKETS, MIN_KV_BUCKET, key_buckets

log = logging.getLogger(__name__)

MIN_Q_BUCKET = 16
MAX_TOKENS = 4096  # padded rows x chunk length of one captured prefill (its activations' size)
MAX_SCORES = 1 << 22  # padded rows x chunk length x keys: the attention scores' size
MAX_GRAPHS = 128
# Captured at warm-up: these (rows, chunk length) at every keys bucket (a short chunk after a long cached
# prefix reads many keys: a chat's next turn). Others on first use.
WARM_SHAPES = tuple((b, q) for q in (16, 32, 64) for b in (1, 2, 4, 8))


class PrefillBody(Protocol):
    """The runner side of a static prefill (runner/fused.py)."""

    cache: KVCache
    max_rows: int
    device: torch.device

    def prefill_body(self, flat: torch.Tensor, batch: int, q_len: int, kv_len: int) -> torch.Tensor: ...


def _pow2_at_least(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


class StaticPrefill:
    """Runs `body`'s prefill from one flat device buffer: [starts | chunk lengths | rows | ids (batch x q_len)]."""

    def __init__(self, body: PrefillBody, *, cuda_graphs: bool) -> None:
        self.body = body
        self.cuda_graphs = cuda_graphs
        self.rows = body.max_rows
        self._on_cuda = body.device.type == "cuda"
        with torch.inference_mode(False):  # written in place by ordinary code too (graph capture)
            self.flat = torch.zeros(3 * self.rows + MAX_TOKENS, dtype=torch.long, device=body.device)
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self.replays = 0  # prefills that ran as a captured graph

    def buckets(self, batch: int, q_max: int, kv_needed: int) -> tuple[int, int, int] | None:
        """The (rows, chunk length, keys) a prefill runs at, or None when it is too big to run this way."""
        rows = next((b for b in BATCH_BUCKETS if b >= batch), batch)
        rows = max(batch, min(rows, self.rows))
        capacity = self.body.cache.capacity
        q_len = min(_pow2_at_least(q_max, MIN_Q_BUCKET), capacity)  # positions past the cache are never real
        kv_len = min(_pow2_at_least(kv_needed, MIN_KV_BUCKET), capacity)
        if rows * q_len > MAX_TOKENS or rows * q_len * kv_len > MAX_SCORES:
            return None
        return rows, q_len, kv_len

    def run(
        self, first_row: int, tokens: Sequence[Sequence[int]], starts: Sequence[int], q_lens: Sequence[int]
    ) -> torch.Tensor | None:
        """[batch, vocab] logits of each row's last new token, or None (the caller prefills eagerly)."""
        batch = len(tokens)
        shape = self.buckets(batch, max(q_lens), max(s + q for s, q in zip(starts, q_lens, strict=True)))
        if shape is None:
            return None
        rows, q_len, kv_len = shape
        graph = None
        if self.cuda_graphs:
            graph = self.graphs.get(shape)
            if graph is None and len(self.graphs) >= MAX_GRAPHS:
                return None
        self._load(first_row, tokens, starts, q_lens, rows, q_len)
        if self.cuda_graphs:
            if graph is None:
                graph = self._capture(shape)  # its warm-up runs compute this very prefill (they write the same keys)
            graph[0].replay()
            self.replays += 1
            return graph[1][:batch].clone()
        return self.body.prefill_body(self.flat, rows, q_len, kv_len)[:batch]

    def _load(
        self, first_row: int, tokens: Sequence[Sequence[int]], starts: Sequence[int], q_lens: Sequence[int],
        rows: int, q_len: int,
    ) -> None:
        r, batch = self.rows, len(tokens)
        host = np.zeros(3 * r + rows * q_len, dtype=np.int64)
        host[:batch] = starts
        host[r : r + batch] = q_lens
        host[2 * r : 2 * r + batch] = np.arange(first_row, first_row + batch)
        host[2 * r + batch : 2 * r + rows] = first_row  # padded rows: no tokens; they read a real row's keys
        ids = host[3 * r :].reshape(rows, q_len)
        for i, row_tokens in enumerate(tokens):
            ids[i, : len(row_tokens)] = row_tokens
        if self._on_cuda:
            self.flat[: host.size].copy_(to_device(host, self.body.device))
        else:
            self.flat[: host.size] = torch.from_numpy(host)

    def _capture(self, shape: tuple[int, int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        device = self.body.device
        stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.body.prefill_body(self.flat, *shape)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.body.prefill_body(self.flat, *shape)
        self.graphs[shape] = (graph, out)
        return graph, out

    def warmup(self) -> int:
        """Capture the common shapes ahead of traffic (padded rows only: every write lands at a spare slot)."""
        if not self.cuda_graphs:
            return 0
        self.flat.zero_()
        capacity = self.body.cache.capacity
        for kv_len in key_buckets(capacity):
            for batch, q_len in WARM_SHAPES:
                if batch > self.rows or q_len > kv_len:
                    continue
                shape = self.buckets(batch, q_len, kv_len)
                if shape is not None and shape not in self.graphs and len(self.graphs) < MAX_GRAPHS:
                    self._capture(shape)
        torch.cuda.synchronize(self.body.device)
        return len(self.graphs)
