"""`stratus operator`: run the kopf operator (liveness endpoint, Prometheus metrics, namespace or cluster scope)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


class _KopfNoise(logging.Filter):
    """Drops kopf's per-record `settings` dump and routine success lines; keeps which object a line is about."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in ("settings", "k8s_skip"):
            record.__dict__.pop(key, None)
        ref = record.__dict__.pop("k8s_ref", None)
        if isinstance(ref, dict):
            record.__dict__["object"] = f"{ref.get('kind')}/{ref.get('namespace', '')}/{ref.get('name')}"
        message = record.getMessage()
        return not (
            record.levelno <= logging.INFO and message.startswith("Handler '") and message.endswith("succeeded.")
        )


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "operator",
        help="run the LLMDeployment operator",
        description="Reconcile LLMDeployments: compression Jobs, cloud and edge servers, the router, status. "
        "Flags override the STRATUS_* environment variables (see docs/operator.md).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        metavar="NS",
        help="watch this namespace (repeatable, globs allowed); default: STRATUS_NAMESPACES",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    parser.add_argument("--health-port", type=int, default=None, help="liveness /healthz port (0: off)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: off)")
    parser.add_argument(
        "--peering", default=None, help="kopf peering name, for several replicas with one active; default standalone"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Config is read once from the environment, by main.py at import: flags go there first.
    if args.namespace:
        os.environ["STRATUS_NAMESPACES"] = ",".join(args.namespace)
    elif args.all_namespaces:
        os.environ["STRATUS_NAMESPACES"] = ""
    if args.health_port is not None:
        os.environ["STRATUS_HEALTH_PORT"] = str(args.health_port)
    if args.metrics_port is not None:
        os.environ["STRATUS_METRICS_PORT"] = str(args.metrics_port)
    if args.peering is not None:
        os.environ["STRATUS_PEERING"] = args.peering

    import kopf

    for handler in logging.getLogger().handlers:
        handler.addFilter(_KopfNoise())

    main_module = importlib.import_module("stratus_operator.main")  # registers the handlers
    config = main_module.CONFIG
    namespaces = list(config.namespaces)
    log.info(
        "starting the operator",
        extra={
            "namespaces": namespaces or "all",
            "health_port": config.health_port,
            "metrics_port": config.metrics_port,
        },
    )
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=not config.peering,
        peering_name=config.peering or None,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m stratus_operator.cli.operator`: the operator alone, without loading the other subcommands.

    The full `stratus` CLI imports every subcommand module to build its parser; some of those load torch,
    which the operator never needs. The operator image can use this entry point to stay small.
    """
    from stratus_workers.observability import setup_logging

    parser = argparse.ArgumentParser(prog="stratus-operator")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="json", choices=["text", "json"])
    register(parser.add_subparsers(dest="command", required=True))
    given = list(sys.argv[1:] if argv is None else argv)
    # Global flags first, then the operator's: `--log-level debug -n team-a` or `operator -n team-a`.
    if "operator" not in given:
        cut = 0
        while cut < len(given) and given[cut] in ("--log-level", "--log-format"):
            cut += 2
        given = [*given[:cut], "operator", *given[cut:]]
    args = parser.parse_args(given)
    setup_logging(args.log_level, args.log_format)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
