"""Test helpers: the repository's sample manifests and compression results built from the worker's own types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stratus_operator.planner import CompressionResult
from stratus_operator.spec import LLMDeployment
from stratus_workers.compress.spec import CompressionStatus, CompressionSummary

ROOT = Path(__file__).resolve().parents[3]
SAMPLES_DIR = ROOT / "deploy" / "samples"
SAMPLES = sorted(SAMPLES_DIR.glob("*.yaml"))
SMOLLM2 = SAMPLES_DIR / "smollm2.yaml"
GI = 2**30


def sample(path: Path = SMOLLM2, **metadata: Any) -> dict[str, Any]:
    """A sample manifest as a dict, with `metadata` fields (uid, namespace, generation, ...) set."""
    m: dict[str, Any] = yaml.safe_load(path.read_text())
    m["metadata"].update(metadata)
    return m


def deployment(path: Path = SMOLLM2, **metadata: Any) -> LLMDeployment:
    return LLMDeployment.from_manifest(sample(path, **metadata))


def result(name: str = "int8", status: CompressionStatus = "accepted", *, spec_hash: str | None = None,
           **figures: Any) -> CompressionResult:
    """A compression result as the operator holds it, from a summary the worker could have written."""
    return CompressionResult(CompressionSummary(name=name, status=status, **figures), spec_hash)


def accepted(size: int = 180_000_000, name: str = "int8") -> CompressionResult:
    return result(name, size_bytes=size, perplexity=13.2, perplexity_increase=0.02, tokens_per_second=40.0,
                  agreement=0.9)


def all_accepted(d: LLMDeployment, size: int = 100_000_000) -> dict[str, CompressionResult]:
    return {v.name: result(v.name, size_bytes=size) for v in d.spec.edge.variants}
