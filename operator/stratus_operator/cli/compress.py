"""`stratus compress -f MANIFEST.yaml --variant NAME --out DIR`: run one edge variant's compression Job locally."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="compress the model of an LLMDeployment into one of its edge variants",
        description="Run the compression Job of one edge variant (spec.edge.variants[].name) on this machine; "
        "the last stdout line is the Job's JSON summary.",
    )
    parser.add_argument("-f", "--filename", required=True, type=Path, help="LLMDeployment manifest (YAML)")
    parser.add_argument("--variant", required=True, help="name of the edge variant to build")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to write (atomically)")
    parser.add_argument("--work-dir", type=Path, help="checkpoint directory (default: .<out>.work beside --out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train and calibrate (auto: CUDA when a GPU is visible); tokens/s is always "
                        "measured on the CPU")
    parser.set_defaults(func=run)


def job_spec_document(manifest: Any, variant: str, seed: int = 0) -> dict[str, Any]:
    """The CompressionJobSpec document for `variant` of an LLMDeployment manifest; raises BadInput."""
    from stratus_workers.compress.job import BadInput  # torch comes with it: import only when used

    if not isinstance(manifest, dict) or manifest.get("kind") != "LLMDeployment":
        raise BadInput("the manifest is not an LLMDeployment (kind: LLMDeployment)")
    spec = manifest.get("spec") or {}
    source = (spec.get("model") or {}).get("source")
    if not source:
        raise BadInput("spec.model.source: missing")
    variants = (spec.get("edge") or {}).get("variants") or []
    names = [v.get("name") for v in variants if isinstance(v, dict)]
    try:
        chosen = next(v for v in variants if isinstance(v, dict) and v.get("name") == variant)
    except StopIteration:
        raise BadInput(
            f"--variant: no edge variant named {variant!r}; "
            f"spec.edge.variants has {', '.join(map(str, names)) or 'none'}"
        ) from None
    document: dict[str, Any] = {"name": variant, "modelSource": source, "seed": seed}
    for key in ("compression", "evaluation", "gate"):
        if chosen.get(key) is not None:
            document[key] = chosen[key]
    return document


def run(args: argparse.Namespace) -> int:
    from stratus_workers.compress.__main__ import run as run_job
    from stratus_workers.compress.job import BadInput, parse_spec
    from stratus_workers.compress.spec import ExitCode

    try:
        try:
            manifest = yaml.safe_load(Path(args.filename).read_text())
        except FileNotFoundError:
            raise BadInput(f"-f: {args.filename} does not exist") from None
        except (OSError, yaml.YAMLError) as exc:
            raise BadInput(f"-f: {args.filename} is not readable YAML ({exc})") from None
        spec = parse_spec(job_spec_document(manifest, args.variant, args.seed))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return run_job(spec, args.out, work_dir=args.work_dir, device=args.device)
