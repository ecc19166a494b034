"""`make soak`: the local stack under a steady request rate for N minutes; errors and memory, start and end.

It runs `deploy/samples/smollm2.yaml` exactly as `stratus up` does (compression job, cloud and edge
servers and the router as processes, mTLS between them), then sends requests at a fixed rate from
a pool of concurrent users for the whole run, and samples every process's resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import statistics
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import grpc
import report  # tests/bench/report.py (scripts run from this folder)

ROOT = Path(__file__).resolve().parents[2]
SECTION = "soak"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(address: str, minutes: float, rate: float, users: int, pids: dict[str, int]) -> dict[str, object]:
    from stratus_workers.client import AsyncClient
    from stratus_workers.client.prompts import SAMPLE_PROMPTS

    codes: Counter[str] = Counter()
    latencies: list[float] = []
    memory: dict[str, list[float]] = {name: [rss_mib(pid)] for name, pid in pids.items()}
    prompts = itertools.cycle(SAMPLE_PROMPTS)
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=users * 4)
    deadline = time.monotonic() + minutes * 60

    async def producer() -> None:
        interval = 1.0 / rate
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            await queue.put(next(prompts))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def user(client: AsyncClient) -> None:
        while time.monotonic() < deadline or not queue.empty():
            try:
                prompt = await asyncio.wait_for(queue.get(), 1.0)
            except TimeoutError:
                continue
            started = time.perf_counter()
            try:
                # Sampled, so that the router's output cache cannot answer: every request reaches a model.
                await client.generate(
                    messages=[{"role": "user", "content": prompt}], max_new_tokens=32, temperature=0.7, top_p=0.9
                )
                codes["OK"] += 1
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

    async def sampler() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(15)
            for name, pid in pids.items():
                memory[name].append(rss_mib(pid))

    async with AsyncClient(address, timeout=300) as client:
        await asyncio.gather(producer(), sampler(), *(user(client) for _ in range(users)))
    for name, pid in pids.items():
        memory[name].append(rss_mib(pid))
    return {"codes": codes, "latencies": latencies, "memory": memory}


def render(result: dict[str, object], args: argparse.Namespace, seconds: float) -> str:
    codes: Counter[str] = result["codes"]  # type: ignore[assignment]
    latencies: list[float] = result["latencies"]  # type: ignore[assignment]
    memory: dict[str, list[float]] = result["memory"]  # type: ignore[assignment]
    total = sum(codes.values())
    errors = total - codes["OK"]
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [float("nan")] * 99
    lines = [
        "## Soak (`make soak`)",
        "",
        f"`deploy/samples/smollm2.yaml` as `stratus up` runs it, {args.minutes:g} minutes at {args.rate:g} "
        f"requests/s offered from {args.users} concurrent users, 32 new tokens each, sampled (temperature 0.7) so the "
        f"router's output cache answers none of them. Machine: {platform.machine()}, "
        f"2 shared cores, Python {platform.python_version()}; {date.today().isoformat()}; ran {seconds / 60:.1f} min.",
        "",
        "| requests | OK | errors | error codes | p50 latency | p95 latency |",
        "|---|---|---|---|---|---|",
        f"| {total} | {codes['OK']} | {errors} | {', '.join(f'{k} {v}' for k, v in codes.items() if k != 'OK') or '–'} "
        f"| {q[49] * 1e3:.0f} ms | {q[94] * 1e3:.0f} ms |",
        "",
        "| process | RSS at start | at 25% | at 50% | at 75% | at end | peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, samples in memory.items():
        # The quartiles tell growth that levels off (caches filling) from growth that does not (a leak).
        marks = [samples[min(len(samples) - 1, round(q * (len(samples) - 1)))] for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
        cells = " | ".join(f"{m:.0f} MiB" for m in marks)
        lines.append(f"| {name} | {cells} | {max(samples):.0f} MiB |")
    return "\n".join(lines)




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "deploy" / "samples" / "smollm2.yaml")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second offered")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    from stratus_operator.local import LocalRunner, load_manifest

    runner = LocalRunner(load_manifest(args.manifest))
    started = time.perf_counter()
    with runner.running():
        pids = {child.name: child.process.pid for child in runner.children}
        print(f"soaking {runner.router.address} for {args.minutes:g} min at {args.rate:g} req/s", flush=True)
        result = asyncio.run(drive(runner.router.address, args.minutes, args.rate, args.users, pids))
    body = render(result, args, time.perf_counter() - started)
    print(body)
    report.write_section(args.write, SECTION, body, "# Reliability")
    print(f"wrote {args.write}")
    codes: Counter[str] = result["codes"]  # type: ignore[assignment]
    return 0 if sum(codes.values()) == codes["OK"] else 1


if __name__ == "__main__":
    sys.exit(main())
