"""Local executor: binds the planner's logical plan to processes on this machine (what `stratus up` runs).

A model reference becomes a path in the work directory (or the source itself), a backend name a loopback
port; the command lines are the same ones `render` puts in pods (`stratus_operator.commands`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from stratus_operator.commands import RouterFlags, ServeFlags, compress_command, router_config
from stratus_operator.placement import ClusterView
from stratus_operator.planner import (
    Artifact,
    CompressionJobPlan,
    CompressionResult,
    ModelRef,
    Plan,
    ResultParseError,
    plan,
    plan_jobs,
)
from stratus_operator.spec import LLMDeployment
from stratus_workers.client import Client
from stratus_workers.models.loader import cache_dir
from stratus_workers.ports import free_port
from stratus_workers.security import TLSFiles, local_pki

log = logging.getLogger(__name__)


class LocalRunError(RuntimeError):
    """`stratus up` cannot go on; the message says what failed and where its log is."""


def load_manifest(path: Path) -> LLMDeployment:
    """Read one LLMDeployment from a YAML file, with errors that name the file and the field."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except FileNotFoundError:
        raise LocalRunError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise LocalRunError(f"{path} is not valid YAML: {exc}") from exc
    found = [d for d in documents if isinstance(d, dict) and d.get("kind") == "LLMDeployment"]
    if len(found) != 1:
        raise LocalRunError(f"{path} must hold exactly one LLMDeployment; found {len(found)}")
    try:
        return LLMDeployment.from_manifest(found[0])
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise LocalRunError(f"{path} is not a valid LLMDeployment: {problems}") from exc


@dataclass
class Child:
    """One process of the local stack."""

    role: str
    name: str
    address: str
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    detail: str = ""


@dataclass
class JobOutcome:
    variant: str
    result: CompressionResult
    artifact: Path
    cached: bool
    seconds: float


