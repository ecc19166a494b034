"""Entrypoint: `python -m stratus_workers.serve --model SOURCE ...` runs one model server.

The server process is the frontend (gRPC, tokenization, text); by default with a GPU the engine
loop runs in a process of its own that the server starts (serve/worker.py). If that engine dies,
the server fails what was in flight with UNAVAILABLE, reports NOT_SERVING, and exits with
ENGINE_DIED, so that Kubernetes restarts the pod: a fresh process on a device whose state is known.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from stratus_workers.lifecycle import exit_now
from stratus_workers.models import ModelLoadError
from stratus_workers.observability import setup_logging
from stratus_workers.serve.server import ModelServer, ServerSettings, engine_mode
from stratus_workers.settings import parse_config

log = logging.getLogger(__name__)

ENGINE_DIED = 3
ENGINE_DEAD_GRACE = 1.0  # seconds the server answers NOT_SERVING before it exits


def main(argv: list[str] | None = None) -> int:
    config = parse_config(
        ServerSettings,
        argv,
        prog="python -m stratus_workers.serve",
        description="Serve one model over the stratus.v1 Inference gRPC service.",
    )
    setup_logging(config.log_level, config.log_format)
    args = tuple(sys.argv[1:] if argv is None else argv)
    try:
        config.validate()
        if config.pipeline_parallel > 1 and os.environ.get("RANK", "0") != "0":
            return follow_pipeline(config)  # with tensor_parallel too: each stage's ranks are its group
        if config.tensor_parallel > 1 and os.environ.get("RANK", "0") != "0":
            return follow_tensor_parallel(config)
        if config.tensor_parallel > 1 and engine_mode(config) == "thread":
            return serve_tensor_parallel_in_process(config, args)
        _torch_threads(config)
        return asyncio.run(serve(ModelServer(config, argv=args)))
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _torch_threads(config: ServerSettings) -> None:
    if config.threads or engine_mode(config) == "thread":
        import torch

        if config.threads:
            torch.set_num_threads(config.threads)
        # Torch ops run on the engine thread one at a time: one inter-op thread leaves the cores to intra-op work.
        torch.set_num_interop_threads(1)


async def serve(server: ModelServer, grace: float = 5.0) -> int:
    """Run `server` until SIGINT/SIGTERM (status 0) or until its engine dies (status ENGINE_DIED)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        stopped = asyncio.ensure_future(stop.wait())
        dead = asyncio.ensure_future(server.engine_dead.wait())
        await asyncio.wait((stopped, dead), return_when=asyncio.FIRST_COMPLETED)
        if dead.done():
            log.critical("the engine died; exiting so that the pod restarts", extra={"exit_status": ENGINE_DIED})
            await asyncio.sleep(ENGINE_DEAD_GRACE)  # probes and callers see NOT_SERVING/UNAVAILABLE meanwhile
            return ENGINE_DIED
        return 0
    finally:
        await server.stop(grace)


def follow_tensor_parallel(config: ServerSettings) -> int:
    """Ranks 1..N-1 of `--tensor-parallel N`: load the model and repeat rank 0's runner calls until it stops."""
    from stratus_workers.models import load_model
    from stratus_workers.serve import parallel
    from stratus_workers.serve.runner.build import build_runner
    from stratus_workers.serve.worker import die_with_parent

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        die_with_parent()  # started by rank 0's engine process: it must not outlive it
    _torch_threads(config)
    ctx = parallel.init_group(config.tensor_parallel)
    log.info("tensor-parallel rank %d of %d joined", ctx.rank, ctx.world_size)
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, name=config.name or None)
    parallel.follow(ctx, lambda **settings: build_runner(loaded.model, parallel=ctx, **settings))
    exit_now(0)
    return 0


def follow_pipeline(config: ServerSettings) -> int:
    """Ranks 1.. of `--pipeline-parallel P` (times `--tensor-parallel T`): load the model, keep this stage's
    layers, and repeat rank 0's runner calls until it stops (serve/pipeline.py)."""
    from stratus_workers.models import load_model
    from stratus_workers.serve import pipeline
    from stratus_workers.serve.worker import die_with_parent

    die_with_parent()  # started by stage 0's engine process: it must not outlive it
    _torch_threads(config)
    ctx = pipeline.init_pipeline(config.pipeline_parallel, config.pipeline_microbatches, config.tensor_parallel)
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, name=config.name or None)
    layers = pipeline.keep_stage(loaded.model, ctx.stage, ctx.stages)
    log.info(
        "pipeline rank %d (stage %d of %d, tensor-parallel rank %d of %d) joined (layers %d..%d)",
        ctx.rank, ctx.stage, ctx.stages, ctx.tp_rank, ctx.tensor_parallel, layers.start, layers.stop - 1,
    )  # fmt: skip
    pipeline.follow(ctx, lambda **settings: pipeline.build_stage_runner(loaded.model, ctx, **settings))
    exit_now(0)
    return 0


def serve_tensor_parallel_in_process(config: ServerSettings, argv: Sequence[str]) -> int:
    """`--tensor-parallel N --engine thread`: this process is rank 0 and runs the engine in a thread."""
    from stratus_workers.serve import parallel

    _torch_threads(config)
    children: list[subprocess.Popen[bytes]] = []
    if "RANK" not in os.environ:
        children = parallel.spawn_followers(config.tensor_parallel, argv)
    ctx = parallel.init_group(config.tensor_parallel)
    log.info("tensor-parallel rank %d of %d joined", ctx.rank, ctx.world_size)
    # Stopping the server closes its engine, which releases the other ranks from follow().
    code = asyncio.run(serve(ModelServer(config, parallel=ctx, argv=tuple(argv))))
    for child in children:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
    exit_now(code)
    return code



if __name__ == "__main__":
    sys.exit(main())
