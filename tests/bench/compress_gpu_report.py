"""The GPU section of `make bench-compress`: a GPU run's stored results, with CPU tokens/s measured on this machine.

The variants were trained on a GPU (bench_compress_gpu.py on the lent H200); their artifacts stayed there (a
15-layer fp32 student is 326 MB, more than a device call brings back). What a variant's CPU speed depends on is
its architecture and kernels, not its weight values, so the CPU tokens/s here are measured on this machine with
random weights of each variant's exact shape (layers, quantized modules, zeros where pruned), interleaved with
the same-shaped full model through the serving runner exactly as the Job measures (`evaluate.tokens_per_second`).

Run as a script, it measures the same on one idle core of another machine (the GPU machine's host), as an extra
row beside this machine's:

    taskset -c 31 python tests/bench/compress_gpu_report.py --quiet-core OUT.json --note "what else ran"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import report
import torch

from stratus_workers.compress import corpus, evaluate
from stratus_workers.compress.prune import prune_model
from stratus_workers.compress.quantize import quantize_model
from stratus_workers.compress.spec import CompressionRecipe, Pruning
from stratus_workers.models.tiny import SMOLLM2_135M, bundled_tokenizer, random_llama

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "tests" / "bench" / "results" / "compress-gpu"
SECTION = "bench-compress-gpu"
FULL = "full (same shape)"
ONE_LAYER = "one layer (same width)"
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
                              "elapsed_seconds": rerun.get("elapsed_seconds"), "plan": rerun.get("plan"),
                              "lr_probe": rerun.get("lr_probe")}
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


def _speeds(
    rows: list[dict[str, Any]], speed_tokens: int, rounds: int, *, wall_clock: bool = True
) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Wall-clock tokens/s on this process's threads (unless not `wall_clock`) and tokens per CPU-second of the
    measuring thread on one thread, of the same-shaped full model, a one-layer model of its width and each row's
    variant, all through the serving runner the Job measures with, interleaved in the same rounds; and each
    model's parameter count."""
    tokenizer = bundled_tokenizer()
    models = {FULL: random_llama(SMOLLM2_135M, seed=1).eval(),
              ONE_LAYER: random_llama({**SMOLLM2_135M, "num_hidden_layers": 1}, seed=1).eval()}
    models.update({row["name"]: _variant_model(row) for row in rows})
    max_len = len(evaluate.PROMPTS[0]) + speed_tokens + 1  # characters bound the prompt's tokens
    runners = {name: evaluate.runner_for(model, rows=1, max_len=max_len) for name, model in models.items()}
    wall = evaluate.tokens_per_second(runners, tokenizer, speed_tokens, rounds=rounds) if wall_clock else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = evaluate.tokens_per_second(runners, tokenizer, speed_tokens, rounds=rounds, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    return wall, cpu, parameters


def cost_fit(cpu: dict[str, float], parameters: dict[str, int], layers: int = 15) -> dict[str, float]:
    """A token's CPU time as fixed + per-layer cost (embedding, final norm and LM head are the fixed part), fitted
    from the full model and its one-layer cut, and what that predicts for a `layers`-layer student's speed-up;
    beside the ratio of the weights each token reads."""
    full_layers = int(SMOLLM2_135M["num_hidden_layers"])
    t_full, t_one = 1 / cpu[FULL], 1 / cpu[ONE_LAYER]
    per_layer = (t_full - t_one) / (full_layers - 1)
    fixed = t_one - per_layer
    per_layer_params = (parameters[FULL] - parameters[ONE_LAYER]) / (full_layers - 1)
    student_params = parameters[FULL] - (full_layers - layers) * per_layer_params
    return {"fixed_ms": fixed * 1e3, "layer_ms": per_layer * 1e3, "layers": layers,
            "predicted_speedup": t_full / (fixed + layers * per_layer),
            "weights_ratio": parameters[FULL] / student_params,
            "fixed_weights_in_layers": (parameters[ONE_LAYER] - per_layer_params) / per_layer_params}


def cpu_speeds(
    rows: list[dict[str, Any]], speed_tokens: int, rounds: int = ROUNDS
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per variant against the same-shaped full model on this machine's CPU: wall-clock tokens/s on the Job's
    threads, and tokens per second of the measuring thread's own CPU time on one thread (on a shared machine
    wall-clock speed is whatever share of the cores other work leaves; one thread's CPU time counts only while it
    runs); and the fixed/per-layer cost fit."""
    wall, cpu, parameters = _speeds(rows, speed_tokens, rounds)
    speeds = {row["name"]: {"variant": wall[row["name"]], "full": wall[FULL], "speedup": wall[row["name"]] / wall[FULL],
                            "cpu_time_variant": cpu[row["name"]], "cpu_time_full": cpu[FULL],
                            "cpu_time_speedup": cpu[row["name"]] / cpu[FULL]} for row in rows}
    return speeds, cost_fit(cpu, parameters)


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
    for row in rows:  # the others' goal is their gate in the sample (the issue: they pass it)
        limit = row.get("gate", {}).get("maxPerplexityIncrease")
        if row["name"] in GOALS or limit is None:
            continue
        verdict = "MET" if row["status"] == "accepted" else "MISSED"
        lines.append(f"- **{row['name']}** (passes its gate in the sample, <= {limit:+.0%} perplexity): {verdict}: "
                     + _check(row["perplexity_increase"], limit, upper=True, fmt="+.1%") + f", {row['status']}")
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


def render(
    jobs: dict[str, Any],
    sparse: dict[str, Any] | None,
    measured: dict[str, Any],
    quiet: dict[str, Any] | None = None,
    train_tokens: int | None = None,
) -> str:
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
    fit = (quiet or {}).get("cost_fit") or measured.get("cost_fit")
    bound = ""
    if student_row:
        bound = (f" A 15-of-30-layer student in fp32 keeps {student_row['size_ratio']:.3f}x the teacher's weights (the "
                 "tied 49,152 x 576 embedding and LM head stay whole), and at batch 1 a token's time is a fixed part "
                 "F (embedding, final norm, LM head) plus L per layer, so its speed-up is (F + 30 L) / (F + 15 L), "
                 "at least 1.8x only while F <= 3.75 L")
        if fit:
            bound += ("; the fixed part reads the weights of "
                      f"{fit['fixed_weights_in_layers']:.1f} layers (the LM head, which the runner already computes "
                      "for the last position only) and measures F = "
                      f"{fit['fixed_ms'] / fit['layer_ms']:.1f} L ({fit['fixed_ms']:.1f} ms + {fit['layer_ms']:.2f} ms "
                      f"per layer{' on the quiet core above' if quiet else ''}), which predicts "
                      f"{fit['predicted_speedup']:.2f}x")
        if fit and fit["fixed_ms"] > 3.75 * fit["layer_ms"]:
            bound += (": 1.8x is out of the fp32 student's reach at batch 1 on a CPU while its fp32 LM head is read "
                      "once a token; with int8 weights (student-15l-int8, the LM head included) it passes.")
        else:
            bound += "."
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
        "`deploy/samples/smollm2-compression-gpu.yaml` holds the recipes of the rows above (a row from a later run: "
        "that run's, below).",
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
        run = new.get("run", {})
        plan, probe = run.get("plan") or {}, run.get("lr_probe") or {}
        how = "`--as-sampled`, the sample's recipe"
        if plan.get("rerun"):
            how = (f"`--rerun`: the recovery's learning rate probed, then {plan['recovery_steps']} steps sized to its "
                   "budget, the recipe the sample now holds")
        p_old, p_new = old.get("pruning") or {}, new.get("pruning") or {}
        line = (f"{old['name']}: this row is from a second run ({run.get('date', '?')}, {how}, "
                f"{run.get('elapsed_seconds', 0):.0f} s in all). The first run's recipe "
                f"({old['compression'].get('pruning', {}).get('recoverySteps')} recovery steps, "
                f"{old['training_tokens'] / 1e6:.1f} M tokens, a quarter corpus and three quarters teacher-written "
                f"text) reached {old['perplexity_increase']:+.1%} perplexity ({old['status']}) and "
                f"{old['agreement']:.3f} agreement.")
        if probe:
            res = {k: v for k, v in probe["results"].items() if k != "before"}
            line += (f" Learning-rate probe: {probe['steps']} recovery steps from the same pruned model at each rate, "
                     "then KL to the full model on held-out calibration text (before any recovery: "
                     f"{probe['results']['before']['held_out_kl']:.3f}): "
                     + "; ".join(f"{v['learning_rate']:g} -> {v['held_out_kl']:.3f}" for v in res.values())
                     + f"; chosen {probe['chosen']:g}.")
        if not new.get("training_text"):
            passes = (f", {new['training_tokens'] / train_tokens:.0f} passes over its {train_tokens / 1e6:.2f} M"
                      if train_tokens else "")
            line += (f" The second run trained on the corpus' training slice alone "
                     f"({new['training_tokens'] / 1e6:.1f} M tokens{passes}, KL to the full model as the loss, the "
                     "mask held fixed): the evaluation corpus' own domain (disjoint blocks), where the gate reads "
                     "perplexity, so read this row's change with that in mind; agreement on the general-English "
                     "prompts went "
                     f"{old['agreement']:.3f} -> {new['agreement']:.3f}, and the recovery's KL on its batches "
                     f"{p_new.get('recovery_first_loss', math.nan):.3f} -> "
                     f"{p_new.get('recovery_last_loss', math.nan):.3f}"
                     f" (first run: {p_old.get('recovery_first_loss', math.nan):.3f} -> "
                     f"{p_old.get('recovery_last_loss', math.nan):.3f}).")
        if p_new.get("pattern_violations") is not None:
            line += (" The reloaded artifact holds the 2:4 pattern in every group of 4 weights"
                     if p_new["pattern_violations"] == 0 else
                     f" The reloaded artifact breaks the 2:4 pattern in {p_new['pattern_violations']} groups") + "."
        notes.append(line)
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
        *([f"On this machine {_fit_line(measured['cost_fit'])}.", ""] if measured.get("cost_fit") else []),
        *([*_quiet_lines(quiet), ""] if quiet else []),
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
    speeds, fit = cpu_speeds(jobs["rows"], speed_tokens)
    measured = {"machine": f"{report.cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}",
                "threads": threads, "speed_tokens": speed_tokens, "rounds": ROUNDS,
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "load_average_before": [round(v, 2) for v in load_before],
                "load_average_after": [round(v, 2) for v in os.getloadavg()], "speeds": speeds, "cost_fit": fit}
    (results_dir / SPEEDS_FILE).write_text(json.dumps(measured, indent=2) + "\n")
    return measured


QUIET_FILE = "cpu-speeds-quiet-core.json"


def measure_quiet_core(
    results_dir: Path, out: Path, variants: list[str], speed_tokens: int, note: str
) -> dict[str, Any]:
    """The speeds of `variants` against the full model on this process's one CPU (run it pinned to an idle core,
    `taskset -c N`): both clocks on one thread, where other work on the machine disturbs neither much."""
    jobs, _ = load(results_dir)
    if jobs is None:
        raise SystemExit(f"no GPU results in {results_dir}")
    rows = [r for r in jobs["rows"] if r["name"] in variants]
    if not rows:
        raise SystemExit(f"none of {variants} is a row of the results in {results_dir}")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    wall, cpu, parameters = _speeds(rows, speed_tokens, ROUNDS)
    measured = {
        "machine": f"{report.cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "cores": sorted(os.sched_getaffinity(0)), "threads": 1, "speed_tokens": speed_tokens, "rounds": ROUNDS,
        "note": note, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "speeds": {name: {"wall": wall[name], "cpu_time": cpu[name], "wall_vs_full": wall[name] / wall[FULL],
                          "cpu_time_vs_full": cpu[name] / cpu[FULL]} for name in [FULL, ONE_LAYER, *variants]
                   if name in wall},
        "cost_fit": cost_fit(cpu, parameters),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(measured, indent=2) + "\n")
    return measured


def _fit_line(fit: dict[str, float] | None) -> str:
    if not fit:
        return ""
    return (f"a token's CPU time fits {fit['fixed_ms']:.1f} ms fixed (embedding, final norm, the 49,152 x 576 LM "
            f"head) + {fit['layer_ms']:.2f} ms per layer, which predicts "
            f"{fit['predicted_speedup']:.2f}x for a {fit['layers']}-layer student; the weights a token reads shrink "
            f"{fit['weights_ratio']:.3f}x")


def _quiet_lines(quiet: dict[str, Any] | None) -> list[str]:
    if not quiet:
        return []
    lines = [f"CPU tokens/s on one pinned core of the GPU machine's host ({quiet['machine']}; core "
             f"{', '.join(map(str, quiet['cores']))}, one torch thread, {quiet['date']}; {quiet['note']}; load average "
             f"{', '.join(map(str, quiet['load_average_before']))} before and "
             f"{', '.join(map(str, quiet['load_average_after']))} after): random weights of each shape as above, "
             f"batch 1, greedy, {quiet['speed_tokens']} new tokens, best of {quiet['rounds']} interleaved rounds. "
             "An extra row beside this machine's, not the one the goals are judged on above.", "",
             "| model | tok/s per CPU-second | vs full | wall-clock tok/s | vs full |", "|---|---:|---:|---:|---:|"]
    for name, r in quiet["speeds"].items():
        lines.append(f"| {name} | {r['cpu_time']:.1f} | {r['cpu_time_vs_full']:.2f}x | {r['wall']:.1f} | "
                     f"{r['wall_vs_full']:.2f}x |")
    lines += ["", f"On that core {_fit_line(quiet.get('cost_fit'))}."]
    return lines


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
    quiet_path = results_dir / QUIET_FILE
    quiet = json.loads(quiet_path.read_text()) if quiet_path.is_file() else None
    train_tokens = corpus.load_slices(bundled_tokenizer()).train_blocks.numel()
    return render(jobs, sparse, measured, quiet, train_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet-core", type=Path, required=True, metavar="OUT",
                        help=f"measure on this process's one core into OUT (kept as {QUIET_FILE} beside the results)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--variants", nargs="+", default=["student-15l", "student-15l-int8"])
    parser.add_argument("--speed-tokens", type=int, default=32, help="bench_compress.EVALUATION's speedTokens")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = parser.parse_args(argv)
    measured = measure_quiet_core(args.results, args.quiet_core, args.variants, args.speed_tokens, args.note)
    print(json.dumps({k: measured[k] for k in ("machine", "cores", "speeds", "cost_fit")}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
