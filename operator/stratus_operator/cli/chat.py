"""`stratus chat --target HOST:PORT "prompt"`: stream one answer to the terminal."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grpc

from stratus_operator.cli.common import add_connection_args
from stratus_workers.client import Client
from stratus_workers.client.client import FINISH_NAMES, POLICIES, TIER_NAMES


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("chat", help="ask a router or model server one question, streaming the answer")
    parser.add_argument("prompt", help="the user message ('-' reads it from standard input)")
    add_connection_args(parser)
    parser.add_argument("--system", help="a system message to send first")
    parser.add_argument("--raw", action="store_true", help="send the prompt as raw text, no chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--policy", choices=sorted(POLICIES), help="override the router's policy")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    options: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        policy=args.policy,
    )
    if args.raw:
        options["prompt"] = text
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        options["messages"] = [*messages, {"role": "user", "content": text}]
    started = time.perf_counter()
    try:
        with Client(args.target, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca) as client:
            final = None
            for chunk in client.stream(**options):
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                if chunk.HasField("route"):
                    final = chunk
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    seconds = time.perf_counter() - started
    if final is not None:
        route = final.route
        print(
            f"\n[{TIER_NAMES[route.tier]} · {route.reason} · {final.usage.completion_tokens} tokens · "
            f"{FINISH_NAMES[final.finish_reason]} · {seconds:.2f} s]",
            file=sys.stderr,
        )
    return 0
