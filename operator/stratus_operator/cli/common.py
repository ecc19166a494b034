"""Flags shared by the commands that talk to a router: where it is and how to prove who we are."""

from __future__ import annotations

import argparse
import os


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="router or server gRPC address")
    parser.add_argument(
        "--token",
        default=os.environ.get("STRATUS_TOKEN"),
        help="bearer token for a router that requires one [env STRATUS_TOKEN]",
    )
    parser.add_argument("--tls-ca", help="CA certificate, to reach a router that serves TLS")
