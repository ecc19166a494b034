"""Tensor parallel: a rank's place in the group, rank 0's repeated runner calls, the followers' loop.

One model server can span N GPUs of one pod, one process per GPU. Every rank loads the model and
keeps its shard of the heads and MLP columns (runner/fused.py); rank 0 alone runs the engine and
the gRPC server, and repeats each runner call to the other ranks, which make the same call in
`follow()`, so every rank issues the same all-reduces in the same order. The entrypoint
(`python -m stratus_workers.serve --tensor-parallel N`) starts ranks 1..N-1 itself, or joins the
group that `torchrun --nproc-per-node N` made when RANK and WORLD_SIZE are set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stratus_workers.ports import free_port

# NVLink multicast (NVLS) can take a host's GPUs out of service on some machines; we never need it.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
STOP = "__stop__"  # rank 0's last message: the followers leave follow()
BUILD = "__init__"  # rank 0 built a runner: the followers build theirs with the same settings


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a tensor-parallel group (rank 0 serves; every rank computes)."""

    rank: int
    world_size: int
    group: Any = None  # ProcessGroup for the activations' all-reduces (None: the default group)
    # ProcessGroup (gloo) for rank 0's calls: small pickled messages. None where someone else repeats the
    # calls (a pipeline stage's group: the pipeline's rank 0 repeats every call to every rank).
    control: Any = None

    @property
    def leader(self) -> bool:
        return self.world_size > 1 and self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def lead(self, method: str, *args: Any, **kwargs: Any) -> None:
        """On rank 0: tell the other ranks to make the same call (elsewhere, or without a control group: nothing)."""
        if self.leader and self.control is not None:
            broadcast(self, (method, args, kwargs))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group in place (each rank holds a partial result of a sharded matmul)."""
        if self.sharded:
            dist.all_reduce(x, group=self.group)
        return x


def broadcast(ctx: ParallelContext, message: Any) -> Any:
    """Rank 0's `message`, on every rank (rank 0 sends, the others receive and return it)."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


def follow(ctx: ParallelContext, build: Callable[..., Any]) -> None:
    """On ranks 1..N-1: build the runner rank 0 builds (`build(**settings)`), repeat its calls until it stops."""
    method, _, kwargs = broadcast(ctx, None)
    if method != BUILD:
        raise RuntimeError(f"tensor-parallel follower expected the runner's construction, got {method!r}")
    runner = build(**kwargs)
    while True:
        method, args, kwargs = broadcast(ctx, None)
        if method == STOP:
            return
        if method == BUILD:  # rank 0 built a new runner (a server restart in-process)
            runner = build(**kwargs)
            continue
        getattr(runner, method)(*args, **kwargs)


def spawn_followers(world_size: int, argv: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1..world_size-1 as copies of this command; this process becomes rank 0."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0", **SAFE_NCCL_ENV)
    children = []
    for rank in range(1, world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank))
        children.append(subprocess.Popen([sys.executable, "-m", "stratus_workers.serve", *argv], env=env))
    return children


def join_process_group(world_size: int, flag: str) -> tuple[int, bool, Any]:
    """Join the process group described by RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (NCCL on
    GPUs, gloo on the CPU); returns this process's rank, whether it runs on CUDA, and the gloo control group."""
    for key, value in SAFE_NCCL_ENV.items():
        os.environ.setdefault(key, value)
    rank = int(os.environ["RANK"])
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise ValueError(f"{flag} {world_size} but WORLD_SIZE is {os.environ['WORLD_SIZE']}")
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} needs GPU {local}, but this pod sees {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    # Rank 0's calls travel as small pickled messages over gloo; activations over NCCL. Loading
    # a large model can take minutes on one rank before the next call, hence the long timeout.
    control = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    return rank, cuda, control


def init_group(world_size: int) -> ParallelContext:
    """Join the tensor-parallel group."""
    rank, _, control = join_process_group(world_size, "--tensor-parallel")
    return ParallelContext(rank=rank, world_size=world_size, control=control)
