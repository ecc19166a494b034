"""The GPU section of `make bench-compress`: a GPU run's stored results, with CPU tokens/s measured on this machine.

The variants were trained on a GPU (bench_compress_gpu.py on the lent H200); their artifacts stayed there (a
15-layer fp32 student is 326 MB, more than a device call brings back). What a variant's CPU speed depends on is
its architecture and kernels, not its weight values, so the CPU tokens/s here are measured on this machine with
random weights of each variant's exact shape (layers, quantized modules, zeros where pruned), interleaved with
the same-shaped full model through the serving runner exactly as the Job measures (`evaluate.tokens_per_second`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import report
import torch

from stratus_workers.compress import evaluate
from stratus_workers.compress.prune import prune_model
from stratus_workers.compress.quantize import quantize_model
from stratus_workers.compress.spec import CompressionRecipe, Pruning
from stratus_workers.models.tiny import SMOLLM2_135M, bundled_tokenizer, random_llama

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "tests" / "bench" / "results" / "compress-gpu"
SECTION = "bench-compress-gpu"
FULL = "full (same shape)"
# More rounds than a Job's three: the GPU rows' speeds are measured together on a shared machine, and the best
# round of each model is the one least disturbed by other work.
ROUNDS = 7
GOALS = {
    # variant: (max perplexity increase, min CPU speed-up over the full model, description)
    "student-15l": (0.30, 1.8, "15-layer student <= 1.3x the teacher's perplexity and >= 1.8x its CPU tokens/s"),
    "student-15l-int8": (0.30, 1.8, "the same student in int8: <= 1.3x perplexity, >= 1.8x CPU tokens/s"),
    "wanda-50": (0.20, None, "50% Wanda <= +20% perplexity after recovery"),
}


def load(results_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The main run, with rows of later runs (gpu-compress-*.json, `--as-sampled`) replacing its rows of the same
    name (the replaced ones are kept under "superseded"); and the sparse timings."""

    def read(path: Path) -> dict[str, Any] | None:
        return json.loads(path.read_text()) if path.is_file() else None

    jobs = read(results_dir / "gpu-compress.json")
    if jobs is not None:
        jobs.setdefault("superseded", [])
        for rerun_path in sorted(results_dir.glob("gpu-compress-*.json")):
            rerun = read(rerun_path) or {}
            for row in rerun.get("rows", []):
                row["run"] = {"file": rerun_path.name, "date": rerun.get("environment", {}).get("date"),
                              "elapsed_seconds": rerun.get("elapsed_seconds")}
                old = next((r for r in jobs["rows"] if r["name"] == row["name"]), None)
                if old is not None:
                    jobs["superseded"].append(old)
                    jobs["rows"][jobs["rows"].index(old)] = row
                else:
                    jobs["rows"].append(row)
            jobs["errors"] = [*jobs.get("errors", []), *rerun.get("errors", [])]
    return jobs, read(results_dir / "gpu-sparse.json")


def _variant_model(row: dict[str, Any]) -> Any:
    """Random weights in the variant's shape: its layers, its quantized modules, its zeros."""
    model = random_llama({**SMOLLM2_135M, "num_hidden_layers": int(row["layers"])}, seed=1)
    recipe = CompressionRecipe.model_validate(row["compression"])
    if recipe.pruning:
        # Magnitude on random weights gives the same count and pattern of zeros; the CPU kernels are dense.
        spec = Pruning(method="magnitude", sparsity=recipe.pruning.sparsity, pattern=recipe.pruning.pattern)
        prune_model(model, spec, None, 0)  # type: ignore[arg-type]  # magnitude needs no calibration text
    if recipe.quantization:
        q = recipe.quantization
        quantize_model(model, q.method, q.group_size, q.embedding_bits)
    return model.eval()


