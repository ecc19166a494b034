"""Pipeline parallel: the decoder layers split into contiguous stages, each a process and device (or a
tensor-parallel group of them).

`--pipeline-parallel P` makes the engine process rank 0: it starts ranks 1.. as copies of the server's
command (`parallel.spawn_followers`), and every rank loads the model and keeps only its stage's
contiguous share of the decoder layers (`stage_layers`) and their KV cache. With `--tensor-parallel T`
too there are P * T ranks: rank r is in stage r // T, and each stage's T ranks shard its layers as a
tensor-parallel group (serve/parallel.py, runner/fused.py) whose all-reduces stay inside the stage.
Rank 0 runs the engine core over a `PipelineRunner` and repeats each runner call to every other rank on
a gloo control group (the way tensor parallel does), so every rank changes its cache rows the same way.
In a forward pass only stage 0 embeds; each stage runs its layers and sends the activations to the next
(rank to rank of the same place in the stage's group: NCCL between GPUs, gloo on the CPU); the last
stage's first rank applies the final norm and LM head and sends the logits back to rank 0, which samples.

Micro-batches: a forward (a prefill) over B rows is split into `microbatches` contiguous groups of rows
(default: as many as there are stages). Stage 0 computes group 1 while stage 1 computes group 0, and so
on, so within a forward the stages overlap instead of waiting on each other; it then takes about
(M + N - 1) / M group-times of one stage instead of N. A decode step runs as one micro-batch by default:
its matrix products are bound by reading the weights, so a micro-batch of half the rows costs a stage
about what all of them do, and splitting would add reads, not overlap (measured: docs/benchmarks.md).
Across decode steps, rank 0 queues each step on every stage before it samples the last one (decoding
ahead, on the argmax: taken when the caller's tokens are those), so the stages do not wait for the host.

A stage that dies fails the engine: rank 0 watches the other ranks' processes (`StageWatch`), and a failed
send or receive raises `StageFailed`, which the engine core does not catch, so the engine process
reports the failure and exits; the frontend fails what is in flight and turns health NOT_SERVING.
"""

from __future__ import annotations

import functools
import gc
import logging
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stratus_workers.runtimes import RUNTIME_TORCH
from stratus_workers.serve import kernels
from stratus_workers.serve.errors import EngineFailed
from stratus_workers.serve.parallel import BUILD, STOP, ParallelContext, join_process_group
from stratus_workers.serve.runner import Decoded, ModelRunner, UnsupportedModelError, env_flag
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import FusedRunner
from stratus_workers.serve.runner.graphs import AHEAD_PAUSE_STEPS, BATCH_BUCKETS, MIN_KV_BUCKET, GraphCache
from stratus_workers.serve.stagetrace import StageTrace

log = logging.getLogger(__name__)

WATCH_SECONDS = 0.1


class StageFailed(EngineFailed):
    """A pipeline stage died or its link broke: the engine cannot compute any more."""


@dataclass(frozen=True)
class PipelineContext:
    """This process's place in a pipeline of `stages` stages, each a tensor-parallel group of `tensor_parallel`
    ranks: global rank = stage * tensor_parallel + tp_rank. Rank 0 (stage 0's first rank) runs the engine."""

    stage: int
    stages: int
    microbatches: int  # 0: one per stage for a forward (prefill), one for a decode step
    tp_rank: int = 0
    tensor_parallel: int = 1
    control: Any = None  # gloo group of every rank: rank 0's repeated runner calls (small pickled messages)
    forward: Any = None  # group for activations, stage k -> k + 1 (between ranks of the same tp_rank)
    back: Any = None  # group for the last stage's logits -> rank 0 (a group of its own: no cycle on one stream)
    tensor: ParallelContext | None = None  # this stage's tensor-parallel group, when it has more than one rank

    @property
    def rank(self) -> int:
        return self.stage * self.tensor_parallel + self.tp_rank

    @property
    def forward_microbatches(self) -> int:
        return self.microbatches or self.stages

    @property
    def decode_microbatches(self) -> int:
        return self.microbatches or 1

    @property
    def world_size(self) -> int:
        return self.stages * self.tensor_parallel

    @property
    def leader(self) -> bool:
        """Rank 0: runs the engine, repeats its calls to every other rank, receives the logits and samples."""
        return self.rank == 0

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def sends_logits(self) -> bool:
        """The last stage's first rank applies the head and sends the logits (its group holds the same activations)."""
        return self.last and self.tp_rank == 0

    def peer(self, stage: int) -> int:
        """The rank of `stage` that exchanges activations with this one (the same place in its stage's group)."""
        return stage * self.tensor_parallel + self.tp_rank

    @property
    def logits_rank(self) -> int:
        return (self.stages - 1) * self.tensor_parallel

    def lead(self, method: str, *args: Any, **kwargs: Any) -> None:
        """On rank 0: tell every other rank to make the same call."""
        if self.leader:
            broadcast(self, (method, args, kwargs))


