"""Pipeline parallel: the decoder layers split into contiguous stages, one process and device each.

`--pipeline-parallel N` makes the engine process stage 0 (rank 0): it starts stages 1..N-1 as copies
of the server's command (`parallel.spawn_followers`), and every stage loads the model and keeps only
its contiguous share of the decoder layers (`stage_layers`) and their KV cache. Rank 0 runs the
engine core over a `PipelineRunner` and repeats each runner call to the other stages on a gloo
control group (the way tensor parallel does, serve/parallel.py), so every stage changes its cache
rows the same way. In a forward pass only stage 0 embeds; each stage runs its layers and sends the
activations to the next (NCCL between GPUs, gloo on the CPU); the last stage applies the final norm
and LM head and sends the logits back to rank 0, which samples.

Micro-batches: a forward over B rows is split into `microbatches` contiguous groups of rows (default:
as many as there are stages). Stage 0 computes group 1 while stage 1 computes group 0, and so on, so
within a step the stages overlap instead of waiting on each other; a step then takes about
(M + N - 1) / M group-times of one stage instead of N. More groups shrink that bubble but make each
group's matrix products smaller and add a send per group; N groups is the smallest count that keeps
every stage busy once the pipeline fills. What is not overlapped: the next step's first group needs
this step's sampled tokens, so the pipeline drains once per step (docs/serving.md).

A stage that dies fails the engine: rank 0 watches its stage processes (`StageWatch`), and a failed
send or receive raises `StageFailed`, which the engine core does not catch, so the engine process
reports the failure and exits; the frontend fails what is in flight and turns health NOT_SERVING.
"""

from __future__ import annotations

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
from stratus_workers.serve.errors import EngineFailed
from stratus_workers.serve.parallel import BUILD, STOP, join_process_group
from stratus_workers.serve.runner import Decoded, ModelRunner, UnsupportedModelError
from stratus_workers.serve.runner.build import build_runner

log = logging.getLogger(__name__)

WATCH_SECONDS = 0.1


class StageFailed(EngineFailed):
    """A pipeline stage died or its link broke: the engine cannot compute any more."""


@dataclass(frozen=True)
class PipelineContext:
    """This process's stage in a pipeline of `world_size` stages."""

    rank: int
    world_size: int
    microbatches: int
    control: Any = None  # gloo group: rank 0's repeated runner calls (small pickled messages)
    forward: Any = None  # group for activations, stage k -> k + 1
    back: Any = None  # group for the last stage's logits -> stage 0 (a group of its own: no cycle on one stream)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world_size - 1

    def lead(self, method: str, *args: Any, **kwargs: Any) -> None:
        """On stage 0: tell the other stages to make the same call."""
        if self.first:
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


class PipelineRunner(ModelRunner):
    """One stage's runner (`inner`, over its share of the layers) and its place in the pipeline.

    The same class runs on every stage: on stage 0 the engine core calls it and each call is repeated
    to the others (`follow`), which make the same call; `_forward` then does each stage's part.
    """

    def __init__(self, inner: ModelRunner, ctx: PipelineContext) -> None:
        super().__init__(inner.model, max_rows=inner.max_rows, max_len=inner.max_len, pool_tokens=inner.pool_tokens)
        self.inner = inner
        self.ctx = ctx
        self.cache = inner.cache
        self.hidden_size = int(inner.config.hidden_size)
        self.layers_held = len(inner.layers)

    def _lead(self, method: str, *args: Any, **kwargs: Any) -> None:
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
        return self.inner.warmup(max_kv_len, batch_sizes)

    def _decode(self, ids: list[int], logprobs: bool, join: Sequence[int] | torch.Tensor) -> Decoded:
        if self.ctx.first:
            return super()._decode(ids, logprobs, join)
        self._forward(0, [[t] for t in ids], self.cache.lengths[: len(ids)], [1] * len(ids), False)
        return Decoded(torch.empty(0), [], None)

    def _forward(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
    ) -> torch.Tensor:
        try:
            return self._stage_forward(first_row, tokens, starts, q_lens, all_logits)
        except StageFailed:
            raise
        except RuntimeError as exc:  # gloo and NCCL report a dead peer as a RuntimeError (DistBackendError)
            raise StageFailed(f"pipeline stage {self.ctx.rank}: a link to another stage failed ({exc})") from exc

    def _stage_forward(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
    ) -> torch.Tensor:
        ctx, inner = self.ctx, self.inner
        groups = split_rows(len(tokens), ctx.microbatches)
        sends: list[tuple[Any, torch.Tensor]] = []  # a send's buffer must live until it completes
        for a, b in groups:
            rows = first_row + a
            group_q = q_lens[a:b]
            if ctx.first:
                h = inner.embed(inner.padded_ids(tokens[a:b]))
            else:
                h = torch.empty((b - a, max(group_q), self.hidden_size), dtype=self.dtype, device=self.device)
                dist.recv(h, src=ctx.rank - 1, group=ctx.forward)
            h = inner.extend_hidden(rows, h, starts[a:b], group_q)
            if not ctx.last:
                sends.append((dist.isend(h, dst=ctx.rank + 1, group=ctx.forward), h))
                continue
            if not all_logits:
                h = inner.last_tokens(h, group_q)
            logits = inner.head(h).contiguous()
            sends.append((dist.isend(logits, dst=0, group=ctx.back), logits))
        result = torch.empty(0)
        if ctx.first:
            vocab = self.vocab_size
            q_max = max(q_lens)
            shape = (len(tokens), q_max, vocab) if all_logits else (len(tokens), vocab)
            result = torch.zeros(shape, dtype=torch.float32, device=self.device)
            for a, b in groups:
                part = torch.empty(
                    (b - a, max(q_lens[a:b]), vocab) if all_logits else (b - a, vocab),
                    dtype=torch.float32,
                    device=self.device,
                )
                dist.recv(part, src=ctx.world_size - 1, group=ctx.back)
                if all_logits:
                    result[a:b, : part.shape[1]] = part
                else:
                    result[a:b] = part
        for work, _ in sends:
            work.wait()
        return result


