"""`make bench-coop`: cloud-only, edge-only, cascade and speculative on the bundled model, at 0/20/80 ms RTT.

Everything runs in this one process on loopback: the cloud server (the bundled SmolLM2 in fp32), the
edge server (a compressed variant built by the sample's compression job, cached between runs) and
one router per policy and link delay. The cascade threshold is calibrated first on a prompt set
disjoint from the one measured. Requests go one at a time, so latency is a single user's; the
output cache is off so every answer is computed.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import report  # tests/bench/report.py (scripts run from this folder)
import torch

ROOT = Path(__file__).resolve().parents[2]
SECTION = "bench-coop"
POLICIES = ("cloud-only", "edge-only", "cascade", "speculative")


@dataclass
class Run:
    policy: str
    delay_ms: float
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    edge_answers: int = 0
    cloud_tokens: int = 0
    quality: list[float] = field(default_factory=list)
    similarity: list[float] = field(default_factory=list)
    mean_logprobs: list[float] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]


async def measure(routers: dict[str, str], delay: float, prompts: list[str], max_new_tokens: int) -> list[Run]:
    """Every prompt through every policy in turn, so that load from elsewhere falls on all policies alike."""
    from stratus_workers.api import inference_pb2 as pb
    from stratus_workers.client import AsyncClient
    from stratus_workers.router.calibration import answer_quality, likelihood_quality
    from stratus_workers.router.policy import mean_logprob

    runs = {policy: Run(policy, delay) for policy in routers}
    clients = {policy: AsyncClient(address, timeout=900) for policy, address in routers.items()}
    try:
        for client in clients.values():
            await client.generate(messages=[{"role": "user", "content": "warm up"}], max_new_tokens=4)
        for prompt in prompts:
            for policy, client in clients.items():
                run = runs[policy]
                t0 = time.perf_counter()
                reply = await client.generate(
                    messages=[{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, logprobs=True
                )
                elapsed = time.perf_counter() - t0
                run.latencies.append(elapsed)
                run.seconds += elapsed
                run.tokens += reply.usage.completion_tokens
                run.texts.append(reply.text)
                run.token_ids.append([lp.token_id for lp in reply.logprobs])
                run.mean_logprobs.append(mean_logprob([lp.logprob for lp in reply.logprobs]))
                route = reply.route
                if route.tier == pb.TIER_EDGE:
                    run.edge_answers += 1
                if policy == "speculative":
                    run.drafted += route.draft_tokens
                    run.accepted += route.accepted_tokens
                    run.rounds += route.rounds
                    run.cloud_tokens += route.draft_tokens + route.rounds
                elif route.tier == pb.TIER_CLOUD:
                    run.cloud_tokens += reply.usage.completion_tokens
        # Judged after the clock stops: the cloud scores every answer against its own (see docs/cooperation.md).
        reference = runs["cloud-only"]
        judge = clients["cloud-only"]
        for run in runs.values():
            for i, prompt in enumerate(prompts):
                if run.token_ids[i] == reference.token_ids[i]:
                    run.quality.append(1.0)
                    run.similarity.append(1.0)
                    continue
                judged = await judge.score(run.texts[i], messages=[{"role": "user", "content": prompt}], tier="cloud")
                run.quality.append(likelihood_quality(judged.mean_logprob, reference.mean_logprobs[i]))
                run.similarity.append(answer_quality(run.texts[i], reference.texts[i]))
    finally:
        for client in clients.values():
            await client.close()
    return list(runs.values())


async def bench(args: argparse.Namespace) -> tuple[list[Run], dict[str, Any]]:
    from stratus_operator.cli.calibrate import collect_samples
    from stratus_operator.local import LocalRunner, load_manifest
    from stratus_workers.client.prompts import CALIBRATION_PROMPTS, SAMPLE_PROMPTS
    from stratus_workers.router.calibration import choose_threshold
    from stratus_workers.router.config import RouterConfig
    from stratus_workers.router.server import RouterServer
    from stratus_workers.serve.server import ModelServer, ServerSettings

    deployment = load_manifest(args.manifest)
    runner = LocalRunner(deployment)
    runner.compress()
    variant = next((o for o in runner.outcomes if o.result.accepted), None)
    if variant is None:
        raise SystemExit(f"no accepted edge variant in {args.manifest}: {[o.result for o in runner.outcomes]}")
    source = deployment.spec.model.source

    def server(model: str, name: str, tier: str) -> ModelServer:
        # Both tiers on this CPU in fp32 arithmetic; the edge's compression is in its artifact.
        config = ServerSettings(
            model=model,
            name=name,
            tier=tier,
            port=0,
            http_port=0,
            dtype="float32",
            device="cpu",
            max_batch_size=4,
            log_format="text",
            log_level="warning",
        )
        return ModelServer(config)

    cloud = server(source, "cloud", "cloud")
    edge = server(str(variant.artifact), f"edge-{variant.variant}", "edge")
    await cloud.start()
    await edge.start()
    backends = [
        {"name": "edge", "address": edge.address, "tier": "edge"},
        {"name": "cloud", "address": cloud.address, "tier": "cloud"},
    ]

    def config(policy: str, delay: float, threshold: float) -> RouterConfig:
        return RouterConfig.model_validate(
            {
                "routing": {
                    "policy": policy,
                    "cascade": {"confidenceThreshold": threshold, "maxEdgePromptTokens": 2048},
                    "speculative": deployment.spec.routing.speculative.model_dump(by_alias=True),
                    "link": {"delayMs": delay, "jitterMs": delay * 0.1},
                    "cache": {"enabled": False},
                },
                "backends": backends,
                "tokenizer": source,
                "healthIntervalSeconds": 5,
            }
        )

    meta: dict[str, Any] = {"variant": variant.variant, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens}
    try:
        calibration_router = RouterServer(config("cascade", 0.0, -1.0))
        await calibration_router.start()
        try:
            samples = await collect_samples(calibration_router.address, list(CALIBRATION_PROMPTS), args.max_new_tokens)
        finally:
            await calibration_router.stop(0.5)
        calibration = choose_threshold(samples, args.retention)
        meta["threshold"] = calibration.threshold
        print(
            f"cascade threshold {calibration.threshold:.3f}: {calibration.edge_share:.0%} at the edge, "
            f"retention {calibration.retention:.1%} on {len(samples)} calibration prompts",
            flush=True,
        )
        prompts = list(SAMPLE_PROMPTS[: args.prompts])
        runs: list[Run] = []
        for delay in args.delays:
            servers = {policy: RouterServer(config(policy, delay, calibration.threshold)) for policy in POLICIES}
            for server in servers.values():
                await server.start()
            try:
                measured = await measure(
                    {policy: server.address for policy, server in servers.items()},
                    delay,
                    prompts,
                    args.max_new_tokens,
                )
            finally:
                for server in servers.values():
                    await server.stop(0.5)
            runs.extend(measured)
            for run in measured:
                print(
                    f"  {delay:>3.0f} ms  {run.policy:<12} {run.tokens_per_second:6.1f} tok/s  "
                    f"p50 {run.percentile(50) * 1e3:6.0f} ms",
                    flush=True,
                )
        meta["identical"] = all(
            r.token_ids == next(c for c in runs if c.policy == "cloud-only" and c.delay_ms == r.delay_ms).token_ids
            for r in runs
            if r.policy == "speculative"
        )
        return runs, meta
    finally:
        await edge.stop(0.5)
        await cloud.stop(0.5)


def render(runs: list[Run], meta: dict[str, Any], seconds: float) -> str:
    lines = [
        "## Cloud-edge cooperation (`make bench-coop`)",
        "",
        f"Bundled SmolLM2-135M-Instruct on the cloud (fp32) and its `{meta['variant']}` variant on the edge, both on "
        f"this CPU in one process; {meta['prompts']} chat prompts one at a time, up to {meta['max_new_tokens']} new "
        "tokens, greedy, output cache off; the policies take turns prompt by prompt, so that load from elsewhere "
        "on this shared machine falls on all of them alike. The link delay is added to every router→cloud round "
        "trip (±10% jitter). "
        f"Cascade threshold {meta['threshold']:.3f}, calibrated for ≥97% retention on 16 other prompts. "
        "Quality retention: the cloud's per-token likelihood of each answer relative to its own answer to the same "
        "prompt, capped at 1 (identical answers 1.0; the calibration's measure); text similarity to the cloud's "
        "answer is the stricter alternative beside it. "
        "Cloud tokens per answer: tokens the cloud computed (for speculative: drafts verified plus its own token "
        f"per round). Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, 2 shared cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}; {date.today().isoformat()}; "
        f"{seconds / 60:.1f} min.",
        "",
        "| link RTT | policy | tokens/s | p50 latency | p95 latency | cloud tokens/answer | served at edge | "
        "quality retention | text similarity | speed-up vs cloud-only | acceptance | mean accepted/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        base = next(r for r in runs if r.policy == "cloud-only" and r.delay_ms == run.delay_ms)
        n = len(run.latencies)
        acceptance = f"{run.accepted / run.drafted:.0%}" if run.drafted else "–"
        per_round = f"{(run.accepted + run.rounds) / run.rounds:.2f}" if run.rounds else "–"
        lines.append(
            f"| {run.delay_ms:.0f} ms | {run.policy} | {run.tokens_per_second:.1f} | {run.percentile(50) * 1e3:.0f} ms "
            f"| {run.percentile(95) * 1e3:.0f} ms | {run.cloud_tokens / n:.1f} | {run.edge_answers / n:.0%} "
            f"| {statistics.mean(run.quality):.1%} | {statistics.mean(run.similarity):.1%} "
            f"| {run.tokens_per_second / base.tokens_per_second:.1f}× "
            f"| {acceptance} | {per_round} |"
        )
    spec = [r for r in runs if r.policy == "speculative"]
    cascade = [r for r in runs if r.policy == "cascade"]
    best_spec = max(
        r.tokens_per_second
        / next(b for b in runs if b.policy == "cloud-only" and b.delay_ms == r.delay_ms).tokens_per_second
        for r in spec
    )
    lines += [
        "",
        "Goals: speculative ≥ 2× tokens/s vs cloud-only with identical greedy tokens — "
        f"best here {best_spec:.1f}×, tokens identical: {'yes' if meta['identical'] else 'NO'}. "
        "Cascade ≥ 60% of requests at the edge with ≥ 97% quality retention — here "
        + ", ".join(
            f"{r.edge_answers / len(r.latencies):.0%} at {statistics.mean(r.quality):.1%} ({r.delay_ms:.0f} ms)"
            for r in cascade
        )
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "deploy" / "samples" / "smollm2-speculative.yaml")
    parser.add_argument("--delays", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 20.0, 80.0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--retention", type=float, default=0.97)
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    from stratus_workers.observability import setup_logging

    setup_logging("warning", "text")
    started = time.perf_counter()
    runs, meta = asyncio.run(bench(args))
    body = render(runs, meta, time.perf_counter() - started)
    print(body)
    report.write_section(args.write, SECTION, body, "# Benchmarks")
    print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