def broadcast(ctx: PipelineContext, message: Any) -> Any:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges of each stage; the first stages take one more when they do not divide."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"{stages} pipeline stages need at least {stages} decoder layers; the model has {num_layers}")
    per, extra = divmod(num_layers, stages)
    ranges, start = [], 0
    for stage in range(stages):
        end = start + per + (1 if stage < extra else 0)
        ranges.append(range(start, end))
        start = end
    return ranges


def split_rows(batch: int, groups: int) -> list[tuple[int, int]]:
    """`batch` rows as at most `groups` contiguous (start, end) ranges of near-equal size."""
    groups = max(1, min(groups, batch))
    per, extra = divmod(batch, groups)
    out, start = [], 0
    for g in range(groups):
        end = start + per + (1 if g < extra else 0)
        out.append((start, end))
        start = end
    return out


def decode_groups(batch: int, microbatches: int, max_rows: int) -> list[tuple[int, int, int]]:
    """A decode step's rows 0..batch-1 as micro-batches (start, end, padded): each runs `padded` rows from
    `start`, a batch bucket (graphs.BATCH_BUCKETS) so that a stage keeps few decode graphs; rows end.. of the
    last one are padding (rows no decode step uses, whose writes land past their length), cut at `max_rows`."""
    per = -(-batch // max(1, microbatches))
    size = next((b for b in BATCH_BUCKETS if b >= per), per)
    return [(start, min(start + size, batch), min(size, max_rows - start)) for start in range(0, batch, size)]


def keep_stage(model: Any, rank: int, stages: int) -> range:
    """Keep only stage `rank`'s decoder layers in `model` (the others are freed); returns their range."""
    if getattr(model, "runtime", RUNTIME_TORCH) != RUNTIME_TORCH:
        raise UnsupportedModelError(
            "pipeline parallel splits a torch model's layers; a GGUF artifact runs on llama.cpp in one process "
            "(serve it with pipeline_parallel 1)"
        )
    layers = stage_layers(len(model.model.layers), stages)[rank]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in layers)
    model.config.num_hidden_layers = len(layers)
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()
    return layers


@dataclass
class _QueuedStep:
    """A decode step this rank has queued: its rows, and on rank 0 the buffer its logits arrive in and the receives
    that fill it."""

    batch: int
    logits: torch.Tensor
    recvs: list[Any]