def build_stage_runner(
    model: Any, ctx: PipelineContext, *, max_rows: int, max_len: int, pool_tokens: int = 0
) -> PipelineRunner:
    """This stage's runner over `model` (already cut to its layers by `keep_stage`); on stage 0 the
    other stages are told to build theirs with the same settings.

    A stage runs its forward passes eagerly, one micro-batch at a time: no decode graphs (their
    static buffers hold one batch of rows from row 0, and the stages exchange activations between
    micro-batches), no decoding ahead (the next step's tokens come back from the last stage), and no
    torch.compile (without a graph around them its fused kernels save little, and a compile per stage
    lengthens the start; on the GPU run, on or off made no measurable difference: docs/benchmarks.md).
    """
    ctx.lead(BUILD, max_rows=max_rows, max_len=max_len, pool_tokens=pool_tokens)
    inner = build_runner(
        model, max_rows=max_rows, max_len=max_len, cuda_graphs=False, compile=False, pool_tokens=pool_tokens
    )
    return PipelineRunner(inner, ctx)


def follow(ctx: PipelineContext, build: Callable[..., PipelineRunner]) -> None:
    """On stages 1..N-1: build the runner stage 0 builds, then repeat its calls until it stops."""
    runner: PipelineRunner | None = None
    while True:
        method, args, kwargs = broadcast(ctx, None)
        if method == STOP:
            return
        if method == BUILD:
            runner = build(**kwargs)
            # As the engine process does (worker.freeze_heap): a full collection walking torch's objects
            # would stall this stage, and the whole pipeline behind it, for a tenth of a second or more.
            gc.collect()
            gc.freeze()
            continue
        if runner is None:
            raise RuntimeError(f"pipeline stage {ctx.rank} got {method!r} before the runner was built")
        with torch.inference_mode():
            getattr(runner, method)(*args, **kwargs)


def init_pipeline(stages: int, microbatches: int = 0) -> PipelineContext:
    """Join the pipeline's process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    rank, cuda, control = join_process_group(stages, "--pipeline-parallel")
    forward = dist.new_group()
    back = dist.new_group()
    ctx = PipelineContext(
        rank=rank, world_size=stages, microbatches=microbatches or stages, control=control, forward=forward, back=back
    )
    _connect(ctx, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    return ctx


def _connect(ctx: PipelineContext, device: torch.device) -> None:
    """One small exchange over each link, so that NCCL builds its communicators now and not in a request."""
    probe = torch.zeros(1, device=device)
    if not ctx.first:
        dist.recv(probe, src=ctx.rank - 1, group=ctx.forward)
    if not ctx.last:
        dist.send(probe, dst=ctx.rank + 1, group=ctx.forward)
    if ctx.last:
        dist.send(probe, dst=0, group=ctx.back)
    if ctx.first:
        dist.recv(probe, src=ctx.world_size - 1, group=ctx.back)


class StageWatch(threading.Thread):
    """On stage 0: calls `died(reason)` once if a stage process exits before `stop()`.

    A dead peer can leave an NCCL receive waiting for ever; this turns the death into the engine's
    failure within WATCH_SECONDS whatever the loop is doing.
    """

    def __init__(self, stages: Sequence[subprocess.Popen[bytes]], died: Callable[[str], None]) -> None:
        super().__init__(name="stratus-stage-watch", daemon=True)
        self.stages = list(stages)
        self.died = died
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            for rank, proc in enumerate(self.stages, start=1):
                code = proc.poll()
                if code is None:
                    continue
                if self._stop.is_set():  # a clean stop: stage 0 released the stages
                    return
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                self.died(f"pipeline stage {rank} (pid {proc.pid}) {how}")
                return
