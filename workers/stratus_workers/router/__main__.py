"""Entrypoint: `python -m stratus_workers.router --config router.json ...` runs the router."""

from __future__ import annotations

import asyncio
import sys

from pydantic import ValidationError

from stratus_workers.lifecycle import run_until_signalled
from stratus_workers.models.files import ModelLoadError
from stratus_workers.observability import setup_logging
from stratus_workers.router.server import RouterServer, RouterSettings
from stratus_workers.settings import parse_config


def main(argv: list[str] | None = None) -> int:
    settings = parse_config(
        RouterSettings,
        argv,
        prog="python -m stratus_workers.router",
        description="Route stratus.v1 requests between edge and cloud model servers.",
    )
    setup_logging(settings.log_level, settings.log_format)
    try:
        server = RouterServer.from_settings(settings)
    except FileNotFoundError as exc:
        print(f"error: router config not found: {exc.filename}", file=sys.stderr)
        return 2
    except (ValidationError, ValueError) as exc:
        print(f"error: router config {settings.config} is invalid: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_until_signalled(server))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
