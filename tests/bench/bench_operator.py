"""`make bench-operator`: the operator process with N LLMDeployments against the API emulator.

Measures, per LLMDeployment, the time from its creation to the moment every child the operator
creates during compression exists (PVC, Job spec ConfigMap, Job, cloud Deployment and Service,
router ConfigMap, Deployment and Service), for a burst of N creates and then for single applies
with N already present; the API writes one resync interval of an idle operator costs (server-side apply
puts drift back, so what it sends when nothing drifted matters at this scale); and the operator's memory
(RSS, peak) and reconcile metrics. Writes its section of docs/benchmarks.md between markers, keeping the
other sections.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import report  # tests/bench/report.py (scripts run from this folder)
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "operator"))

from kube_emulator import LLMD, NODES, Emulator  # noqa: E402
from operator_harness import CRD, OperatorProcess, write_kubeconfig  # noqa: E402

START = "<!-- bench-operator:start -->"
END = "<!-- bench-operator:end -->"
CHILDREN = 8  # PVC, ConfigMap (job spec), Job, cloud Deployment + Service, router ConfigMap + Deployment + Service
INSTANCE = "app.kubernetes.io/instance"


class Timed(Emulator):  # type: ignore[misc]  # found through sys.path, unknown to mypy
    """Records when each instance's children are created."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.created_at: dict[str, float] = {}
        self.children_at: dict[str, list[float]] = {}
        # Writes by (verb, plural): what the operator sends, counted over a window.
        self.writes: dict[tuple[str, str], int] = {}

    def count(self, verb: str, key: Any) -> None:
        self.writes[(verb, key[2])] = self.writes.get((verb, key[2]), 0) + 1

    async def patch_obj(self, key: Any, namespace: str | None, name: str, patch: Any, **kwargs: Any) -> dict[str, Any]:
        self.count("patch" if kwargs.get("subresource") != "status" else "patch status", key)
        result: dict[str, Any] = await super().patch_obj(key, namespace, name, patch, **kwargs)
        return result

    async def create_obj(self, key: Any, namespace: str | None, body: Any) -> dict[str, Any]:
        self.count("create", key)
        obj: dict[str, Any] = await super().create_obj(key, namespace, body)
        instance = (obj.get("metadata", {}).get("labels") or {}).get(INSTANCE)
        if instance and key != LLMD and obj["kind"] != "Event":
            self.children_at.setdefault(instance, []).append(time.perf_counter())
        return obj


def rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def wait_all(emu: Timed, names: list[str], timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if all(len(emu.children_at.get(n, [])) >= CHILDREN for n in names):
            return
        await asyncio.sleep(0.05)
    missing = [n for n in names if len(emu.children_at.get(n, [])) < CHILDREN]
    raise TimeoutError(f"{len(missing)} deployments incomplete after {timeout}s, e.g. {missing[:3]}")


def latencies(emu: Timed, names: list[str]) -> list[float]:
    return [sorted(emu.children_at[n])[CHILDREN - 1] - emu.created_at[n] for n in names]


async def scrape(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^(stratus_operator_\w+?)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


async def bench(count: int, singles: int, workdir: Path, resync: float) -> dict[str, Any]:
    sample = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    load_before = os.getloadavg()[0]
    emu = Timed()
    async with emu, kmock.Server(emu):
        emu.register_crd(yaml.safe_load(CRD.read_text()))
        for i in range(4):
            node = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": f"edge-{i}", "labels": {"stratus.dev/edge": "true"}}}
            await emu.create_obj(NODES, None, node)
            await emu.patch_status(NODES, None, f"edge-{i}", {"allocatable": {"cpu": "64", "memory": "256Gi"}})
        kubeconfig = write_kubeconfig(workdir / "kubeconfig", str(emu.url).rstrip("/"))
        op = OperatorProcess(kubeconfig, workdir / "operator.log", env={"STRATUS_RESYNC_SECONDS": str(resync)})
        await op.start()
        assert op.proc is not None
        idle_rss, _ = rss_kib(op.proc.pid)
        try:
            # Burst: N applies as fast as the emulator takes them.
            names = [f"bench-{i:05d}" for i in range(count)]
            started = time.perf_counter()
            for name in names:
                m = copy.deepcopy(sample)
                m["metadata"]["name"] = name
                emu.created_at[name] = time.perf_counter()
                await emu.create_obj(LLMD, "default", m)
            await wait_all(emu, names, timeout=max(600.0, count * 0.5))
            burst_seconds = time.perf_counter() - started
            burst = latencies(emu, names)
            await asyncio.sleep(2.0)  # let status writes settle before measuring single applies
            rss_after_burst, _ = rss_kib(op.proc.pid)

            # Single applies, one at a time, with N deployments in place.
            single_names = [f"single-{i:03d}" for i in range(singles)]
            for name in single_names:
                m = copy.deepcopy(sample)
                m["metadata"]["name"] = name
                emu.created_at[name] = time.perf_counter()
                await emu.create_obj(LLMD, "default", m)
                await wait_all(emu, [name], timeout=60)
            single = latencies(emu, single_names)

            # Idle: nothing changes for one resync interval; every deployment is reconciled once by its timer.
            await asyncio.sleep(2.0)
            before = await scrape(op.metrics_port)
            emu.writes.clear()
            await asyncio.sleep(resync)
            idle_writes = {f"{verb} {plural}": n for (verb, plural), n in sorted(emu.writes.items())
                           if plural != "events"}
            after = await scrape(op.metrics_port)
            ok = 'stratus_operator_reconciles_total{result="ok"}'
            idle_reconciles = after.get(ok, 0.0) - before.get(ok, 0.0)
            rss, peak = rss_kib(op.proc.pid)
            metrics = await scrape(op.metrics_port)
            phases: dict[str, int] = {}
            for (key, _, _), obj in emu.store.items():
                if key == LLMD:
                    phase = (obj.get("status") or {}).get("phase", "-")
                    phases[phase] = phases.get(phase, 0) + 1
        finally:
            await op.stop()
    return {
        "count": count, "singles": singles, "burst_seconds": burst_seconds,
        "burst_p50": statistics.median(burst), "burst_p95": percentile(burst, 0.95), "burst_max": max(burst),
        "single_p50": statistics.median(single), "single_p95": percentile(single, 0.95),
        "idle_rss_mib": idle_rss / 1024, "burst_rss_mib": rss_after_burst / 1024, "rss_mib": rss / 1024,
        "peak_rss_mib": peak / 1024, "objects": len(emu.store), "phases": phases,
        "reconciles": metrics.get('stratus_operator_reconciles_total{result="ok"}', 0.0),
        "reconcile_seconds": metrics.get("stratus_operator_reconcile_duration_seconds_sum", 0.0),
        "load": (load_before, os.getloadavg()[0]),
        "resync": resync, "idle_writes": idle_writes, "idle_reconciles": idle_reconciles,
    }


def section(r: dict[str, Any]) -> str:
    cpus = os.cpu_count()
    per = r["reconcile_seconds"] / r["reconciles"] * 1000 if r["reconciles"] else 0.0
    n = f"{r['count']:,}"
    rows = [
        (f"burst: {n} creates back to back, until all have all children", f"{r['burst_seconds']:.1f} s"),
        ("burst: apply→all-children latency p50 / p95 / max",
         f"{r['burst_p50']:.2f} s / {r['burst_p95']:.2f} s / {r['burst_max']:.2f} s"),
        (f"single apply with {n} present: latency p50 / p95 ({r['singles']} applies)",
         f"{r['single_p50'] * 1000:.0f} ms / {r['single_p95'] * 1000:.0f} ms"),
        ("operator RSS: idle / after the burst / at the end (peak)",
         f"{r['idle_rss_mib']:.0f} / {r['burst_rss_mib']:.0f} / {r['rss_mib']:.0f} MiB ({r['peak_rss_mib']:.0f} MiB)"),
        ("reconciles (ok) / mean reconcile wall time (concurrent, includes API waits)",
         f"{r['reconciles']:.0f} / {per:.0f} ms"),
        (f"idle, one resync interval ({r['resync']:.0f} s): reconciles / API writes (events aside)",
         f"{r['idle_reconciles']:.0f} / {sum(r['idle_writes'].values()):,}"
         + (f" ({', '.join(f'{k}: {v:,}' for k, v in r['idle_writes'].items())})" if r["idle_writes"] else "")),
        ("objects in the emulator at the end", f"{r['objects']:,}"),
        ("phases at the end", ", ".join(f"{k}: {v}" for k, v in sorted(r["phases"].items()))),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""{START}
## Operator at scale (`make bench-operator`)

The real operator process (`python -m stratus_operator.cli.operator`, kopf) against the in-memory API
emulator (`tests/integration/operator/kube_emulator/`, kmock) on loopback, with {n} `LLMDeployment`s
of `deploy/samples/smollm2.yaml`. Latency runs from an object's creation to the moment all {CHILDREN} of
its children exist (artifacts PVC, the compression Job and its spec ConfigMap, the cloud Deployment
and Service, the router's ConfigMap, Deployment and Service). The emulator and the benchmark share
one process and event loop; the operator is a second process. Machine: {cpus} CPU cores shared with
other work (1-minute load average {r['load'][0]:.1f} before, {r['load'][1]:.1f} after: the figures move
with it), Python {platform.python_version()}, {platform.machine()}; {time.strftime("%Y-%m-%d")}.

| measure | value |
|---|---|
{table}

Burst latency is mostly queueing: {n} objects arrive at once and one operator process (one event
loop, on a shared core) works through them. The single-apply figures are what a user sees with that
many deployments already in place. Memory grows with kopf's per-object state and the indexes the
reconciles read instead of listing the API (children, pods, nodes). The full `stratus` CLI also imports
the other subcommands' modules, some of which load torch: started as `stratus operator` the process
starts at about 300 MiB instead.
{END}
"""


def write_section(path: Path, text: str) -> None:
    report.write_section(path, "bench-operator", text.replace(START, "").replace(END, ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=20)
    parser.add_argument("--resync", type=float, default=60.0,
                        help="STRATUS_RESYNC_SECONDS of the operator, and the idle window measured")
    parser.add_argument("--write", type=Path, help="update this markdown file's operator section")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/stratus-bench-operator"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(bench(args.count, args.singles, args.workdir, args.resync))
    print(json.dumps(result, indent=2))
    text = section(result)
    print(text)
    if args.write:
        write_section(args.write, text)
        print(f"updated {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