def cpu_speeds(rows: list[dict[str, Any]], speed_tokens: int, rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """Per variant against the same-shaped full model, all through the serving runner the Job measures with,
    interleaved in the same rounds on this machine's CPU: wall-clock tokens/s on the Job's threads, and tokens
    per second of the measuring thread's own CPU time on one thread (on a shared machine wall-clock speed is
    whatever share of the cores other work leaves; one thread's CPU time counts only while it runs)."""
    tokenizer = bundled_tokenizer()
    models = {FULL: random_llama(SMOLLM2_135M, seed=1).eval()}
    models.update({row["name"]: _variant_model(row) for row in rows})
    max_len = len(evaluate.PROMPTS[0]) + speed_tokens + 1  # characters bound the prompt's tokens
    runners = {name: evaluate.runner_for(model, rows=1, max_len=max_len) for name, model in models.items()}
    wall = evaluate.tokens_per_second(runners, tokenizer, speed_tokens, rounds=rounds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = evaluate.tokens_per_second(runners, tokenizer, speed_tokens, rounds=rounds, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    return {row["name"]: {"variant": wall[row["name"]], "full": wall[FULL], "speedup": wall[row["name"]] / wall[FULL],
                          "cpu_time_variant": cpu[row["name"]], "cpu_time_full": cpu[FULL],
                          "cpu_time_speedup": cpu[row["name"]] / cpu[FULL]} for row in rows}


def _check(value: float, goal: float, *, upper: bool, fmt: str) -> str:
    ok = value <= goal if upper else value >= goal
    sign = "<=" if upper else ">="
    verdict = "met" if ok else f"missed by {format(abs(value - goal), fmt.replace('+', ''))}"
    return f"{format(value, fmt)} (goal {sign} {format(goal, fmt)}; {verdict})"


def _goal_lines(rows: list[dict[str, Any]], speeds: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    for row in rows:
        if row["name"] not in GOALS:
            continue
        max_ppl, min_speed, text = GOALS[row["name"]]
        ppl_ok = row["perplexity_increase"] <= max_ppl
        parts = [f"perplexity {row['perplexity'] / row['full_perplexity']:.3f}x the teacher's, change "
                 + _check(row["perplexity_increase"], max_ppl, upper=True, fmt="+.1%")]
        speed_ok = True
        if min_speed is not None:
            speed = speeds[row["name"]]["cpu_time_speedup"]
            speed_ok = speed >= min_speed
            parts.append("CPU speed vs full (per CPU-second, one thread) "
                         + _check(speed, min_speed, upper=False, fmt=".2f")
                         + f"; wall-clock at the Job's threads {speeds[row['name']]['speedup']:.2f}x")
        verdict = "MET" if ppl_ok and speed_ok else "MISSED"
        lines.append(f"- **{row['name']}** ({text}): {verdict}: " + "; ".join(parts))
    return lines


def _sparse_lines(sparse: dict[str, Any] | None) -> list[str]:
    if not sparse:
        return ["No 2:4 kernel timings were recorded."]
    env = sparse.get("environment", {})
    lines = [f"2:4 semi-structured sparsity where kernels exist: {env.get('gpu', '?')}, torch {env.get('torch', '?')}, "
             f"bf16, random weights pruned 2:4, median of 50 timed calls after warm-up (CUDA events).", "",
             "| backend | weight (out x in) | tokens | dense ms | 2:4 ms | 2:4 speed-up | rel. error |",
             "|---|---|---|---:|---:|---:|---:|"]
    failed: dict[tuple[str, str], int] = {}
    for r in (sparse.get("sparse_matmuls") or {}).get("rows", []):
        if "error" in r:
            failed[(r["backend"], r["error"])] = failed.get((r["backend"], r["error"]), 0) + 1
        else:
            lines.append(f"| {r['backend']} | {r['shape']} | {r['tokens']} | {r['dense_ms']:.4f} | "
                         f"{r['sparse_ms']:.4f} | {r['speedup']:.2f}x | {r['relative_error']:.1e} |")
    for (backend, error), count in failed.items():
        lines.append(f"| {backend} | all {count} shape/size pairs | — | — | — | failed | `{error[:110]}` |")
    model = sparse.get("sparse_model")
    model_error = next((e for e in sparse.get("errors", []) if e.startswith("sparse-model")), None)
    if model_error:
        lines += ["", f"The whole model with 2:4 linears did not run: `{model_error[:200]}` (torch's semi-structured "
                  "tensor subclass implements a few ops only, and HF's Llama forward issues others)."]
    if model:
        lines += ["", "The whole SmolLM2-135M architecture with every decoder linear 2:4 (the wanda-2-4 variant's "
                  "shape; default backend), forward passes in bf16:", "",
                  "| forward | dense ms | 2:4 ms | 2:4 speed-up | logits rel. error |", "|---|---:|---:|---:|---:|"]
        for name, r in model.items():
            lines.append(f"| {name} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['relative_error']:.1e} |")
    return lines


def render(jobs: dict[str, Any], sparse: dict[str, Any] | None, measured: dict[str, Any]) -> str:
    env = jobs.get("environment", {})
    rows = jobs["rows"]
    speeds: dict[str, dict[str, float]] = measured["speeds"]
    full_ppl = rows[0]["full_perplexity"] if rows else float("nan")
    first = next(iter(speeds.values()), {})
    header = ("| variant | recipe | trained on | training tokens | training steps' time | Job wall time | perplexity "
              "| change vs full | agreement | sparsity | CPU tok/s per CPU-second, 1 thread (full) | vs full "
              "| wall-clock tok/s (full) | vs full | gate |")
    table = [header, "|" + "---|" * 15,
             f"| full (fp32) | none | — | — | — | — | {full_ppl:.3f} | — | 1.000 | — | "
             f"{first.get('cpu_time_full', math.nan):.1f} | 1.00x | {first.get('full', math.nan):.1f} | 1.00x | — |"]
    for r in rows:
        d, p = r.get("distillation") or {}, r.get("pruning") or {}
        reused = bool(d) and d.get("resumed_from_step") == d.get("steps")
        train = "reused" if reused else f"{(d.get('seconds') or 0) + (p.get('recovery_seconds') or 0):.0f} s"
        sparsity = f"{r['sparsity']:.1%}" if r.get("sparsity") is not None else "—"
        s = speeds.get(r["name"], {})
        table.append(
            f"| {r['name']} | {r['recipe']} | {r['device']} | {r['training_tokens'] / 1e6:.1f} M | {train} "
            f"| {r['job_seconds']:.0f} s | {r['perplexity']:.3f} | {r['perplexity_increase']:+.1%} "
            f"| {r['agreement']:.3f} | {sparsity} | {s.get('cpu_time_variant', math.nan):.1f} "
            f"({s.get('cpu_time_full', math.nan):.1f}) | {s.get('cpu_time_speedup', math.nan):.2f}x "
            f"| {s.get('variant', math.nan):.1f} ({s.get('full', math.nan):.1f}) | {s.get('speedup', math.nan):.2f}x "
            f"| {r['status']} |")
    gen = jobs.get("generation", {})
    plan = jobs.get("plan", {})
    probe = jobs.get("layer_probe", {})
    student = next((r for r in rows if r["name"] == "student-15l"), None)
    text_fig = (student or {}).get("training_text") or {}
    student_row = next((r for r in rows if r["name"] == "student-15l"), None)
    bound = (f" A 15-of-30-layer student in fp32 keeps {student_row['size_ratio']:.3f}x the teacher's weights "
             "(the tied 49,152 x 576 embedding and LM head, 21% of the teacher, stay whole), so where weight reads or "
             f"matmuls set the pace its batch-1 decode gains about 1/{student_row['size_ratio']:.3f} = "
             f"{1 / student_row['size_ratio']:.2f}x, somewhat more where per-layer overhead (norms, rotary, attention "
             "over the cache, Python) does: 1.8x is at the edge of reach for its fp32 form; int8 weights "
             "(student-15l-int8) pass it." if student_row else "")
    notes = [
        f"Trained on: {env.get('gpu', env.get('device', '?'))} ({env.get('gpu_memory_gib', '?')} GiB, compute "
        f"capability {env.get('capability', '?')}), torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}, {env.get('date', '?')}; the whole run took "
        f"{jobs.get('elapsed_seconds', 0):.0f} s "
        f"of a {jobs.get('budget_seconds', 0):.0f} s budget. Real weights (the bundled GGUF), bf16 autocast, fused "
        "AdamW. Perplexity and agreement: the reloaded artifact in fp32 on that machine's CPU, the same evaluation as "
        "the CPU rows above (that run called the model's forward; the Job now goes through the serving runner, whose "
        "CPU path keeps Hugging Face's arithmetic).",
        f"CPU tokens/s here: {measured['machine']} ({measured['threads']} threads), {measured['date']}, load "
        "average "
        f"{', '.join(map(str, measured['load_average_before']))} before and "
        f"{', '.join(map(str, measured['load_average_after']))} after (1, 5, 15 min); random weights of each "
        "variant's exact shape (see tests/bench/compress_gpu_report.py "
        f"for why that measures the same thing) through the serving runner as the Job measures, batch 1, greedy, "
        f"{measured['speed_tokens']} new tokens, best of "
        f"{measured['rounds']} "
        "rounds, every variant and the same-shaped full model interleaved in each round. Two clocks: wall-clock at "
        "the Job's thread count (what the CPU rows above show, and what other work on this shared machine "
        "disturbs), and tokens per second of the measuring thread's own CPU time with one intra-op thread (what "
        "a dedicated core does; the other work's share of the machine does not count), on which the goals are "
        "judged. With a load average well above the core count the wall-clock ratios say more about the other "
        "work than about the variants (a pruned variant runs the full model's dense kernels). Pruned variants run "
        "dense kernels on the CPU: no 2:4 or unstructured sparse speed-up exists "
        "there, so their ratio is ~1.0x by construction." + bound,
        f"Step counts were sized in the run from measured step times to fit its budget (plan: "
        f"{json.dumps({k: v for k, v in plan.items() if k != 'training_seconds'})}); the sample "
        "`deploy/samples/smollm2-compression-gpu.yaml` holds the same recipes.",
    ]
    if text_fig:
        notes.append(
            f"Training text: {text_fig.get('sequences', 0):,} sequences the teacher wrote (sampled continuations of "
            f"{text_fig.get('prompts', 0):,} prompts: topics x tasks, chat-formatted, and plain-text openings; none "
            f"is an agreement prompt), {text_fig.get('tokens', 0) / 1e6:.2f} M tokens packed, plus the corpus' "
            "training slice for a quarter of each batch. Generation rate: "
            f"{gen.get('tokens_per_chunk', 0) / max(gen.get('seconds_per_chunk', 1), 1e-9):,.0f} tokens/s "
            "(HF generate, bf16). Chunks are cached in the Job's work directory: the later Jobs reused them.")
    if probe:
        res = probe.get("results", {})
        notes.append(
            f"Which teacher layers the student starts from: {probe['steps']} steps of the student's own recipe from "
            "each choice, then KL to the teacher on held-out calibration text: " + "; ".join(
                f"{k} {v['layers']} -> KL {v['held_out_kl']:.3f}" for k, v in res.items())
            + f". Chosen: {probe.get('chosen')} (docs/compression.md has the untrained students' perplexities).")
    for old in jobs.get("superseded", []):
        new = next(r for r in rows if r["name"] == old["name"])
        notes.append(
            f"{old['name']}: this row is from a second run ({new.get('run', {}).get('date', '?')}, "
            f"`--as-sampled`, {new.get('run', {}).get('elapsed_seconds', 0):.0f} s) with the sample's recipe. "
            f"The first run's recipe ({old['compression'].get('pruning', {}).get('recoverySteps')} recovery steps, "
            f"{old['training_tokens'] / 1e6:.1f} M tokens, a quarter corpus and three quarters teacher-written "
            f"text) reached {old['perplexity_increase']:+.1%} perplexity ({old['status']}) and "
            f"{old['agreement']:.3f} agreement."
            + (f" The second run trained on the corpus' training slice alone ({new['training_tokens'] / 1e6:.1f} M "
               "tokens): the evaluation corpus' own domain, where its perplexity gained far more than its agreement "
               f"on general-English prompts did ({old['agreement']:.3f} -> {new['agreement']:.3f}); the gate reads "
               "perplexity on that corpus, so read this row's +perplexity with that in mind."
               if not new.get("training_text") else ""))
    if jobs.get("errors"):
        notes.append("Errors in the run: " + "; ".join(jobs["errors"]))
    return "\n".join([
        "## Compression on a GPU (`make bench-compress`, GPU rows)",
        "",
        "The GPU sample's variants (`deploy/samples/smollm2-compression-gpu.yaml`), each compression Job run on one "
        "GPU by tests/bench/bench_compress_gpu.py (results in tests/bench/results/compress-gpu/), evaluated like "
        "the CPU rows above.",
        "",
        *table,
        "",
        "Goals:",
        "",
        *_goal_lines(rows, speeds),
        "",
        *_sparse_lines(sparse),
        "",
        "On the CPU there are no 2:4 kernels in torch: a 2:4 variant runs the dense kernels (the wanda-2-4 row's "
        "CPU ratio), so its pattern buys nothing on an edge CPU.",
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in notes],
    ])


SPEEDS_FILE = "cpu-speeds.json"


def measure(results_dir: Path, threads: int, speed_tokens: int) -> dict[str, Any] | None:
    """Measure the GPU rows' CPU speeds here and keep them beside the results (with the machine and its load)."""
    jobs, _ = load(results_dir)
    if jobs is None:
        return None
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    speeds = cpu_speeds(jobs["rows"], speed_tokens)
    measured = {"machine": f"{report.cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}",
                "threads": threads, "speed_tokens": speed_tokens, "rounds": ROUNDS,
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "load_average_before": [round(v, 2) for v in load_before],
                "load_average_after": [round(v, 2) for v in os.getloadavg()], "speeds": speeds}
    (results_dir / SPEEDS_FILE).write_text(json.dumps(measured, indent=2) + "\n")
    return measured


def build(results_dir: Path, threads: int, speed_tokens: int, *, remeasure: bool = True) -> str | None:
    """The GPU section from stored results, with CPU speeds measured here (or the last ones kept, when not
    `remeasure`); None when there are no results."""
    jobs, sparse = load(results_dir)
    if jobs is None:
        return None
    path = results_dir / SPEEDS_FILE
    measured = measure(results_dir, threads, speed_tokens) if remeasure or not path.is_file() else json.loads(
        path.read_text())
    assert measured is not None
    return render(jobs, sparse, measured)
