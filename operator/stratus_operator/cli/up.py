"""`stratus up FILE`: run an LLMDeployment on this machine, as the operator would on a cluster."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any

from stratus_workers.client import Client
from stratus_workers.client.client import TIER_NAMES
from stratus_workers.client.prompts import SAMPLE_PROMPTS


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run an LLMDeployment locally (compression, servers, router as processes)",
        description="Plan FILE's LLMDeployment for this one machine and run it: compression jobs become "
        "processes, pods become servers on loopback ports. Ctrl-C stops everything.",
    )
    parser.add_argument("file", type=Path, help="an LLMDeployment manifest, e.g. deploy/samples/smollm2.yaml")
    parser.add_argument("--once", action="store_true", help="send the sample prompts through the router and exit")
    parser.add_argument("--port", type=int, default=0, help="router gRPC port (default: a free one)")
    parser.add_argument("--http-port", type=int, default=0, help="router HTTP port (default: a free one)")
    parser.add_argument(
        "--work-dir", type=Path, help="artifacts, logs and configs (default: ~/.cache/stratus/local/NAME)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length for --once")
    parser.set_defaults(func=run)


def _ask(runner: Any, max_new_tokens: int) -> int:
    failures = 0
    print("\nsample prompts through the router (tier · why · latency):", flush=True)
    with Client(runner.router.address, timeout=300) as client:
        for prompt in SAMPLE_PROMPTS[:6]:
            started = time.perf_counter()
            try:
                reply = client.generate(messages=[{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)
            except Exception as exc:  # report and go on: --once shows what works
                failures += 1
                print(f"  ? {prompt}\n    error: {exc}")
                continue
            seconds = time.perf_counter() - started
            route = reply.route
            why = route.reason + (
                f", confidence {route.confidence:.2f} vs {route.threshold:.2f}" if route.HasField("confidence") else ""
            )
            answer = " ".join(reply.text.split())
            print(f"  ? {prompt}\n    [{TIER_NAMES[route.tier]} · {why} · {seconds * 1e3:.0f} ms] {answer}", flush=True)
    return failures


def run(args: argparse.Namespace) -> int:
    # Imported here: it pulls in torch, which `stratus operator` (same CLI) must not pay for.
    from stratus_operator.local import LocalRunError, LocalRunner, load_manifest

    try:
        deployment = load_manifest(args.file)
    except LocalRunError as exc:
        print(f"error: {exc}")
        return 2
    runner = LocalRunner(deployment, work_dir=args.work_dir, router_port=args.port, http_port=args.http_port)
    print(f"stratus up: {deployment.metadata.name} from {args.file} (work dir {runner.work_dir})", flush=True)
    stop_requested = False

    def on_term(*_: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        with runner.running():
            plan = runner.plan
            assert plan is not None
            for note in plan.notes:
                print(f"note      {note}")
            for line in runner.endpoint_lines():
                print(line)
            print(f"state     {runner.write_state()}", flush=True)
            if args.once:
                return 1 if _ask(runner, args.max_new_tokens) else 0
            print("ready; Ctrl-C stops everything", flush=True)
            while True:
                for child in runner.children:
                    if child.process.poll() is not None:
                        print(
                            f"error: {child.role} {child.name} exited with {child.process.returncode}; "
                            f"log: {child.log_path}"
                        )
                        return 1
                time.sleep(1.0)
    except LocalRunError as exc:
        print(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        print("\nstopping" + (" (SIGTERM)" if stop_requested else ""), flush=True)
        return 0
