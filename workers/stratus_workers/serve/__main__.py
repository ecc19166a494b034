"""Entrypoint: `python -m stratus_workers.serve --model SOURCE ...` runs one model server."""

from __future__ import annotations

import asyncio
import sys

import torch

from stratus_workers.lifecycle import run_until_signalled
from stratus_workers.models import ModelLoadError
from stratus_workers.observability import setup_logging
from stratus_workers.serve.server import ModelServer, ServerSettings
from stratus_workers.settings import parse_config


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
            from stratus_workers.serve import parallel  # torch.distributed only where it is used

            return parallel.run(config, sys.argv[1:] if argv is None else argv)
        asyncio.run(run_until_signalled(ModelServer(config)))
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
