"""The `stratus` command: one subcommand module each, registered here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from stratus_operator import __version__

# Each module defines `register(subparsers)`, which adds its parser and sets `func`.
SUBCOMMANDS = ("up", "chat", "bench", "calibrate", "compress", "operator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stratus", description="Run LLMs across cloud and edge: compress, place, serve and route."
    )
    parser.add_argument("--version", action="version", version=f"stratus {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"stratus_operator.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from stratus_workers.observability import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
