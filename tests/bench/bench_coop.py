"""`make bench-coop`: the routing policies in the shape of a deployment, at 0/20/80 ms link RTT.

The cloud (the bundled SmolLM2 in fp32) and the edge (the sample's int8 variant, built by its compression
job and cached between runs) are separate server processes, each pinned to its own core with `taskset`
and one torch thread, as two machines would be. This process runs one router per policy and link delay
(the delay is added to every router→cloud round trip; the router sits on the edge side of the link) and
the client, which asks one request at a time, the policies taking turns prompt by prompt so that load from
elsewhere on a shared machine falls on all of them alike. Output cache off: every answer is computed.

What each request cost is read from the servers around it: cloud and edge forward passes (the servers'
`stratus_server_forward_passes`) and the cloud process's CPU time (utime + stime of its /proc entry).
The cascade threshold is calibrated first on CALIBRATION_PROMPTS, disjoint from the prompts measured: the edge
answers them once, and each rule the policies run gets the threshold calibrated on those answers as the rule
judges them (the mean rule's, and the opt-in running-mean rule's own: it judges a different statistic).
The cascade's decisions are checked against the pre-early-exit rule (`judge_edge_answer` over the edge's
whole answer, recorded by the edge-only policy on the same prompt), and the edge tokens an escalated
request cost are compared with that whole answer's, which is what the edge spent before early exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import report  # tests/bench/report.py (scripts run from this folder)

from stratus_workers.ports import free_port

if TYPE_CHECKING:
    from stratus_workers.router.config import CascadeSettings

ROOT = Path(__file__).resolve().parents[2]
SECTION = "bench-coop"
PROBE_TOKENS = 8
RUNNING = "cascade, running mean"
# label -> (routing policy, the cascade's rule settings besides its threshold, speculative.draftAhead)
POLICIES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "cloud-only": ("cloud-only", {}, True),
    "edge-only": ("edge-only", {}, True),
    "cascade": ("cascade", {}, True),
    f"cascade, probe {PROBE_TOKENS}": ("cascade", {"probeTokens": PROBE_TOKENS}, True),
    RUNNING: ("cascade", {"runningMean": True}, True),
    "speculative": ("speculative", {}, True),
    "speculative, in turn": ("speculative", {}, False),
}


def rule_args(rule: dict[str, Any]) -> dict[str, Any]:
    """A cascade rule's settings (the manifest's names) as `edge_confidence`'s (and `samples_for`'s) arguments."""
    from stratus_workers.router.config import CascadeSettings

    settings = CascadeSettings.model_validate(rule)
    return dict(
        probe_tokens=settings.probe_tokens, window_tokens=settings.window_tokens, running_mean=settings.running_mean
    )


def statistic(rule: dict[str, Any]) -> dict[str, Any]:
    """The settings of `rule` that choose the statistic its threshold is compared with (each such statistic gets
    a threshold calibrated for it). A probe adds a stop judged by that same threshold: the bench runs `probe 8` at
    the mean's, so that the probe can only move decisions to the cloud, which `goals` checks."""
    return {key: value for key, value in rule.items() if key != "probeTokens"}


def rule_name(rule: dict[str, Any]) -> str:
    """A statistic's name, from its settings: "mean rule", "running-mean rule", "window-tokens 8 rule"."""
    words = sorted(
        re.sub("([A-Z])", r"-\1", key).lower() + ("" if value is True else f" {value}") for key, value in rule.items()
    )
    return f"{', '.join(words) or 'mean'} rule"


MEAN_RULE = rule_name({})
RUNNING_RULE = rule_name(statistic(POLICIES[RUNNING][1]))


def thresholds(meta: dict[str, Any]) -> dict[str, float]:
    """The run's threshold of each rule it calibrated, by the rule's name (runs stored before 2026-11-30 kept the
    mean and running-mean rules' as `threshold` and `running_threshold`)."""
    if "thresholds" in meta:
        return {name: float(value) for name, value in meta["thresholds"].items()}
    stored = (("threshold", MEAN_RULE), ("running_threshold", RUNNING_RULE))
    return {name: float(meta[key]) for key, name in stored if key in meta}


def threshold_for(label: str, meta: dict[str, Any]) -> float:
    """The cascade threshold a policy runs with: the one calibrated for its rule's statistic."""
    return thresholds(meta)[rule_name(statistic(POLICIES[label][1]))]


@dataclass
class Costs:
    cloud_passes: float = 0.0
    cloud_cpu_ms: float = 0.0
    edge_passes: float = 0.0

    def __sub__(self, other: Costs) -> Costs:
        return Costs(
            self.cloud_passes - other.cloud_passes,
            self.cloud_cpu_ms - other.cloud_cpu_ms,
            self.edge_passes - other.edge_passes,
        )


