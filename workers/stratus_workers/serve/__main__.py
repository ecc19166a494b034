"""Entrypoint: `python -m stratus_workers.serve --model SOURCE ...` runs one model server."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

import torch

from stratus_workers.lifecycle import run_until_signalled
from stratus_workers.models import ModelLoadError, load_model
from stratus_workers.observability import setup_logging
from stratus_workers.serve import parallel
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.server import ModelServer, ServerSettings
from stratus_workers.settings import parse_config

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(
        ServerSettings,
        argv,
        prog="python -m stratus_workers.serve",
        description="Serve one model over the stratus.v1 Inference gRPC service.",
    )
    setup_logging(config.log_level, config.log_format)
    if config.threads:
        torch.set_num_threads(config.threads)
    # Torch ops run on the engine thread one at a time: one inter-op thread leaves the cores to intra-op work.
    torch.set_num_interop_threads(1)
    try:
        config.validate()
        if config.tensor_parallel > 1:
            return serve_tensor_parallel(config, sys.argv[1:] if argv is None else argv)
        asyncio.run(run_until_signalled(ModelServer(config)))
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def serve_tensor_parallel(config: ServerSettings, argv: Sequence[str]) -> int:
    """`--tensor-parallel N` (N > 1): spawn or join the group; rank 0 serves, the other ranks follow."""
    children: list[subprocess.Popen[bytes]] = []
    if "RANK" not in os.environ:
        children = parallel.spawn_followers(config.tensor_parallel, argv)
    ctx = parallel.init_group(config.tensor_parallel)
    log.info("tensor-parallel rank %d of %d joined", ctx.rank, ctx.world_size)
    if ctx.rank == 0:
        # Stopping the server closes its engine, which releases the other ranks from follow().
        asyncio.run(run_until_signalled(ModelServer(config, parallel=ctx)))
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    else:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device, name=config.name or None)
        parallel.follow(ctx, lambda **settings: build_runner(loaded.model, parallel=ctx, **settings))
    # No destroy_process_group(): tearing down NCCL communicators that captured CUDA graphs still
    # reference can hang, and the process is ending anyway.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
