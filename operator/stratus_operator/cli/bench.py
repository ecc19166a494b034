"""`stratus bench --target HOST:PORT`: load a router or server and print latency, throughput and tiers."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from stratus_operator.cli.common import add_connection_args
from stratus_workers.client import AsyncClient
from stratus_workers.client.client import POLICIES, TIER_NAMES
from stratus_workers.client.prompts import SAMPLE_PROMPTS


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="send concurrent requests and report latency and throughput")
    add_connection_args(parser)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--requests", type=int, default=32, help="requests in total")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--policy", choices=sorted(POLICIES), help="override the router's policy")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.set_defaults(func=run)


@dataclass
class BenchResult:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    tiers: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


async def bench(
    target: str,
    *,
    concurrency: int,
    requests: int,
    max_new_tokens: int,
    policy: str | None = None,
    timeout: float = 300.0,
    token: str | None = None,
    tls_ca: str | None = None,
) -> BenchResult:
    """Send `requests` chat requests from the sample prompts, `concurrency` at a time."""
    if concurrency < 1 or requests < 1:
        raise ValueError("--concurrency and --requests must be at least 1")
    result = BenchResult()
    prompts = itertools.cycle(SAMPLE_PROMPTS)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for _ in range(requests):
        queue.put_nowait(next(prompts))
    async with AsyncClient(target, timeout=timeout, token=token, tls_ca=tls_ca) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                started = time.perf_counter()
                try:
                    reply = await client.generate(
                        messages=[{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, policy=policy
                    )
                except grpc.aio.AioRpcError as exc:
                    result.errors[exc.code().name] += 1
                    continue
                result.latencies.append(time.perf_counter() - started)
                result.tokens += reply.usage.completion_tokens
                result.tiers[TIER_NAMES[reply.route.tier]] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
    return result


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(
        bench(
            args.target,
            concurrency=args.concurrency,
            requests=args.requests,
            max_new_tokens=args.max_new_tokens,
            token=args.token,
            tls_ca=args.tls_ca,
            policy=args.policy,
            timeout=args.timeout,
        )
    )
    done = len(result.latencies)
    table = Table(title=f"stratus bench → {args.target} (concurrency {args.concurrency})")
    for column in ("requests", "errors", "p50 latency", "p95 latency", "tokens/s", "requests/s", "served by"):
        table.add_column(column, justify="right")
    share = ", ".join(f"{tier} {count / done:.0%}" for tier, count in result.tiers.most_common()) if done else "-"
    errors = sum(result.errors.values())
    table.add_row(
        str(done + errors),
        str(errors) + (f" ({', '.join(f'{k} {v}' for k, v in result.errors.items())})" if errors else ""),
        f"{result.percentile(50) * 1e3:.0f} ms",
        f"{result.percentile(95) * 1e3:.0f} ms",
        f"{result.tokens / result.seconds:.1f}",
        f"{done / result.seconds:.2f}",
        share,
    )
    Console(width=max(120, Console().width)).print(table)
    return 1 if errors else 0