@dataclass
class Answer:
    latency: float
    tokens: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    tier: int
    escalated: bool
    reason: str
    costs: Costs
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    quality: float = 1.0
    similarity: float = 1.0


@dataclass
class Run:
    label: str
    delay_ms: float
    answers: list[Answer] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.answers)

    @property
    def tokens_per_second(self) -> float:
        seconds = sum(a.latency for a in self.answers)
        return self.tokens / seconds if seconds else 0.0

    def percentile(self, q: int) -> float:
        return statistics.quantiles([a.latency for a in self.answers], n=100, method="inclusive")[q - 1]

    def per_token(self, what: str) -> float:
        return float(sum(getattr(a.costs, what) for a in self.answers)) / max(1, self.tokens)


class Tier:
    """One model server process pinned to its own cores."""

    def __init__(self, name: str, tier: str, model: str, cores: str, log: Path) -> None:
        self.name = name
        self.port, self.http_port = free_port(), free_port()
        command = [
            sys.executable, "-m", "stratus_workers.serve", "--model", model, "--name", name, "--tier", tier,
            "--port", str(self.port), "--http-port", str(self.http_port), "--dtype", "float32", "--device", "cpu",
            "--threads", "1", "--max-batch-size", "4", "--log-format", "text", "--log-level", "warning",
        ]  # fmt: skip
        if cores and shutil.which("taskset"):
            command = ["taskset", "-c", cores, *command]
        self.log = log.open("w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.tick = os.sysconf("SC_CLK_TCK")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the {self.name} server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the {self.name} server was not ready within {timeout:.0f} s; see {self.log.name}")

    def passes(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("stratus_server_forward_passes_total "):
                    return float(line.split()[1])
        raise RuntimeError(f"the {self.name} server exports no stratus_server_forward_passes_total")

    def cpu_ms(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1e3 / self.tick  # utime + stime

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def costs(cloud: Tier, edge: Tier) -> Costs:
    return Costs(cloud.passes(), cloud.cpu_ms(), edge.passes())


async def measure(
    routers: dict[str, str], delay: float, prompts: list[str], max_new_tokens: int, cloud: Tier, edge: Tier
) -> list[Run]:
    """Every prompt through every policy in turn, so that load from elsewhere falls on all policies alike."""
    from stratus_workers.api import inference_pb2 as pb
    from stratus_workers.client import AsyncClient
    from stratus_workers.router.calibration import answer_quality, likelihood_quality
    from stratus_workers.router.policy import mean_logprob

    runs = {label: Run(label, delay) for label in routers}
    clients = {label: AsyncClient(address, timeout=900) for label, address in routers.items()}
    try:
        for client in clients.values():
            await client.generate(messages=[{"role": "user", "content": "warm up"}], max_new_tokens=4)
        for prompt in prompts:
            for label, client in clients.items():
                before = costs(cloud, edge)
                t0 = time.perf_counter()
                reply = await client.generate(
                    messages=[{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, logprobs=True
                )
                elapsed = time.perf_counter() - t0
                route = reply.route
                runs[label].answers.append(
                    Answer(
                        latency=elapsed,
                        tokens=reply.usage.completion_tokens,
                        token_ids=[lp.token_id for lp in reply.logprobs],
                        logprobs=[lp.logprob for lp in reply.logprobs],
                        text=reply.text,
                        tier=route.tier,
                        escalated=route.escalated,
                        reason=route.reason,
                        costs=costs(cloud, edge) - before,
                        drafted=route.draft_tokens,
                        accepted=route.accepted_tokens,
                        rounds=route.rounds,
                    )
                )
        # Judged after the clock stops: the cloud scores every answer against its own (see docs/cooperation.md).
        reference = runs["cloud-only"]
        judge = clients["cloud-only"]
        for run in runs.values():
            for i, prompt in enumerate(prompts):
                mine, theirs = run.answers[i], reference.answers[i]
                if mine.token_ids == theirs.token_ids:
                    continue
                judged = await judge.score(mine.text, messages=[{"role": "user", "content": prompt}], tier="cloud")
                mine.quality = likelihood_quality(judged.mean_logprob, mean_logprob(theirs.logprobs))
                mine.similarity = answer_quality(mine.text, theirs.text)
    finally:
        for client in clients.values():
            await client.close()
    # The edge-only answers stand for the edge's whole answers (cascade_check): they must be the edge's.
    if "edge-only" in runs and not all(a.tier == pb.TIER_EDGE for a in runs["edge-only"].answers):
        raise SystemExit("edge-only answered from the cloud: the edge server failed; see its log")
    return list(runs.values())


async def bench(args: argparse.Namespace) -> tuple[list[Run], dict[str, Any]]:
    from stratus_operator.cli.calibrate import collect_answers, samples_for
    from stratus_operator.local import LocalRunner, load_manifest
    from stratus_workers.client.prompts import CALIBRATION_PROMPTS, EVALUATION_PROMPTS
    from stratus_workers.router.calibration import choose_threshold
    from stratus_workers.router.config import RouterConfig
    from stratus_workers.router.server import RouterServer

    deployment = load_manifest(args.manifest)
    runner = LocalRunner(deployment)
    if args.edge_artifact:  # an artifact the compression Job built and accepted before (e.g. bench-edge's)
        manifest = json.loads((args.edge_artifact / "manifest.json").read_text())
        if manifest.get("status") != "accepted":
            raise SystemExit(f"{args.edge_artifact} is not an accepted artifact: {manifest.get('reasons')}")
        variant_name, artifact = str(manifest["name"]), args.edge_artifact
    else:
        runner.compress()
        accepted = [o for o in runner.outcomes if o.result.accepted]
        variant = next((o for o in accepted if args.edge_variant in ("", o.variant)), None)
        if variant is None:
            raise SystemExit(
                f"no accepted edge variant {args.edge_variant!r} in {args.manifest}: "
                f"{[(o.variant, o.result.accepted) for o in runner.outcomes]}"
            )
        variant_name, artifact = variant.variant, variant.artifact
    source = deployment.spec.model.source
    logs = runner.work_dir / "bench-coop"
    logs.mkdir(parents=True, exist_ok=True)
    cloud = Tier("cloud", "cloud", source, args.cloud_cores, logs / "cloud.log")
    edge = Tier(f"edge-{variant_name}", "edge", str(artifact), args.edge_cores, logs / "edge.log")
    meta: dict[str, Any] = {
        "variant": variant_name,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "cores": (args.cloud_cores, args.edge_cores),
        "load_start": os.getloadavg(),
        # The machine and day of the run, so a later --render-from does not credit them to the renderer's.
        "machine": {"cpu": report.cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "date": date.today().isoformat()},
    }
    try:
        await asyncio.get_running_loop().run_in_executor(None, cloud.wait_ready)
        await asyncio.get_running_loop().run_in_executor(None, edge.wait_ready)
        backends = [
            {"name": edge.name, "address": edge.address, "tier": "edge"},
            {"name": "cloud", "address": cloud.address, "tier": "cloud"},
        ]

        def config(policy: str, rule: dict[str, Any], ahead: bool, delay: float, threshold: float) -> RouterConfig:
            return RouterConfig.model_validate(
                {
                    "routing": {
                        "policy": policy,
                        "cascade": {
                            "confidenceThreshold": threshold,
                            "maxEdgePromptTokens": 2048,
                            "edgeTimeoutSeconds": 600,
                            **rule,
                        },
                        "speculative": {
                            **deployment.spec.routing.speculative.model_dump(by_alias=True),
                            "draftAhead": ahead,
                        },
                        "link": {"delayMs": delay, "jitterMs": delay * 0.1},
                        "cache": {"enabled": False},
                    },
                    "backends": backends,
                    "tokenizer": source,
                    # Rarely: a server on one busy core may miss a 1 s health check mid-answer, and then the
                    # router (rightly) stops using it; its own calls still have stallTimeoutSeconds.
                    "healthIntervalSeconds": 600,
                    "stallTimeoutSeconds": 120,
                }
            )

        # The threshold of each rule the cascade policies run (by the statistic it judges; the mean rule's always:
        # every other rule's decisions are compared with it), unless given on the command line.
        rules: dict[str, dict[str, Any]] = {MEAN_RULE: {}}
        for label, (policy, rule, _) in POLICIES.items():
            if label in args.policies and policy == "cascade":
                rules[rule_name(statistic(rule))] = statistic(rule)
        given = {MEAN_RULE: args.threshold, RUNNING_RULE: args.running_threshold}
        chosen = {name: given[name] for name in rules if given.get(name) is not None}
        if len(chosen) < len(rules):
            # One pass over the calibration prompts; each rule judges the same answers (`stratus calibrate`'s way).
            calibration_router = RouterServer(config("cascade", {}, True, 0.0, -1.0))
            await calibration_router.start()
            try:
                answers = await collect_answers(
                    calibration_router.address, list(CALIBRATION_PROMPTS), args.max_new_tokens
                )
            finally:
                await calibration_router.stop(0.5)
        for name, rule in rules.items():
            if name in chosen:
                continue
            samples = samples_for(answers, **rule_args(rule))
            calibration = choose_threshold(samples, args.retention)
            meta.setdefault("calibration", {})[name] = (
                f"calibrated for ≥{args.retention:.0%} retention on {len(samples)} other prompts "
                f"({calibration.edge_share:.0%} of them at the edge there)"
            )
            print(
                f"cascade threshold ({name}) {calibration.threshold:.3f}: {calibration.edge_share:.0%} at the edge, "
                f"retention {calibration.retention:.1%} on {len(samples)} calibration prompts",
                flush=True,
            )
            chosen[name] = calibration.threshold
        meta["thresholds"] = {name: chosen[name] for name in rules}
        prompts = list(EVALUATION_PROMPTS[: args.prompts])
        runs: list[Run] = []
        for delay in args.delays:
            servers = {
                label: RouterServer(config(policy, rule, ahead, delay, threshold_for(label, meta)))
                for label, (policy, rule, ahead) in POLICIES.items()
                if label in args.policies
            }
            for server in servers.values():
                await server.start()
            try:
                measured = await measure(
                    {label: server.address for label, server in servers.items()},
                    delay,
                    prompts,
                    args.max_new_tokens,
                    cloud,
                    edge,
                )
            finally:
                for server in servers.values():
                    await server.stop(0.5)
            runs.extend(measured)
            for run in measured:
                print(
                    f"  {delay:>3.0f} ms  {run.label:<18} {run.tokens_per_second:6.1f} tok/s  "
                    f"p50 {run.percentile(50) * 1e3:6.0f} ms  cloud passes/token {run.per_token('cloud_passes'):.2f}  "
                    f"cloud CPU-ms/token {run.per_token('cloud_cpu_ms'):.1f}",
                    flush=True,
                )
        meta["load_end"] = os.getloadavg()
        return runs, meta
    finally:
        edge.stop()
        cloud.stop()


def cascade_check(runs: list[Run], meta: dict[str, Any], label: str) -> dict[str, Any]:
    """The cascade runs of `label` against their own rule and today's (the mean rule) on the edge's whole answers.

    The rule over the whole edge answer (the edge-only policy's, same prompt, same greedy model) is what the
    router decides without early exit; its edge cost is that whole answer's forward passes. `today` is what
    an escalated request cost the edge before early exit: the whole answers the mean rule escalated.
    """
    from stratus_workers.api import inference_pb2 as pb
    from stratus_workers.router.config import CascadeSettings
    from stratus_workers.router.policy import judge_edge_answer

    rule = CascadeSettings.model_validate({"confidenceThreshold": threshold_for(label, meta), **POLICIES[label][1]})
    plain = CascadeSettings(confidence_threshold=thresholds(meta)[MEAN_RULE])
    same = changed = 0
    spent: list[float] = []
    whole: list[float] = []
    today: list[float] = []
    for run in (r for r in runs if r.label == label):
        full = next(r for r in runs if r.label == "edge-only" and r.delay_ms == run.delay_ms)
        for mine, edge_answer in zip(run.answers, full.answers, strict=True):
            expected = judge_edge_answer(edge_answer.logprobs, rule)
            before = judge_edge_answer(edge_answer.logprobs, plain)
            escalated = mine.tier == pb.TIER_CLOUD
            same += escalated == expected.escalate
            changed += escalated != before.escalate
            if escalated:
                spent.append(mine.costs.edge_passes)
                whole.append(edge_answer.costs.edge_passes)
            if before.escalate:
                today.append(edge_answer.costs.edge_passes)
    answers = sum(len(r.answers) for r in runs if r.label == label)
    return {
        "answers": answers,
        "as_rule": same,
        "changed_vs_today": changed,
        "escalated": len(spent),
        "spent": statistics.mean(spent) if spent else 0.0,
        "whole": statistics.mean(whole) if whole else 0.0,
        "today": statistics.mean(today) if today else 0.0,
    }


def render(runs: list[Run], meta: dict[str, Any], seconds: float) -> str:
    from stratus_workers.api import inference_pb2 as pb

    load_start = ", ".join(f"{x:.1f}" for x in meta["load_start"])
    load_end = ", ".join(f"{x:.1f}" for x in meta["load_end"])
    cloud_cores, edge_cores = meta["cores"]
    machine = meta["machine"]
    calibration = meta.get("calibration") or {}
    calibrated = thresholds(meta)
    running = ""
    if RUNNING_RULE in calibrated:
        running = (
            f"; `running mean` is the cascade with `runningMean: true` (opt-in), threshold "
            f"{calibrated[RUNNING_RULE]:.3f}, {calibration.get(RUNNING_RULE, 'given on the command line')}"
        )
    lines = [
        "## Cloud-edge cooperation (`make bench-coop`)",
        "",
        f"Bundled SmolLM2-135M-Instruct on the cloud (fp32) and its `{meta['variant']}` variant on the edge, as two "
        f"server processes pinned to their own cores (cloud: core {cloud_cores}, edge: core {edge_cores}; one torch "
        "thread each); the routers and the client in a third, unpinned process. "
        f"{meta['prompts']} held-out chat prompts one at a time, up to {meta['max_new_tokens']} new tokens, greedy, "
        "output cache off; the policies take turns prompt by prompt, so that load from elsewhere on this shared "
        "machine falls on all of them alike. The link delay is added to every router→cloud round trip (±10% "
        f"jitter). Cascade threshold {calibrated[MEAN_RULE]:.3f}, "
        f"{calibration.get(MEAN_RULE, 'given on the command line')}; "
        f"`probe {PROBE_TOKENS}` is the same cascade with `probeTokens: {PROBE_TOKENS}` (opt-in; see "
        f"docs/cooperation.md){running}. Quality retention: the cloud's per-token likelihood of each answer "
        "relative to its own answer, capped at 1 (identical answers 1.0); text similarity to the cloud's answer "
        "beside it. Cloud passes and CPU-ms per token: the cloud server's forward passes and its process's CPU "
        "time (user + system) during each request, over the tokens answered. "
        f"Machine: {machine['cpu']}, {machine['cores']} cores shared with other work (load average "
        f"{load_start} at the start, {load_end} at the end; 1, 5, 15 min); Python {machine['python']}; "
        f"{machine['date']}; {seconds / 60:.1f} min.",
        "",
        "| link RTT | policy | tokens/s | vs cloud-only | p50 latency | p95 latency | cloud passes/token | "
        "cloud CPU-ms/token | edge passes/token | served at edge | quality retention | text similarity | "
        "acceptance | tokens/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        base = next(r for r in runs if r.label == "cloud-only" and r.delay_ms == run.delay_ms)
        drafted = sum(a.drafted for a in run.answers)
        accepted = sum(a.accepted for a in run.answers)
        rounds = sum(a.rounds for a in run.answers)
        at_edge = sum(a.tier == pb.TIER_EDGE for a in run.answers) / len(run.answers)
        lines.append(
            f"| {run.delay_ms:.0f} ms | {run.label} | {run.tokens_per_second:.1f} "
            f"| {run.tokens_per_second / base.tokens_per_second:.2f}× "
            f"| {run.percentile(50) * 1e3:.0f} ms | {run.percentile(95) * 1e3:.0f} ms "
            f"| {run.per_token('cloud_passes'):.2f} | {run.per_token('cloud_cpu_ms'):.1f} "
            f"| {run.per_token('edge_passes'):.2f} | {at_edge:.0%} "
            f"| {statistics.mean(a.quality for a in run.answers):.1%} "
            f"| {statistics.mean(a.similarity for a in run.answers):.1%} "
            f"| {f'{accepted / drafted:.0%}' if drafted else '–'} "
            f"| {f'{(accepted + rounds) / rounds:.2f}' if rounds else '–'} |"
        )
    lines += ["", *goals(runs, meta)]
    return "\n".join(lines)


def streamed(rule: CascadeSettings, answers: list[list[float]], max_tokens: int) -> list[tuple[bool, int]]:
    """Each recorded whole edge answer (its log-probabilities) streamed token by token through the router's
    EdgeWatch under `rule`, as the cascade sees it arrive: whether the cascade escalates it, and how many of its
    tokens the edge had spent when the watch decided."""
    from stratus_workers.router.policy import EdgeWatch

    decisions = []
    for logprobs in answers:
        watch = EdgeWatch(rule, max_tokens)
        for logprob in logprobs:
            if watch.add([logprob]):
                break
        decisions.append((watch.verdict().escalate, len(watch.logprobs)))
    return decisions


def early_exit(answers: list[list[float]], max_tokens: int, threshold: float, probe: int) -> dict[str, float]:
    """A cascade with `threshold` and `probe` over the recorded edge answers: decisions unlike the mean rule's
    over the whole answer, and edge tokens spent on the escalated ones (with early exit, and whole)."""
    from stratus_workers.router.config import CascadeSettings
    from stratus_workers.router.policy import judge_edge_answer

    today = CascadeSettings(confidence_threshold=threshold)
    decisions = streamed(CascadeSettings(confidence_threshold=threshold, probe_tokens=probe), answers, max_tokens)
    pairs = list(zip(decisions, answers, strict=True))
    escalated = [(spent, len(lp)) for (up, spent), lp in pairs if up]
    return {
        "escalated": len(escalated),
        "changed": sum(up != judge_edge_answer(lp, today).escalate for (up, _), lp in pairs),
        "spent": sum(spent for spent, _ in escalated),
        "whole": sum(whole for _, whole in escalated),
    }


def early_exit_table(answers: list[list[float]], max_tokens: int, thresholds: list[float]) -> list[str]:
    lines = [
        "| threshold | escalated | edge tokens per escalated request, whole answer (before) | exact stop "
        f"| exact stop vs before | probe {PROBE_TOKENS}: decisions changed | probe {PROBE_TOKENS}: edge tokens "
        f"per escalated request | probe {PROBE_TOKENS} vs the same requests' whole answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for threshold in thresholds:
        exact = early_exit(answers, max_tokens, threshold, 0)
        probed = early_exit(answers, max_tokens, threshold, PROBE_TOKENS)
        if not exact["escalated"]:
            continue
        before = exact["whole"] / exact["escalated"]
        mean_exact = exact["spent"] / exact["escalated"]
        mean_probe = probed["spent"] / probed["escalated"]
        lines.append(
            f"| {threshold:.3f} | {exact['escalated']} of {len(answers)} | {before:.1f} | {mean_exact:.1f} "
            f"| {mean_exact / before:.0%} | {probed['changed']} (to the cloud) | {mean_probe:.1f} "
            f"| {probed['spent'] / probed['whole']:.0%} |"
        )
    return lines


def rules_table(answers: list[tuple[list[float], float]], max_tokens: int, threshold: float) -> list[str]:
    """The cascade's rules side by side on recorded whole edge answers (log-probabilities, quality): the mean rule
    at `threshold`, each other rule at the threshold that serves as many answers at the edge (or the fewest more),
    so that their quality retention compares at the same edge share. Edge tokens spent on escalated answers as
    the router's EdgeWatch stops them; "before" is what the mean rule's escalated answers cost without early exit."""
    from stratus_workers.router.config import CascadeSettings
    from stratus_workers.router.policy import judge_edge_answer

    def outcome(rule: CascadeSettings) -> tuple[list[bool], list[int]]:
        decisions = streamed(rule, [lp for lp, _ in answers], max_tokens)
        # What early exit must keep: the decision the rule takes over the whole answer.
        if any(up != judge_edge_answer(lp, rule).escalate for (up, _), (lp, _) in zip(decisions, answers, strict=True)):
            raise AssertionError("stopping the edge early changed the cascade's decision on an answer")
        return [up for up, _ in decisions], [spent for _, spent in decisions]

    mean_rule = CascadeSettings(confidence_threshold=threshold)
    base, _ = outcome(mean_rule)
    kept = base.count(False)
    before = [len(lp) for (lp, _), up in zip(answers, base, strict=True) if up]
    today = statistics.mean(before) if before else 0.0
    lines = [
        f"Mean rule at {threshold:.3f}: {kept} of {len(answers)} answers at the edge; its escalated answers cost the "
        f"edge {today:.1f} tokens each without early exit.",
        "",
        "| rule | threshold | at the edge | quality retention | decisions unlike the mean rule's | escalated "
        "| edge tokens per escalated request | vs the mean rule's before early exit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rules: list[tuple[str, dict[str, Any]]] = [
        ("mean (exact stop)", {}),
        (f"mean, probe {PROBE_TOKENS}", {"probeTokens": PROBE_TOKENS}),
        ("running mean", {"runningMean": True}),
        *((f"window {w}", {"windowTokens": w}) for w in (4, 8, 16)),
    ]
    for name, extra in rules:
        if extra:
            confidences = confidences_all(answers, extra)
            # The highest threshold that still keeps at least as many answers at the edge as the mean rule.
            at_least = [t for t in set(confidences) if sum(c >= t for c in confidences) >= kept]
            rule_threshold = max(at_least) if at_least else min(confidences)
        else:
            rule_threshold = threshold
        rule = CascadeSettings.model_validate({"confidenceThreshold": min(0.0, rule_threshold), **extra})
        escalate, spent = outcome(rule)
        retention = statistics.mean(1.0 if up else q for (_, q), up in zip(answers, escalate, strict=True))
        costs = [n for n, up in zip(spent, escalate, strict=True) if up]
        per = statistics.mean(costs) if costs else 0.0
        lines.append(
            f"| {name} | {rule.confidence_threshold:.3f} | {escalate.count(False)} of {len(answers)} "
            f"| {retention:.1%} | {sum(a != b for a, b in zip(escalate, base, strict=True))} | {len(costs)} "
            f"| {per:.1f} | {per / today if today else 0:.0%} |"
        )
    return lines


def confidences_all(answers: list[tuple[list[float], float]], extra: dict[str, Any]) -> list[float]:
    from stratus_workers.router.policy import edge_confidence

    return [edge_confidence(lp, **rule_args(extra)) for lp, _ in answers]


def goals(runs: list[Run], meta: dict[str, Any]) -> list[str]:
    from stratus_workers.api import inference_pb2 as pb

    labels = {r.label for r in runs}

    def run(label: str, delay: float) -> Run:
        return next(r for r in runs if r.label == label and r.delay_ms == delay)

    delays = sorted({r.delay_ms for r in runs})
    at = 20.0 if 20.0 in delays else delays[0]
    lines = []
    if {"speculative", "cloud-only"} <= labels:
        spec, base = run("speculative", at), run("cloud-only", at)
        identical = all(
            run(label, d).answers[i].token_ids == run("cloud-only", d).answers[i].token_ids
            for label in labels
            if label.startswith("speculative")
            for d in delays
            for i in range(len(base.answers))
        )
        passes = spec.per_token("cloud_passes") / base.per_token("cloud_passes")
        cpu = spec.per_token("cloud_cpu_ms") / base.per_token("cloud_cpu_ms")
        lines += [
            f"Speculative at {at:.0f} ms: {spec.tokens_per_second / base.tokens_per_second:.2f}× cloud-only "
            f"tokens/s (goal ≥ 1.3×); greedy tokens identical to cloud-only on every prompt and RTT: "
            f"{'yes' if identical else 'NO'}; cloud compute per token {passes:.2f}× cloud-only's forward passes "
            f"and {cpu:.2f}× its CPU time (goal ≤ 0.35×).",
            "",
        ]
    probe_label = f"cascade, probe {PROBE_TOKENS}"
    if {"cascade", probe_label, "edge-only"} <= labels:
        exact = cascade_check(runs, meta, "cascade")
        probed = cascade_check(runs, meta, probe_label)
        lines.append(
            f"Cascade, early exit by the exact rule: {exact['as_rule']} of {exact['answers']} decisions as the rule "
            f"over the edge's whole answer decides, {exact['changed_vs_today']} changed; an escalated request cost "
            f"the edge {exact['spent']:.1f} forward passes against {exact['whole']:.1f} for the whole answer "
            f"({exact['spent'] / exact['whole'] if exact['whole'] else 0:.0%}; {exact['escalated']} escalated). "
            f"With `probeTokens: {PROBE_TOKENS}`: {probed['changed_vs_today']} of {probed['answers']} decisions "
            f"moved to the cloud, {probed['as_rule']} as its own rule decides; an escalated request cost "
            f"{probed['spent']:.1f} edge passes against {probed['whole']:.1f} "
            f"({probed['spent'] / probed['whole'] if probed['whole'] else 0:.0%}; {probed['escalated']} "
            "escalated). Goal: ≤ 25% with the same decisions."
        )
    if {"cascade", RUNNING, "edge-only"} <= labels:
        ran = cascade_check(runs, meta, RUNNING)
        mean_rule = next(r for r in runs if r.label == "cascade" and r.delay_ms == at)
        mine = next(r for r in runs if r.label == RUNNING and r.delay_ms == at)
        kept = [sum(a.tier == pb.TIER_EDGE for a in r.answers) / len(r.answers) for r in (mine, mean_rule)]
        retention = [statistics.mean(a.quality for a in r.answers) for r in (mine, mean_rule)]
        if ran["escalated"]:
            cost = (
                f"an escalated request cost the edge {ran['spent']:.1f} forward passes against {ran['whole']:.1f} for "
                f"its whole answer ({ran['spent'] / ran['whole'] if ran['whole'] else 0:.0%}; {ran['escalated']} "
                f"escalated), and against {ran['today']:.1f} for the whole answers the mean rule escalated before "
                f"early exit ({ran['spent'] / ran['today'] if ran['today'] else 0:.0%}; goal ≤ 25%)"
            )
        else:
            cost = "no request escalated, so there was nothing to stop"
        lines += [
            "",
            f"Cascade, running-mean rule (opt-in, its own threshold): {ran['as_rule']} of {ran['answers']} decisions "
            f"as the rule over the edge's whole answer decides (early exit keeps them); {cost}. Against the mean "
            f"rule: {ran['changed_vs_today']} of {ran['answers']} decisions differ; at {at:.0f} ms it serves "
            f"{kept[0]:.0%} at the edge (mean rule {kept[1]:.0%}) with quality retention {retention[0]:.1%} "
            f"(mean rule {retention[1]:.1%}).",
        ]
    return lines


def runs_from(answers: list[dict[str, Any]]) -> list[Run]:
    """The runs of a --json file, in the order they were measured."""
    runs: dict[tuple[str, float], Run] = {}
    cost_fields = set(Costs.__dataclass_fields__)
    for row in answers:
        key = (row["label"], row["delay_ms"])
        run = runs.setdefault(key, Run(*key))
        fields = {k: v for k, v in row.items() if k not in cost_fields and k not in ("label", "delay_ms")}
        run.answers.append(Answer(**fields, costs=Costs(**{k: row[k] for k in cost_fields})))
    return list(runs.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "deploy" / "samples" / "smollm2-speculative.yaml")
    parser.add_argument("--delays", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 20.0, 80.0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--retention", type=float, default=0.97)
    parser.add_argument("--threshold", type=float, help="cascade threshold to use instead of calibrating one")
    parser.add_argument(
        "--running-threshold", type=float, help="the running-mean rule's threshold, instead of calibrating one"
    )
    parser.add_argument(
        "--threshold-grid",
        type=lambda s: [float(x) for x in s.split(",")],
        help="with --early-exit-from: more thresholds to tabulate",
    )
    parser.add_argument("--edge-artifact", type=Path, help="serve this accepted artifact at the edge (no compression)")
    parser.add_argument(
        "--edge-variant", default="", help="the manifest's edge variant to serve (default: the first accepted)"
    )
    parser.add_argument("--cloud-cores", default="0", help="taskset core list of the cloud server")
    parser.add_argument("--edge-cores", default="1", help="taskset core list of the edge server")
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write every answer's figures here")
    parser.add_argument(
        "--policies",
        type=lambda s: s.split(";"),
        default=list(POLICIES),
        help=f"which to run, separated by ';' (default: all of {'; '.join(POLICIES)})",
    )
    parser.add_argument("--render-from", type=Path, help="render an earlier run's --json instead of running")
    parser.add_argument(
        "--early-exit-from",
        type=Path,
        help="only print the cascade early-exit table over the edge-only answers of an earlier run's --json",
    )
    args = parser.parse_args(argv)
    if args.early_exit_from:
        recorded = json.loads(args.early_exit_from.read_text())
        rows = recorded.get("answers") or [
            {"label": r["label"], "delay_ms": r["delay_ms"], **a} for r in recorded["runs"] for a in r["answers"]
        ]
        first_delay = min(a["delay_ms"] for a in rows if a["label"] == "edge-only")
        edge = [a["logprobs"] for a in rows if a["label"] == "edge-only" and a["delay_ms"] == first_delay]
        limit = int(recorded["meta"]["max_new_tokens"])
        mean_threshold = thresholds(recorded["meta"])[MEAN_RULE]
        print("\n".join(early_exit_table(edge, limit, [mean_threshold, *(args.threshold_grid or [])])))
        judged = [
            (a["logprobs"], a["quality"]) for a in rows if a["label"] == "edge-only" and a["delay_ms"] == first_delay
        ]
        print()
        print("\n".join(rules_table(judged, limit, mean_threshold)))
        return 0
    if args.render_from:
        recorded = json.loads(args.render_from.read_text())
        runs = runs_from(recorded["answers"])
        body = render(runs, recorded["meta"], float(recorded["meta"].get("seconds", 0.0)))
        print(body)
        if args.write.name:
            report.write_section(args.write, SECTION, body, "# Benchmarks")
            print(f"wrote {args.write}")
        return 0
    from stratus_workers.observability import setup_logging

    setup_logging("warning", "text")
    started = time.perf_counter()
    runs, meta = asyncio.run(bench(args))
    meta["seconds"] = time.perf_counter() - started
    body = render(runs, meta, meta["seconds"])
    print(body)
    if args.json:
        answers = [
            {"label": r.label, "delay_ms": r.delay_ms, **{k: v for k, v in a.__dict__.items() if k != "costs"},
             **a.costs.__dict__}
            for r in runs
            for a in r.answers
        ]  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "answers": answers}))
    if args.write.name:
        report.write_section(args.write, SECTION, body, "# Benchmarks")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