class LocalRunner:
    """Runs one LLMDeployment as processes: compression jobs, model servers and the router."""

    def __init__(
        self,
        deployment: LLMDeployment,
        *,
        work_dir: Path | None = None,
        router_port: int = 0,
        http_port: int = 0,
        python: str = sys.executable,
        out: IO[str] = sys.stdout,
    ) -> None:
        self.deployment = deployment
        self.work_dir = work_dir or cache_dir() / "local" / deployment.metadata.name
        self.artifacts = self.work_dir / "artifacts"
        self.logs = self.work_dir / "logs"
        self.router_port = router_port
        self.http_port = http_port
        self.python = python
        self.out = out
        self.children: list[Child] = []
        self.plan: Plan | None = None
        self.outcomes: list[JobOutcome] = []
        self._lock: IO[str] | None = None

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    # -- compression ------------------------------------------------------------------------

    def artifact_dir(self, artifact: Artifact) -> Path:
        """Where a variant's artifact lives here: one directory per recipe, so a new recipe never reuses it."""
        return self.artifacts / f"{artifact.variant}-{artifact.spec_hash}"

    def model_path(self, ref: ModelRef) -> str:
        """Bind a plan's model reference: an artifact's directory, or the source (the worker resolves it)."""
        return str(self.artifact_dir(ref)) if isinstance(ref, Artifact) else ref.uri

    def compress(self) -> dict[str, CompressionResult]:
        """Run every compression job of the deployment (reusing finished artifacts of the same recipe)."""
        results: dict[str, CompressionResult] = {}
        for job in plan_jobs(self.deployment):
            artifact = self.artifact_dir(Artifact(job.variant, job.spec_hash))
            summary = artifact.with_name(artifact.name + ".summary.json")
            started = time.monotonic()
            result = self._cached(summary, artifact, job.variant, job.spec_hash)
            cached = result is not None
            if result is None:
                self.say(f"compress  {job.variant:<10} {job.spec.compression.summary} (runs once; cached after)")
                result = self._run_job(job, artifact, summary)
            results[job.variant] = result
            self.outcomes.append(JobOutcome(job.variant, result, artifact, cached, time.monotonic() - started))
            self.say(self._describe(result, cached, time.monotonic() - started))
        return results

    @staticmethod
    def _cached(summary: Path, artifact: Path, variant: str, spec_hash: str) -> CompressionResult | None:
        if not summary.is_file():
            return None
        try:
            result = CompressionResult.from_output(summary.read_text(), name=variant, spec_hash=spec_hash)
        except (OSError, ResultParseError):
            return None
        if result.status == "rejected" or (result.accepted and (artifact / "manifest.json").is_file()):
            return result
        return None

    @staticmethod
    def _describe(result: CompressionResult, cached: bool, seconds: float) -> str:
        figures = []
        summary = result.summary
        if summary.size_bytes:
            figures.append(f"{summary.size_bytes / 2**20:.0f} MiB")
        if summary.perplexity_increase is not None:
            figures.append(f"ppl {summary.perplexity_increase:+.1%}")
        if summary.tokens_per_second:
            figures.append(f"{summary.tokens_per_second:.0f} tok/s")
        if summary.agreement is not None:
            figures.append(f"agreement {summary.agreement:.0%}")
        if result.reasons and not result.accepted:
            figures.append("; ".join(result.reasons))
        when = "cached" if cached else f"{seconds:.0f} s"
        return f"compress  {result.name:<10} {result.status} ({when}): {', '.join(figures)}"

    def _run_job(self, job: CompressionJobPlan, artifact: Path, summary: Path) -> CompressionResult:
        variant = job.variant
        self.logs.mkdir(parents=True, exist_ok=True)
        artifact.parent.mkdir(parents=True, exist_ok=True)
        spec_path = self.work_dir / f"{variant}.spec.json"
        spec_path.write_text(job.spec.model_dump_json(by_alias=True, indent=2))
        summary.unlink(missing_ok=True)
        command = [
            *compress_command(spec=str(spec_path), out=str(artifact), termination_log=str(summary),
                              python=self.python),
            "--log-format",
            "text",  # its stage lines and progress bars are what the user watches
        ]
        log_path = self.logs / f"compress-{variant}.log"
        with open(log_path, "wb") as log_file:
            # Progress bars go to the terminal (stderr); the JSON log lines and the summary to the log.
            proc = subprocess.run(command, stdout=log_file, stderr=None, check=False)
        try:
            result = CompressionResult.from_output(summary.read_text(), name=variant, spec_hash=job.spec_hash)
        except (OSError, ResultParseError) as exc:
            raise LocalRunError(
                f"compression of {variant} failed (exit {proc.returncode}) without a summary: {exc}; log: {log_path}"
            ) from exc
        if result.status == "failed":
            summary.unlink(missing_ok=True)  # not a verdict on the recipe: try again next time
            raise LocalRunError(f"compression of {variant} failed: {'; '.join(result.reasons)}; log: {log_path}")
        return result

    # -- serving ----------------------------------------------------------------------------

    def _spawn(self, role: str, name: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        handle = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A session of its own, so the terminal's Ctrl-C reaches only us and we stop children in order.
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        handle.close()
        return proc, log_path

    def start(self, results: dict[str, CompressionResult]) -> Plan:
        """Start the servers and the router of the plan, wait until each is healthy."""
        self.plan = plan(self.deployment, ClusterView.local(), results)
        local_cpu = not torch.cuda.is_available()
        # A throwaway CA per run: router and servers talk mTLS, as they do in a cluster.
        tls = local_pki(self.work_dir / "tls")
        tls_args = self._tls_args(tls)
        addresses: dict[str, str] = {}
        for server in self.plan.servers:
            port, http_port = free_port(), free_port()
            model = self.model_path(server.model)
            detail = model
            if server.variant is not None:
                summary = self.plan.job(server.variant).spec.compression.summary
                detail = f"variant {server.variant}: {summary}, served by {server.runtime}"
            flags = ServeFlags.of(server, model=model, host="127.0.0.1", port=port, http_port=http_port)
            if local_cpu:
                # No GPU here: bf16 matmuls on a CPU are slower than fp32, so run what the CPU is good at.
                flags = dataclasses.replace(flags, dtype="auto", device="cpu")
                if server.dtype not in ("auto", "float32"):
                    detail += f"; asked {server.dtype} on {server.device}, float32 on this CPU"
            command = [*flags.command(self.python), "--log-format", "json", *tls_args]
            proc, log_path = self._spawn(server.tier, server.name, command)
            address = f"127.0.0.1:{port}"
            addresses[server.name] = address
            replicas = f", {server.replicas} replicas planned, 1 runs here" if server.replicas > 1 else ""
            self.children.append(Child(server.tier, server.name, address, http_port, proc, log_path, detail + replicas))
        router = self.plan.router
        if router is None:
            raise LocalRunError("the plan has no servers to route to: " + "; ".join(self.plan.notes))
        config = router_config(self.plan, router, address=addresses.__getitem__,
                               tokenizer=self.model_path(router.tokenizer))
        config_path = self.work_dir / "router.json"
        config_path.write_text(config.model_dump_json(by_alias=True, indent=2))
        port = self.router_port or free_port()
        http_port = self.http_port or free_port()
        router_flags = RouterFlags(config=str(config_path), host="127.0.0.1", port=port, http_port=http_port)
        command = [*router_flags.command(self.python), "--log-format", "json", *tls_args]
        proc, log_path = self._spawn("router", router.name, command)
        self.children.append(
            Child(
                "router", router.name, f"127.0.0.1:{port}", http_port, proc, log_path, f"policy {config.routing.policy}"
            )
        )
        self._wait_healthy()
        return self.plan

    @staticmethod
    def _tls_args(tls: TLSFiles) -> list[str]:
        return ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]

    def _wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        tls = self.work_dir / "tls"
        for child in self.children:
            # Servers accept only mTLS; the router's client port is plaintext on loopback.
            mtls = child.role != "router"
            with Client(
                child.address,
                tls_ca=str(tls / "ca.crt") if mtls else None,
                tls_cert=str(tls / "stratus-local.crt") if mtls else None,
                tls_key=str(tls / "stratus-local.key") if mtls else None,
            ) as client:
                while not client.healthy(timeout=1.0):
                    if child.process.poll() is not None:
                        tail = child.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                        raise LocalRunError(
                            f"{child.role} {child.name} exited with {child.process.returncode}: "
                            f"{' | '.join(tail)}; full log: {child.log_path}"
                        )
                    if time.monotonic() > deadline:
                        raise LocalRunError(
                            f"{child.role} {child.name} not healthy after {timeout:.0f} s; log: {child.log_path}"
                        )
                    time.sleep(0.25)
        self._wait_routed(min(deadline, time.monotonic() + 30.0))

    def _wait_routed(self, deadline: float) -> None:
        # Each server answers its own health check by now, but the router learns of it only at its next probe
        # (healthInterval): prompts sent before that would all go to the cloud as "edge-unavailable".
        url = f"http://127.0.0.1:{self.router.http_port}/metrics"
        down: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    text = response.read().decode()
                down = [
                    sample.labels["backend"]
                    for family in text_string_to_metric_families(text)
                    if family.name == "stratus_router_backend_up"
                    for sample in family.samples
                    if sample.value != 1.0
                ]
                if not down:
                    return
            time.sleep(0.25)
        log.warning("the router does not see every backend up yet", extra={"down": down})

    @property
    def router(self) -> Child:
        return next(c for c in self.children if c.role == "router")

    def stop(self, grace: float = 10.0) -> None:
        """Stop the router first (no new work), then the servers; SIGKILL what ignores SIGTERM."""
        for child in sorted(self.children, key=lambda c: c.role != "router"):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(remaining)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(5)
        self.children.clear()

    @property
    def lock_path(self) -> Path:
        return self.work_dir / "up.lock"

    def claim(self) -> None:
        """Hold the work directory for this run, or LocalRunError naming the run that holds it.

        Two runs of one deployment would overwrite each other's logs, endpoints and certificates. The lock
        is the kernel's (flock): it goes with the process that holds it, so a crashed run leaves none behind.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_path, "a+")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LocalRunError(
                f"{self.deployment.metadata.name} is already running from {self.work_dir} ({holder}); its "
                f"endpoints are in {self.work_dir / 'endpoints.json'}. Stop that run first (Ctrl-C in its terminal), "
                "or give this one a work directory of its own with --work-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            self._lock.truncate(0)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    @contextlib.contextmanager
    def running(self) -> Iterator[LocalRunner]:
        """The whole stack, for the time of the `with`; the work directory is this run's alone meanwhile."""
        self.claim()
        try:
            self.start(self.compress())
            yield self
        finally:
            try:
                self.stop()
            finally:
                self.release()

    def endpoint_lines(self) -> list[str]:
        lines = []
        for child in self.children:
            extra = f"  http://127.0.0.1:{child.http_port}" if child.role == "router" else ""
            lines.append(f"{child.role:<8}  {child.address:<16}{extra}  {child.name}  ({child.detail})")
        return lines

    def describe(self) -> dict[str, Any]:
        """Machine-readable summary of the running stack."""
        return {
            "deployment": self.deployment.metadata.name,
            "router": {"grpc": self.router.address, "http": f"http://127.0.0.1:{self.router.http_port}"},
            "servers": [
                {"name": c.name, "tier": c.role, "grpc": c.address, "log": str(c.log_path)}
                for c in self.children
                if c.role != "router"
            ],
            "compression": [
                {"variant": o.variant, "status": o.result.status, "cached": o.cached, "artifact": str(o.artifact)}
                for o in self.outcomes
            ],
        }

    def write_state(self) -> Path:
        path = self.work_dir / "endpoints.json"
        path.write_text(json.dumps(self.describe(), indent=2))
        return path
