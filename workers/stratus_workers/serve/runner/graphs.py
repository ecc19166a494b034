"""Decode steps over fixed device buffers: batch buckets, CUDA-graph capture, and decoding one step ahead.

A decode step (one new token for rows 0..n-1) reads only device buffers, so it runs padded to a
batch bucket and, on CUDA, as a graph captured once per bucket (rows past the batch are padding,
writing only at the cache's spare slot). The only host-device sync is the caller reading the
sampled ids. Each step also leaves its argmax on the device, and with decode-ahead the next step
starts on it at once: when the caller then sends exactly those tokens (greedy decoding), that
step is already running, so the GPU works while the host samples, detokenizes and streams. Requests
that leave do not spoil it (the KV cache moves its work along with the rows, see cache.py), and rows
whose prompts were just prefilled join it (`join`): at 64 streams a request leaves and another joins
about every other step, and each spoilt step cost a whole decode step of GPU time and a wait. A step
whose prefill is mixed into the decode rows' pass (core.py) takes the step in flight without launching
another (`hold`), and the step after the mixed pass is launched ahead from its results (`prime`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from stratus_workers.serve import kernels
from stratus_workers.serve.runner import Decoded, to_device
from stratus_workers.serve.runner.cache import KVCache

log = logging.getLogger(__name__)

# Batch sizes a decode graph is captured for; a batch runs in the smallest bucket that holds it.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MIN_KV_BUCKET = 64
MAX_GRAPHS = 96  # each graph holds its own activations; beyond this, decode runs eagerly
AHEAD_PAUSE_STEPS = 32  # after a guess the caller did not take (sampling requests), steps without guessing


def key_buckets(capacity: int, limit: int | None = None) -> list[int]:
    """The key lengths graphs are captured at: MIN_KV_BUCKET doubling until `limit` (default the capacity) is
    covered, none past the cache's capacity."""
    limit = capacity if limit is None else limit
    buckets, kv = [], MIN_KV_BUCKET
    while True:
        buckets.append(min(kv, capacity))
        if kv >= limit:
            return buckets
        kv *= 2


class DecodeBody(Protocol):
    """The runner side of a decode step (runner/fused.py)."""

    cache: KVCache
    max_rows: int
    device: torch.device
    triton_attention: bool  # its attention reads each row's length itself: one graph per batch size (two: splits)
    local_kv_heads: int
    greedy_logprobs: torch.Tensor  # [max_rows]: each step leaves its argmax's log-probability here

    def decode_body(self, tokens: torch.Tensor, batch: int, kv_len: int, cascade: bool = False) -> torch.Tensor: ...

    def degrade(self) -> str | None: ...


@dataclass
class _Step:
    """A queued decode step: its logits, greedy choices and their log-probabilities (host copies), and when ready."""

    batch: int
    logits: torch.Tensor
    argmax: torch.Tensor
    logprobs: torch.Tensor
    done: torch.cuda.Event | None


