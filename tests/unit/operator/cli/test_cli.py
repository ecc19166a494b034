"""The `stratus` parser: every subcommand registered, the operator's flags."""

from __future__ import annotations

import argparse

import pytest

from stratus_operator.cli import SUBCOMMANDS, build_parser

pytestmark = pytest.mark.unit


def test_cli_registers_operator() -> None:
    args = build_parser().parse_args(["operator", "-n", "team-a", "-n", "team-b", "--metrics-port", "0"])
    assert args.command == "operator" and args.namespace == ["team-a", "team-b"] and args.metrics_port == 0
    assert args.func.__module__ == "stratus_operator.cli.operator"


def test_every_subcommand_is_registered() -> None:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(SUBCOMMANDS)
