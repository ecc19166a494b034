"""`python -m stratus_workers.compress --spec SPEC.json --out DIR`: the compression Job's entry point."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from stratus_workers.compress.job import BadInput, compress, read_spec
from stratus_workers.compress.spec import CompressionJobSpec, CompressionSummary, ExitCode
from stratus_workers.observability import setup_logging

log = logging.getLogger("stratus_workers.compress")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stratus_workers.compress",
        description="Compress a model into an edge variant, evaluate and gate it.",
    )
    parser.add_argument("--spec", required=True, type=Path, help="CompressionJobSpec JSON file")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory (written atomically)")
    parser.add_argument("--termination-log", type=Path, help="also write the summary here (/dev/termination-log)")
    parser.add_argument("--work-dir", type=Path, help="checkpoints for resuming (default: .<out>.work beside --out)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to train and calibrate (auto: CUDA when a GPU is visible); speed is always measured on the CPU",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="json", choices=["json", "text"])
    return parser


def _emit(summary: CompressionSummary, termination_log: Path | None) -> None:
    line = summary.to_json()
    if termination_log is not None:
        try:
            termination_log.write_text(line[:4096])  # Kubernetes keeps at most 4096 bytes of it
        except OSError as exc:
            log.warning("could not write the termination log", extra={"path": str(termination_log), "error": str(exc)})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(
    spec: CompressionJobSpec | Path,
    out: Path,
    *,
    work_dir: Path | None = None,
    termination_log: Path | None = None,
    device: str = "auto",
) -> ExitCode:
    """Run a Job and report as a Job does (summary last on stdout, reason on stderr); returns the exit code."""
    name = ""
    try:
        parsed = read_spec(spec) if isinstance(spec, Path) else spec
        name = parsed.name
        result = compress(parsed, out, work_dir=work_dir, device=device)
    except BadInput as exc:
        log.error("bad input", extra={"reason": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        _emit(CompressionSummary(name=name, status="failed", reasons=[str(exc)]), termination_log)
        return ExitCode.BAD_INPUT
    except Exception as exc:
        log.exception("compression failed")
        reason = f"{type(exc).__name__}: {exc}"
        _emit(CompressionSummary(name=name, status="failed", reasons=[reason]), termination_log)
        return ExitCode.FAILED
    if result.summary.status == "rejected":
        print("error: rejected by the quality gate: " + "; ".join(result.summary.reasons), file=sys.stderr)
    _emit(result.summary, termination_log)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return run(args.spec, args.out, work_dir=args.work_dir, termination_log=args.termination_log, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