class PipelineRunner(ModelRunner):
    """One stage's runner (`inner`, over its share of the layers) and its place in the pipeline.

    The same class runs on every stage: on stage 0 the engine core calls it and each call is repeated
    to the others (`follow`), which make the same call; `_forward` then does each stage's part.

    Over the fused path (`FusedRunner`: CUDA, or tensor parallel) a decode step runs per micro-batch
    through the fused decode step's layers (`decode_rows`), as a CUDA graph per (first row, rows, key
    length) on CUDA: a stage's host then only replays graphs and posts sends and receives, so it queues
    the whole step at once and the device never waits on the host. The receives land in a static
    buffer (`_h_in`) that the graphs read; the sends are of the graphs' outputs. Rank 0 also queues each
    next step ahead, on every rank, before it samples (`decode`'s `hit` and `ahead` flags).
    """

    def __init__(self, inner: ModelRunner, ctx: PipelineContext, *, cuda_graphs: bool | None = None) -> None:
        super().__init__(inner.model, max_rows=inner.max_rows, max_len=inner.max_len, pool_tokens=inner.pool_tokens)
        self.inner = inner
        self.ctx = ctx
        self.cache = inner.cache
        self.cache.stop_sharing()  # a stage's decode reads only its rows (its micro-batches start past row 0)
        self.hidden_size = int(inner.config.hidden_size)
        self.layers_held = len(inner.layers)
        self.trace = StageTrace(ctx.rank, self.device)
        self.fused = inner if isinstance(inner, FusedRunner) else None
        # Every rank's inner runner, in rank order (rank 0 learns the others' in build_stage_runner): a stage
        # that fell back to the module path shows in `describe()`, which the engine reports.
        self.stage_runners: tuple[str, ...] = (type(inner).__name__,)
        self.graphs: GraphCache | None = None
        if self.fused is not None:
            with torch.inference_mode(False):  # filled by receives, read by graphs
                self._h_in = torch.zeros((self.max_rows, self.hidden_size), dtype=self.dtype, device=self.device)
            want = env_flag("STRATUS_CUDA_GRAPHS", True) if cuda_graphs is None else cuda_graphs
            if want and self.device.type == "cuda":
                self.graphs = GraphCache(self.device, self.fused.degrade)
        # Decoding ahead (rank 0 sees the argmax on its device; within a stage's tensor-parallel group the
        # other first-stage ranks would not): on with the graphs; STRATUS_DECODE_AHEAD=0 or 1 overrides.
        self.decode_ahead = (
            self.fused is not None
            and ctx.tensor_parallel == 1
            and env_flag("STRATUS_DECODE_AHEAD", self.graphs is not None)
        )
        self.ahead_hits = 0  # decode steps found computed ahead (the step profile reports them)
        self._ahead: _QueuedStep | None = None
        self._ahead_pause = 0
        self._expected: list[int] = []
        pinned = self.device.type == "cuda"
        self._slot = 0
        self._argmax_host = torch.zeros((2, self.max_rows), dtype=torch.long, pin_memory=pinned)
        self._logprob_host = torch.zeros((2, self.max_rows), dtype=torch.float32, pin_memory=pinned)

    def describe(self) -> str:
        """`PipelineRunner(FusedRunner, FusedRunner)`: the inner runner of each rank, in rank order."""
        return f"{type(self).__name__}({', '.join(self.stage_runners)})"

    def _lead(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.ctx.leader and self.trace.enabled:  # the other ranks begin a call's record in follow()
            self.trace.begin(method, _rows(args))
        try:
            self.ctx.lead(method, *args, **kwargs)
        except RuntimeError as exc:  # any call, not only a forward, finds a dead stage first
            raise StageFailed(f"pipeline stage 0 lost the other stages ({exc})") from exc

    # This stage's own parts (its layers only; the embedding and head are used on the first and last).
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(ids)

    def extend_hidden(self, first_row: int, h: torch.Tensor, starts: list[int], q_lens: list[int]) -> torch.Tensor:
        return self.inner.extend_hidden(first_row, h, starts, q_lens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.head(h)

    def _warmup(self, max_kv_len: int | None, batch_sizes: Sequence[int] | None) -> int:
        graphs = self.inner.warmup(max_kv_len, batch_sizes)
        if self.graphs is None or self.fused is None:
            return graphs
        # Every micro-batch a decode step of up to max_rows rows can make, at each key-length bucket.
        decoder = self.fused.decoder
        capacity = self.cache.capacity
        limit = min(max_kv_len or capacity, capacity)
        kv_lens, kv = set(), 1
        while True:
            kv_lens.add(decoder.buckets(1, kv)[1])
            if kv >= limit:
                break
            kv = min(2 * max(kv, MIN_KV_BUCKET), limit)
        sizes = batch_sizes or range(1, self.max_rows + 1)
        split = self.ctx.decode_microbatches
        keys = {(a, padded) for n in sizes for a, _, padded in decode_groups(n, split, self.max_rows)}
        for kv_len in sorted(kv_lens):
            for a, padded in sorted(keys):
                self._graph(a, padded, kv_len)
        torch.cuda.synchronize(self.device)
        return graphs + (len(self.graphs) if self.graphs is not None else 0)

    def _graph(self, first_row: int, rows: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The decode graph of this micro-batch (captured now if new); None to run it eagerly."""
        if self.graphs is None:
            return None
        fused = self.fused
        if fused is not None and fused.triton_attention and kernels.decode_splits(rows, fused.local_kv_heads) == 1:
            kv_len = self.cache.capacity  # the short and the long key buckets are the same step here: one graph
        body = functools.partial(self._decode_body, first_row, rows, kv_len)
        try:
            return self.graphs.get((first_row, rows, kv_len), body)
        except Exception as exc:  # a capture problem must not take serving down: the eager step is still correct
            log.warning("stage %d: decode graphs off (%s: %s)", self.ctx.rank, type(exc).__name__, exc)
            self.graphs = None
            return None

    @torch.inference_mode()
    def decode(
        self, ids: Sequence[int], *, logprobs: bool = False, join: Sequence[int] | torch.Tensor = (), hit: bool = False,
        ahead: bool = False, hold: bool = False, then: Callable[[], None] | None = None,
    ) -> Decoded:
        """ModelRunner.decode, plus on the fused path the step-ahead flags, which rank 0 decides and sends with
        the call (the other ranks obey them): `hit`, this step is the one queued ahead at the last call (same
        rows, and the tokens it guessed); `ahead`, queue the next step now, on this step's argmax. Rows that
        `join` are not queued ahead here: the step after their join runs anew. `hold`: queue none ahead this call;
        `then` is refused (the stages queue nothing behind a step)."""
        if self.fused is None:
            return super().decode(ids, logprobs=logprobs, join=join, hold=hold, then=then)
        if then is not None:
            raise ValueError("a pipeline stage queues nothing to run `then` behind a decode step")
        batch = len(ids)
        if not 0 < batch <= self.max_rows:
            raise ValueError(f"a decode step of {batch} rows does not fit this runner's {self.max_rows}")
        self.cache.grow(max(self.cache.lengths[:batch]) + 1)
        if self.ctx.leader:
            hit, ahead = self._plan_ahead(list(ids))
            ahead = ahead and not hold
        self._lead("decode", list(ids), logprobs=logprobs, hit=hit, ahead=ahead)
        self.passes += 1
        self.positions += batch
        try:
            return self._fused_decode(list(ids), logprobs, hit, ahead)
        except RuntimeError as exc:  # gloo and NCCL report a dead peer as a RuntimeError (DistBackendError)
            raise StageFailed(f"pipeline stage {self.ctx.stage}: a link to another stage failed ({exc})") from exc

    def _decode(
        self,
        ids: list[int],
        logprobs: bool,
        join: Sequence[int] | torch.Tensor,
        hold: bool = False,
        then: Callable[[], None] | None = None,
    ) -> Decoded:
        """The module path's decode step (the fused path's is `decode`): a forward of one token a row."""
        if self.ctx.leader:
            out = super()._decode(ids, logprobs, join, hold, then)
            self.trace.mark("sampled", device=False)
            return out
        self._forward(0, [[t] for t in ids], self.cache.lengths[: len(ids)], [1] * len(ids), False)
        return Decoded(torch.empty(0), [], None)

    def _plan_ahead(self, ids: list[int]) -> tuple[bool, bool]:
        """On rank 0: whether the step queued ahead is this one, and whether to queue the next."""
        step = self._ahead
        # Taken only where no row changed or moved since it was queued (`KVCache.unchanged`): the stages cannot
        # follow a row move with the step's logits as the single-device decoder does.
        current = step is not None and step.batch == len(ids) and self.cache.unchanged(step.batch)
        hit = current and ids == self._expected
        if current and not hit:
            self._ahead_pause = AHEAD_PAUSE_STEPS  # sampled tokens are not the argmax: stop guessing a while
        ahead = self.decode_ahead and not self._ahead_pause
        if self._ahead_pause:
            self._ahead_pause -= 1
        return hit, ahead

    def _fused_decode(self, ids: list[int], logprobs: bool, hit: bool, ahead: bool) -> Decoded:
        ctx, batch = self.ctx, len(ids)
        queued, self._ahead = self._ahead, None
        self.cache.watch(None)
        self.trace.set("hit", hit)
        if hit:
            assert queued is not None, "rank 0 took a step ahead that this rank did not queue"
            step = queued
            self.ahead_hits += 1
        else:
            if queued is not None:
                for work in queued.recvs:  # a guess not taken: its logits arrive all the same
                    work.wait()
            if ctx.first:
                assert self.fused is not None
                self.fused.decoder.load_tokens(ids)
            step = self._launch(batch)
        self.cache.advance(batch)
        done = self._collect(step, logprobs) if ctx.leader else None
        if ahead:
            # The next step, on this one's argmax (left in the token buffer by `_collect`); it writes keys only
            # past each row's length, so whatever rank 0 is asked next, the guess changes nothing it reads.
            self.cache.watch(batch)
            self._ahead = self._launch(batch, "ahead_")
        if not ctx.leader:
            return Decoded(torch.empty(0), [], None)
        if done is not None:
            done.synchronize()  # this step's results only: the step queued ahead runs on
        self._expected = self._argmax_host[self._slot, :batch].tolist()
        picked = self._logprob_host[self._slot, :batch].tolist() if logprobs else None
        self.trace.mark("sampled", device=False)
        return Decoded(step.logits, list(self._expected), picked)

    def _decode_body(self, first_row: int, rows: int, kv_len: int) -> torch.Tensor:
        """A decode micro-batch of `rows` rows from `first_row` on this stage, from device buffers only (what a
        graph captures): stage 0 embeds the step's tokens, the others read `_h_in`; the last stage's first rank
        applies the head (its other ranks hold the same activations and send nothing)."""
        assert self.fused is not None
        if self.ctx.first:
            h = self.fused.embed(self.fused.decoder.tokens[first_row : first_row + rows])
        else:
            h = self._h_in[first_row : first_row + rows]
        h = self.fused.decode_rows(h, first_row, kv_len)
        return self.fused.head(h) if self.ctx.sends_logits else h

    def _launch(self, batch: int, tag: str = "") -> _QueuedStep:
        """Queue this rank's part of a decode step of rows 0..batch-1 (stage 0: from the token buffer); rank 0
        also posts the receives of its logits."""
        ctx, trace, fused = self.ctx, self.trace, self.fused
        assert fused is not None
        groups = decode_groups(batch, ctx.decode_microbatches, self.max_rows)
        trace.groups(groups, tag=tag)
        kv_len = fused.decoder.buckets(1, max(self.cache.lengths[:batch]) + 1)[1]
        sends: list[Any] = []
        for g, (a, b, padded) in enumerate(groups):
            if not ctx.first:
                dist.recv(self._h_in[a : a + padded], src=ctx.peer(ctx.stage - 1), group=ctx.forward)
            trace.mark("in", g, tag=tag)
            found = self._graph(a, padded, kv_len)
            if found is not None:
                found[0].replay()
                out = found[1]
            else:
                out = self._decode_body(a, padded, kv_len)
            trace.mark("computed", g, tag=tag)
            if not ctx.last:
                sends.append(dist.isend(out, dst=ctx.peer(ctx.stage + 1), group=ctx.forward))
            elif ctx.sends_logits:
                sends.append(dist.isend(out[: b - a], dst=0, group=ctx.back))
            trace.mark("sent", g, tag=tag)
        logits, recvs = torch.empty(0), []
        if ctx.leader:
            logits = torch.empty((batch, self.vocab_size), dtype=torch.float32, device=self.device)
            recvs = [dist.irecv(logits[a:b], src=ctx.logits_rank, group=ctx.back) for a, b, _ in groups]
        for work in sends:  # a graph's output is rewritten by its next replay: not before it is sent
            work.wait()
        trace.mark("waited", tag=tag)
        return _QueuedStep(batch=batch, logits=logits, recvs=recvs)

    def _collect(self, step: _QueuedStep, logprobs: bool) -> torch.cuda.Event | None:
        """On rank 0: once `step`'s logits are in (on the device's stream), its argmax into the token buffer (the
        next step's input, if queued ahead) and, with its log-probabilities, into host buffers; the event that
        says when they are there (None on the CPU, where the copies are done on return)."""
        assert self.fused is not None
        for work in step.recvs:
            work.wait()
        batch, logits = step.batch, step.logits
        best = logits.argmax(dim=-1)
        self.fused.decoder.tokens[:batch].copy_(best)
        self._slot ^= 1  # two host buffers: a step queued ahead must not overwrite one not yet read
        self._argmax_host[self._slot, :batch].copy_(best, non_blocking=True)
        if logprobs:
            picked = logits.gather(1, best[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            self._logprob_host[self._slot, :batch].copy_(picked, non_blocking=True)
        if self.device.type != "cuda":
            return None
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record()
        return done

    def _forward(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
        logits_from: int = 0,
    ) -> torch.Tensor:
        try:
            logits = self._stage_forward(first_row, tokens, starts, q_lens, all_logits)
            # The last stage scores every new token; stage 0 keeps those asked for (the other stages get nothing).
            return logits[:, logits_from:] if logits_from and logits.numel() else logits
        except StageFailed:
            raise
        except RuntimeError as exc:  # gloo and NCCL report a dead peer as a RuntimeError (DistBackendError)
            raise StageFailed(f"pipeline stage {self.ctx.stage}: a link to another stage failed ({exc})") from exc

    def _stage_forward(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
    ) -> torch.Tensor:
        ctx, inner, trace = self.ctx, self.inner, self.trace
        groups = split_rows(len(tokens), ctx.forward_microbatches)
        trace.groups(groups)
        if trace.enabled:
            trace.set("q", max(q_lens))
        sends: list[tuple[Any, torch.Tensor]] = []  # a send's buffer must live until it completes
        for g, (a, b) in enumerate(groups):
            rows = first_row + a
            group_q = q_lens[a:b]
            if ctx.first:
                h = inner.embed(inner.padded_ids(tokens[a:b]))
            else:
                h = torch.empty((b - a, max(group_q), self.hidden_size), dtype=self.dtype, device=self.device)
                dist.recv(h, src=ctx.peer(ctx.stage - 1), group=ctx.forward)
            trace.mark("in", g)
            h = inner.extend_hidden(rows, h, starts[a:b], group_q)
            trace.mark("computed", g)
            if not ctx.last:
                sends.append((dist.isend(h, dst=ctx.peer(ctx.stage + 1), group=ctx.forward), h))
                trace.mark("sent", g)
                continue
            if not ctx.sends_logits:
                continue
            if not all_logits:
                h = inner.last_tokens(h, group_q)
            logits = inner.head(h).contiguous()
            sends.append((dist.isend(logits, dst=0, group=ctx.back), logits))
            trace.mark("sent", g)
        result = torch.empty(0)
        if ctx.leader:
            vocab = self.vocab_size
            q_max = max(q_lens)
            shape = (len(tokens), q_max, vocab) if all_logits else (len(tokens), vocab)
            result = torch.zeros(shape, dtype=torch.float32, device=self.device)
            for g, (a, b) in enumerate(groups):
                part = torch.empty(
                    (b - a, max(q_lens[a:b]), vocab) if all_logits else (b - a, vocab),
                    dtype=torch.float32,
                    device=self.device,
                )
                dist.recv(part, src=ctx.logits_rank, group=ctx.back)
                trace.mark("logits", g)
                if all_logits:
                    result[a:b, : part.shape[1]] = part
                else:
                    result[a:b] = part
        for work, _ in sends:
            work.wait()
        trace.mark("waited")
        return result

    def close(self) -> None:
        super().close()
        self.trace.close()


def build_stage_runner(
    model: Any, ctx: PipelineContext, *, max_rows: int, max_len: int, pool_tokens: int = 0
) -> PipelineRunner:
    """This rank's runner over `model` (already cut to its stage's layers by `keep_stage`; sharded over the
    stage's tensor-parallel group when it has one); on rank 0 the other ranks are told to build theirs with
    the same settings, and rank 0 gathers the inner runner every rank built (`PipelineRunner.stage_runners`).

    A stage runs its decode micro-batches as graphs of its own (`PipelineRunner`), not the single
    runner's decode graphs (those run rows 0..B-1 from token ids to logits in one piece, while a stage
    runs part of the layers over one micro-batch of rows, between a receive and a send), with the
    runner's compiled step functions inside them on CUDA, as the single runner has (without a graph
    around them, compiling made no measurable difference; inside one it halves the kernels). Prefill and
    extension run without graphs, one micro-batch at a time.
    """
    ctx.lead(BUILD, max_rows=max_rows, max_len=max_len, pool_tokens=pool_tokens)
    inner = build_runner(
        model, max_rows=max_rows, max_len=max_len, cuda_graphs=False, pool_tokens=pool_tokens, parallel=ctx.tensor,
    )  # fmt: skip
    runner = PipelineRunner(inner, ctx)
    kinds: list[Any] | None = [None] * ctx.world_size if ctx.leader else None
    dist.gather_object(type(inner).__name__, kinds, dst=0, group=ctx.control)
    if kinds is not None:
        runner.stage_runners = tuple(kinds)
    return runner


def follow(ctx: PipelineContext, build: Callable[..., PipelineRunner]) -> None:
    """On ranks 1..: build the runner rank 0 builds, then repeat its calls until it stops."""
    runner: PipelineRunner | None = None
    while True:
        method, args, kwargs = broadcast(ctx, None)
        if method == STOP:
            if runner is not None:
                runner.trace.close()
            return
        if method == BUILD:
            runner = build(**kwargs)
            # As the engine process does (worker.freeze_heap): a full collection walking torch's objects
            # would stall this stage, and the whole pipeline behind it, for a tenth of a second or more.
            gc.collect()
            gc.freeze()
            continue
        if runner is None:
            raise RuntimeError(f"pipeline rank {ctx.rank} got {method!r} before the runner was built")
        if runner.trace.enabled:
            runner.trace.begin(method, _rows(args))
        with torch.inference_mode():
            getattr(runner, method)(*args, **kwargs)
        runner.trace.end()


def _rows(args: Sequence[Any]) -> int:
    """The rows a repeated runner call touches (decode: its ids; forward: its token lists), for the trace."""
    for arg in args:
        if isinstance(arg, list):
            return len(arg)
    return 0


def init_pipeline(stages: int, microbatches: int = 0, tensor_parallel: int = 1) -> PipelineContext:
    """Join the pipeline's process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): `stages` times
    `tensor_parallel` ranks, rank r in stage r // tensor_parallel, each stage's ranks a tensor-parallel group
    (NCCL on GPUs, gloo on the CPU, as the activations' links)."""
    world = stages * tensor_parallel
    flag = f"--pipeline-parallel {stages} times --tensor-parallel {tensor_parallel} makes"
    rank, cuda, control = join_process_group(world, flag)
    forward = dist.new_group()
    back = dist.new_group()
    tensor = None
    if tensor_parallel > 1:
        # Every rank creates every group, in the same order (torch.distributed's rule); each keeps its stage's.
        groups = [dist.new_group(list(range(s * tensor_parallel, (s + 1) * tensor_parallel))) for s in range(stages)]
        # No control group: the pipeline repeats rank 0's calls to every rank, the stage's group only all-reduces.
        tensor = ParallelContext(
            rank=rank % tensor_parallel, world_size=tensor_parallel, group=groups[rank // tensor_parallel]
        )
    ctx = PipelineContext(
        stage=rank // tensor_parallel, stages=stages, microbatches=microbatches,
        tp_rank=rank % tensor_parallel, tensor_parallel=tensor_parallel, control=control, forward=forward,
        back=back, tensor=tensor,
    )  # fmt: skip
    _connect(ctx, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    return ctx


def _connect(ctx: PipelineContext, device: torch.device) -> None:
    """One small exchange over each link, so that NCCL builds its communicators now and not in a request."""
    probe = torch.zeros(1, device=device)
    if not ctx.first:
        dist.recv(probe, src=ctx.peer(ctx.stage - 1), group=ctx.forward)
    if not ctx.last:
        dist.send(probe, dst=ctx.peer(ctx.stage + 1), group=ctx.forward)
    if ctx.sends_logits:
        dist.send(probe, dst=0, group=ctx.back)
    if ctx.leader:
        dist.recv(probe, src=ctx.logits_rank, group=ctx.back)


class StageWatch(threading.Thread):
    """On rank 0: calls `died(reason)` once if another rank's process (`ranks`: 1, 2, ...) exits before `stop()`.

    A dead peer can leave an NCCL receive waiting for ever; this turns the death into the engine's
    failure within WATCH_SECONDS whatever the loop is doing.
    """

    def __init__(
        self, ranks: Sequence[subprocess.Popen[bytes]], died: Callable[[str], None], tensor_parallel: int = 1
    ) -> None:
        super().__init__(name="stratus-stage-watch", daemon=True)
        self.ranks = list(ranks)
        self.tensor_parallel = tensor_parallel
        self.died = died
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            for rank, proc in enumerate(self.ranks, start=1):
                code = proc.poll()
                if code is None:
                    continue
                if self._stop.is_set():  # a clean stop: rank 0 released the others
                    return
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                stage = rank // self.tensor_parallel
                self.died(f"pipeline stage {stage} (rank {rank}, pid {proc.pid}) {how}")
                return
