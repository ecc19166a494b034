"""Stage 1 of planning: the compression Jobs an LLMDeployment needs, and reading what they reported.

`plan_jobs` is a pure function of the spec: the operator calls it to know which Jobs to look for before
it plans the topology, the local runner to know what to compress.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from stratus_operator.names import job_name, stable_hash
from stratus_operator.placement import GPU_RESOURCE
from stratus_operator.spec import LLMDeployment, ResourceRequirements, Toleration
from stratus_workers.compress.spec import CompressionJobSpec, CompressionStatus, CompressionSummary


class ResultParseError(ValueError):
    """A compression Job's output holds no summary the operator can read."""


def parse_summary(text: str) -> CompressionSummary:
    """The worker's summary: the last line of `text` that is a JSON object, validated.

    The termination message is the summary alone, or (FallbackToLogsOnError, a killed worker) the tail of
    the log, where the summary, if any, is the last JSON line. Raises ResultParseError saying what is wrong.
    """
    line = next((ln.strip() for ln in reversed(text.strip().splitlines()) if ln.strip().startswith("{")), None)
    if line is None:
        raise ResultParseError(f"no JSON summary line in the compression output (tail: {text.strip()[-200:]!r})")
    try:
        return CompressionSummary.model_validate_json(line)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise ResultParseError(f"the compression summary is not valid ({problems}): {line[:300]}") from None


@dataclass(frozen=True)
class CompressionResult:
    """One variant's compression outcome: the worker's summary, the recipe it is for, a failed Job's reason."""

    summary: CompressionSummary
    # The CompressionJobPlan.spec_hash this result came from; None trusts it for the current recipe.
    spec_hash: str | None = None
    # For a failed Job: the Job's own reason (e.g. BackoffLimitExceeded, DeadlineExceeded).
    failure_reason: str = ""

    @property
    def name(self) -> str:
        return self.summary.name

    @property
    def status(self) -> CompressionStatus:
        return self.summary.status

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(self.summary.reasons)

    @property
    def accepted(self) -> bool:
        return self.summary.accepted

    @classmethod
    def from_output(cls, text: str, *, name: str, spec_hash: str | None = None) -> CompressionResult:
        """From a Job's termination message or a summary file; a summary without a name gets `name`."""
        summary = parse_summary(text)
        if not summary.name:
            summary = summary.model_copy(update={"name": name})
        return cls(summary, spec_hash)

    @classmethod
    def failed(cls, name: str, reason: str, message: str = "", *, spec_hash: str | None = None) -> CompressionResult:
        """A Job that failed without a gate verdict, with the Job's own reason."""
        text = f"{reason}: {message}" if message else reason
        return cls(CompressionSummary(name=name, status="failed", reasons=[text]), spec_hash, reason)


@dataclass(frozen=True)
class CompressionJobPlan:
    """One compression Job: its input, its recipe hash and what came of it so far."""

    variant: str
    name: str
    spec: CompressionJobSpec
    spec_hash: str
    result: CompressionResult | None = None
    # Placement and resources: not part of spec_hash (the recipe's result does not depend on where it ran).
    gpus: int = 0
    # None: the operator's defaults for compression Jobs; the GPUs are in here either way.
    resources: ResourceRequirements | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()

    @property
    def device(self) -> Literal["auto", "cuda"]:
        """The worker's --device: a Job given a GPU must use it (a CPU fallback would train for days)."""
        return "cuda" if self.gpus else "auto"

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def state(self) -> Literal["pending", "accepted", "rejected", "failed"]:
        return "pending" if self.result is None else self.result.status


def job_resources(requested: ResourceRequirements, gpus: int, gpu_resource: str) -> ResourceRequirements | None:
    """The Job's resources: the variant's own (None when it sets none) with `gpus` GPUs, requests == limits."""
    if not gpus:
        return requested if requested.requests or requested.limits else None
    requests, limits = dict(requested.requests), dict(requested.limits)
    # An extended resource cannot be overcommitted: Kubernetes requires its request to equal its limit.
    count = limits.get(gpu_resource) or requests.get(gpu_resource) or str(gpus)
    requests[gpu_resource] = limits[gpu_resource] = count
    return ResourceRequirements(requests=requests, limits=limits)


def plan_jobs(deployment: LLMDeployment, *, gpu_resource: str = GPU_RESOURCE) -> list[CompressionJobPlan]:
    """The compression Job of every edge variant (none under policy cloud-only), without results."""
    spec = deployment.spec
    if spec.routing.policy == "cloud-only":
        return []
    jobs = []
    for variant in spec.edge.variants:
        job_spec = CompressionJobSpec(
            name=variant.name,
            model_source=spec.model.source,
            compression=variant.compression,
            evaluation=variant.evaluation,
            gate=variant.gate,
        )
        spec_hash = stable_hash(job_spec.model_dump(mode="json", by_alias=True), 8)
        jobs.append(CompressionJobPlan(
            variant=variant.name,
            name=job_name(deployment.metadata.name, variant.name, spec_hash),
            spec=job_spec,
            spec_hash=spec_hash,
            gpus=variant.job.gpus,
            resources=job_resources(variant.job.resources, variant.job.gpus, gpu_resource),
            node_selector=dict(variant.job.node_selector),
            tolerations=tuple(variant.job.tolerations),
        ))
    return jobs