class GraphCache:
    """CUDA graphs of static steps, one per key (a step's shape): captured on first use, then replayed.

    `body()` must read and write only device buffers that outlive the graph. It runs twice on a side
    stream first (compiles, cuBLAS handles), then once under capture into a memory pool the cache's
    graphs share; `keep`, if given, is a buffer the warm-up runs overwrite (the tokens a step leaves its
    argmax in) and is put back before the capture. A failed capture asks `degrade()` to drop an optimisation and
    retries; past MAX_GRAPHS a key gets None (the caller runs the body eagerly).
    """

    def __init__(self, device: torch.device, degrade: Callable[[], str | None]) -> None:
        self.device = device
        self.degrade = degrade
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self.graphs)

    def get(
        self, key: Hashable, body: Callable[[], torch.Tensor], keep: torch.Tensor | None = None
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The graph of `key` and its output (captured now from `body` if new), or None past MAX_GRAPHS."""
        found = self.graphs.get(key)
        if found is not None or len(self.graphs) >= MAX_GRAPHS:
            return found
        while True:
            try:
                self.graphs[key] = self._capture(body, keep)
                return self.graphs[key]
            except Exception as exc:
                stage = self.degrade()
                if stage is None:
                    raise
                log.warning("graph capture failed (%s: %s); retrying without %s", type(exc).__name__, exc, stage)
                self.graphs.clear()

    def _capture(
        self, body: Callable[[], torch.Tensor], keep: torch.Tensor | None
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        kept = keep.clone() if keep is not None else None
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if keep is not None and kept is not None:
            keep.copy_(kept)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # No garbage collection inside a capture (torch.cuda.graph collects once before it): a finalizer run there
        # that calls CUDA (an earlier runner's stream or event, found garbage at some allocation of the body) aborted
        # the process on an H200 (test_core_gpu.py, building a second runner in one test).
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = body()
        finally:
            if collecting:
                gc.enable()
        return graph, out


class StaticDecoder:
    """Runs `body`'s decode step for rows 0..n-1: bucketed, as CUDA graphs when asked, one step ahead when asked."""

    def __init__(self, body: DecodeBody, *, cuda_graphs: bool, decode_ahead: bool) -> None:
        self.body = body
        self.cache = body.cache
        self.cuda_graphs = cuda_graphs
        self.decode_ahead = decode_ahead
        self.ahead_hits = 0  # steps whose result was already computed when the caller asked
        self.device_joins = 0  # steps launched ahead with joining rows' first tokens taken on the device
        self.cascade_steps = 0  # steps that read the rows' shared prefix once for all of them
        dev = body.device
        self._on_cuda = dev.type == "cuda"
        rows = body.max_rows
        with torch.inference_mode(False):  # updated in place by ordinary code too (graph capture)
            # The step's input ids; each step leaves its argmax here for the next.
            self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self._argmax_host = torch.zeros((2, rows), dtype=torch.long, pin_memory=self._on_cuda)
        self._logprob_host = torch.zeros((2, rows), dtype=torch.float32, pin_memory=self._on_cuda)
        self._join_host = torch.zeros(rows, dtype=torch.long, pin_memory=self._on_cuda)
        self._join_done: Any = torch.cuda.Event() if self._on_cuda else None  # type: ignore[no-untyped-call]
        self._slot = 0
        self.graphs = GraphCache(dev, body.degrade)
        self._ahead_step: _Step | None = None
        self._expected: list[int] = []
        self._ahead_pause = 0
        self.primed = 0  # steps launched ahead by `prime` (fed tokens the caller chose, or will from the same logits)
        self.primed_reads = 0  # `primed_tokens` calls that returned the tokens
        self._fed_host = torch.zeros(rows, dtype=torch.long, pin_memory=self._on_cuda)
        self._fed_done: Any = torch.cuda.Event() if self._on_cuda else None  # type: ignore[no-untyped-call]
        self._fed: torch.Tensor | None = None  # a primed step's tokens on their way to the host
        # Where a runner asks for it (a CUDA event), recorded right before each step launched ahead: all the work
        # queued ahead of that step, which a pass run beside it (on another stream) waits for instead of the step
        # itself (runner/fused.py, `prefill_beside`).
        self.before_ahead: Any = None

    @property
    def in_flight(self) -> bool:
        """Whether a decode step launched ahead of time waits to be taken by the next `step`."""
        return self._ahead_step is not None

    def prime(self, ids: list[int] | torch.Tensor) -> None:
        """Launch the decode step of rows 0..len(ids)-1 fed `ids` now, without waiting for it: the next `step`
        fed these ids on these rows (moved rows follow, as for any step launched ahead) takes it. The caller
        chose `ids` already (after a mixed pass), so unlike a guess it is taken whenever the rows are; or, as a
        device tensor, will choose them from the same logits (greedy rows: their argmax), and the step is queued
        right behind the pass that computes them. Does nothing where a step is in flight or none runs ahead."""
        if not self.decode_ahead or self._ahead_step is not None:
            return
        batch = len(ids)
        self.cache.grow(max(self.cache.lengths[:batch]) + 1)
        if isinstance(ids, torch.Tensor):
            self.tokens[:batch].copy_(ids)
            self._fed = self._fed_host[:batch]
            self._fed.copy_(ids, non_blocking=True)
            if self._on_cuda:
                self._fed_done.record()
        else:
            self.load_tokens(ids)
            self._expected = list(ids)
        self._ahead_step = self._launch(batch, ahead=True)
        self.cache.watch(batch)
        self.primed += 1

    def primed_tokens(self) -> list[int] | None:
        """What the step primed on the device was fed (`prime` with a tensor), once its copy reached the host (an
        event recorded before the step's launch: this waits for the pass that computed them, not for the step);
        None where no such step waits to be taken."""
        if self._fed is None:
            return None
        if self._on_cuda:
            self._fed_done.synchronize()
        self.primed_reads += 1
        return self._fed.tolist()

    def buckets(self, batch: int, kv_needed: int) -> tuple[int, int]:
        """The (batch, key length) a step of `batch` rows reading `kv_needed` keys runs at."""
        max_rows = self.body.max_rows
        bucket = next((b for b in BATCH_BUCKETS if b >= batch and b <= max_rows), max_rows)
        bucket = max(bucket, batch)
        if self.body.triton_attention:
            # One graph per batch bucket reads any key length; a second, where rows read more than
            # kernels.DECODE_SPLIT_KEYS keys, splits them over more programs (kernels.decode_splits).
            capacity = self.cache.capacity
            short = kernels.DECODE_SPLIT_KEYS
            if kv_needed > short or kernels.decode_splits(bucket, self.body.local_kv_heads) == 1:
                return bucket, capacity
            return bucket, min(capacity, short)
        kv = MIN_KV_BUCKET
        while kv < kv_needed:
            kv *= 2
        return bucket, min(kv, self.cache.capacity)

    def step(
        self,
        batch: int,
        ids: list[int],
        *,
        logprobs: bool = False,
        join: Sequence[int] | torch.Tensor = (),
        hold: bool = False,
        then: Callable[[], None] | None = None,
    ) -> Decoded:
        """Feed `ids` to rows 0..batch-1 (one token each); returns their logits and greedy choices.

        `join` names the first tokens of rows batch.. that join the batch at the next step (their
        prompts were prefilled this step): the step launched ahead covers them too, fed those tokens.
        As a device tensor (the prefill's greedy choices, still being computed) they are copied on the
        device, the step launched ahead queues right behind, and they are read back (`joined`) while it runs.

        `hold`: launch no step ahead after this one (the caller computes the tokens after it some other way: a mixed
        pass of those rows and a prefill, runner/fused.py), where it would be wasted. `then` runs once this step is
        queued (or found launched ahead), before the host waits for it: work queued there runs right behind it, and
        `tokens[:batch]` holds its greedy choices by then on the device. Both hold for this call only.
        """
        ahead, self._ahead_step = self._ahead_step, None
        if self._fed is not None:  # what a step primed on the device was fed (done long since: the host chose them)
            if self._on_cuda:
                self._fed_done.synchronize()
            self._expected, self._fed = self._fed.tolist(), None
        origin = self.cache.ahead
        self.cache.watch(None)
        rows: list[int] | None = None
        if ahead is not None and origin is not None and batch <= len(origin):
            carried = origin[:batch]
            if all(r is not None for r in carried):
                rows = carried  # type: ignore[assignment]
        if rows is not None and all(t == self._expected[r] for t, r in zip(ids, rows, strict=True)):
            assert ahead is not None
            step = ahead  # the step launched ahead, fed by the last step's greedy choices, is this one
            self.ahead_hits += 1
            if rows != list(range(batch)):
                # Rows moved since (a request left): the step's argmax, the next step's input, moves with them.
                self.tokens[:batch].copy_(self.tokens[self._index(rows)])
        else:
            if rows is not None:
                self._ahead_pause = AHEAD_PAUSE_STEPS  # sampled tokens are not the argmax: stop guessing
            rows = None
            self.load_tokens(ids)
            step = self._launch(batch)
        self.cache.advance(batch)
        launched = 0
        on_device = isinstance(join, torch.Tensor)
        joined: Any = None
        if self._ahead_pause:
            self._ahead_pause -= 1
        elif self.decode_ahead and not hold:
            # Start the next step now, on this step's argmax, so the GPU works while the caller samples,
            # detokenizes and streams. If the caller picks other tokens or changes the rows, the next
            # call runs the step again; the guess only wrote keys past each row's length.
            n = len(join)
            if on_device and n:
                assert isinstance(join, torch.Tensor)
                self.tokens[batch : batch + n].copy_(join)
                joined = self._join_host[:n]
                joined.copy_(join, non_blocking=True)
                self.device_joins += 1
                if self._on_cuda:
                    self._join_done.record()
            elif n:
                self.load_tokens(list(join), batch)
            launched = batch + n
            self._ahead_step = self._launch(launched, ahead=True)
            self.cache.watch(launched)
        if then is not None:
            then()
        decoded = self._finish(step, batch, rows, logprobs)
        if on_device:
            assert isinstance(join, torch.Tensor)
            if joined is None:
                decoded.joined = join.tolist()
            else:
                if self._on_cuda:
                    self._join_done.synchronize()  # the prefill's tokens, not the step launched behind them
                decoded.joined = joined.tolist()
        if launched:
            tail = decoded.joined if on_device else list(join)
            self._expected = [*decoded.greedy, *(tail or [])]  # what the step launched ahead was fed, row by row
        return decoded

    def _index(self, rows: Sequence[int]) -> torch.Tensor:
        return to_device(rows, self.body.device) if self._on_cuda else torch.tensor(rows, dtype=torch.long)

    def load_tokens(self, ids: list[int], first: int = 0) -> None:
        """`ids` into `tokens[first:first + len(ids)]` (on CUDA through pinned memory, without waiting for the copy)."""
        n = len(ids)
        if not self._on_cuda:
            self.tokens[first : first + n] = torch.tensor(ids, dtype=torch.long)
            return
        # Through pinned memory (runner.to_device): the host does not wait for the queued steps.
        self.tokens[first : first + n].copy_(to_device(ids, self.body.device))

    def _launch(self, batch: int, ahead: bool = False) -> _Step:
        """Queue one decode step of rows 0..batch-1 (tokens already in `tokens`); do not wait for it."""
        if ahead and self.before_ahead is not None:
            self.before_ahead.record()
        bucket, kv_len = self.buckets(batch, max(self.cache.lengths[:batch]) + 1)
        # Where rows start with the shared prefix (cache.py), which they do not hold, the step reads it from there,
        # once for all of them: a graph of its own.
        cascade = self.cache.cascade and self.cache.sharing(batch) > 0
        self.cascade_steps += cascade
        graph = self.graph(bucket, kv_len, cascade) if self.cuda_graphs else None
        if graph is not None:
            graph[0].replay()
            logits = graph[1][:batch].clone()
        else:
            logits = self.body.decode_body(self.tokens, bucket, kv_len, cascade)[:batch]
        # The step left its greedy choices in `tokens` (the next step's input); keep a host copy,
        # alternating two buffers so that a queued next step cannot overwrite one still unread.
        self._slot ^= 1
        host = self._argmax_host[self._slot]
        host[:batch].copy_(self.tokens[:batch], non_blocking=True)
        lp_host = self._logprob_host[self._slot]
        lp_host[:batch].copy_(self.body.greedy_logprobs[:batch], non_blocking=True)
        done = None
        if self._on_cuda:
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        return _Step(batch=batch, logits=logits, argmax=host, logprobs=lp_host, done=done)

    def _finish(self, step: _Step, batch: int, rows: list[int] | None, logprobs: bool) -> Decoded:
        """The step's result for rows 0..batch-1, which held its rows `rows` (None: the same rows) when it ran."""
        if step.done is not None:
            # Wait with the GIL released (Event.synchronize drops it; .tolist() would hold it). The
            # event was recorded before the next step was launched ahead, so this waits for this
            # step alone: the engine samples greedy rows and sends their tokens while the GPU runs on.
            step.done.synchronize()
        argmax = step.argmax[: step.batch].tolist()
        picked = step.logprobs[: step.batch].tolist() if logprobs else None
        if rows is None or rows == list(range(batch)):
            return Decoded(step.logits[:batch], argmax[:batch], picked[:batch] if picked is not None else None)
        logits = step.logits[self._index(rows)]
        return Decoded(logits, [argmax[r] for r in rows], [picked[r] for r in rows] if picked is not None else None)

    def graph(
        self, batch: int, kv_len: int, cascade: bool = False
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The captured step for this bucket (captured now if new), or None past MAX_GRAPHS; `cascade`: the step
        that reads the rows' shared prefix once (its key lengths are the cache's: they read past their prefix)."""
        # The warm-up's cache writes land at each row's next free slot, which the next real token
        # overwrites; its argmax overwrites the step's input tokens, which are put back (`keep`).
        if cascade:
            kv_len = self.cache.capacity
        return self.graphs.get(
            (batch, kv_len, cascade), lambda: self.body.decode_body(self.tokens, batch, kv_len, cascade), self.tokens
        )

    def warmup(self, max_kv_len: int | None = None, batch_sizes: Sequence[int] | None = None) -> int:
        """Capture decode graphs ahead of traffic (so the first requests do not pay for it).

        Captures every batch bucket up to `max_rows` for each key-length bucket up to
        `max_kv_len` (default: the whole context); returns how many graphs exist.
        """
        if not self.cuda_graphs:
            return 0
        capacity = self.cache.capacity
        limit = min(max_kv_len or capacity, capacity)
        max_rows = self.body.max_rows
        sizes = batch_sizes or [b for b in BATCH_BUCKETS if b <= max_rows] or [max_rows]
        for kv_len in key_buckets(capacity, limit):
            for b in sizes:
                self.graph(*self.buckets(b, kv_len))
        if self.cache.cascade:  # the steps of rows that read the shared prefix
            for b in sizes:
                self.graph(self.buckets(b, capacity)[0], capacity, cascade=True)
        torch.cuda.synchronize(self.body.device)
        return len(self.graphs)
