"""Tensor-parallel serving: one model server spread over N GPUs of one pod, one process per GPU.

`python -m stratus_workers.serve --tensor-parallel N ...` starts ranks 1..N-1 itself (or joins
the group that `torchrun --nproc-per-node N` made, when RANK and WORLD_SIZE are set). Every rank
loads the model and keeps its shard of the heads and MLP columns (see runner.ParallelContext);
rank 0 alone runs the engine and the gRPC server and repeats each runner call to the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from stratus_workers.lifecycle import run_until_signalled
from stratus_workers.models import load_model
from stratus_workers.serve.runner import ParallelContext, follow, parallel_context
from stratus_workers.serve.server import ModelServer, ServerSettings

log = logging.getLogger(__name__)

# NVLink multicast (NVLS) can take a host's GPUs out of service on some machines; we never need it.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_followers(world_size: int, argv: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1..world_size-1 as copies of this command; this process becomes rank 0."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0", **SAFE_NCCL_ENV)
    children = []
    for rank in range(1, world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank))
        children.append(subprocess.Popen([sys.executable, "-m", "stratus_workers.serve", *argv], env=env))
    return children


def init_group(world_size: int) -> ParallelContext:
    """Join the process group described by RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""
    for key, value in SAFE_NCCL_ENV.items():
        os.environ.setdefault(key, value)
    rank = int(os.environ["RANK"])
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise ValueError(f"--tensor-parallel {world_size} but WORLD_SIZE is {os.environ['WORLD_SIZE']}")
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
    return ParallelContext(rank=rank, world_size=world_size, control=control)


def run(config: ServerSettings, argv: Sequence[str]) -> int:
    """Entry point for `--tensor-parallel N` (N > 1): spawn or join the group, then serve or follow."""
    children = [] if "RANK" in os.environ else spawn_followers(config.tensor_parallel, argv)
    ctx = init_group(config.tensor_parallel)
    log.info("tensor-parallel rank %d of %d joined", ctx.rank, ctx.world_size)
    if ctx.rank == 0:
        server = ModelServer(config)
        with parallel_context(ctx):
            asyncio.run(run_until_signalled(server))
        if server.engine is not None:
            server.engine.runner.close()  # the other ranks leave follow() and exit
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    else:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device, name=config.name or None)
        follow(loaded.model, ctx)
    # No destroy_process_group(): tearing down NCCL communicators that captured CUDA graphs still
    # reference can hang, and the process is ending anyway.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
