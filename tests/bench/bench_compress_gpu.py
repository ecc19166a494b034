"""The GPU rows of `make bench-compress`: the GPU sample's variants trained on one CUDA device within a time budget.

Two modes, each writing one JSON file under `--out` (rewritten after every stage, so a run cut short still
reports what it did); `bench_compress.py --gpu-json DIR` renders them beside the CPU rows, with the CPU
tokens/s of each variant's architecture measured on that machine.

- `--mode sparse` (random weights of SmolLM2-135M's shapes; needs no model file): dense against 2:4
  semi-structured sparse bf16 matmuls at decode and prefill sizes, the same for a whole 2:4-pruned model's
  forward passes, and a smoke run of the CUDA training paths (distillation, Wanda, recovery, sampling) with
  their step times.
- `--mode jobs` (the real weights): measures the teacher's generation rate and the training step times in its
  first seconds, compares the student's starting layers (evenly spaced against the most important ones) over
  a short run each, sizes the generated text and the step counts so that the whole run fits `--budget`
  seconds, then runs each variant's compression Job (`stratus_workers.compress.job.compress`, as a Job would).

- `--rerun VARIANT` (a pruned variant of the sample, the real weights): prunes once, probes the recovery's learning
  rates (`--probe-lr`, a short run from the same pruned model each, judged by KL to the full model on held-out
  calibration text), sizes the recovery steps to what is left of `--budget` from the probes' step time, then runs
  the variant's Job with that recipe into gpu-compress-VARIANT.json (whose row replaces the main run's).

    python tests/bench/bench_compress_gpu.py --mode sparse --out DIR
    python tests/bench/bench_compress_gpu.py --mode jobs --out DIR --budget 400
    python tests/bench/bench_compress_gpu.py --mode jobs --out DIR --dry-run --source TINY_MODEL_DIR --device cpu
    python tests/bench/bench_compress_gpu.py --rerun wanda-2-4 --out DIR --budget 250
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from stratus_workers.compress import corpus, teacher_text, training
from stratus_workers.compress.distill import distill
from stratus_workers.compress.job import compress, parse_spec
from stratus_workers.compress.prune import prune_model, recover
from stratus_workers.compress.spec import CompressionJobSpec, Distillation, Pruning, TrainingText
from stratus_workers.compress.training import TrainingBatches
from stratus_workers.models.loader import load_model
from stratus_workers.observability import setup_logging

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "deploy" / "samples" / "smollm2-compression-gpu.yaml"
RESULTS = {"jobs": "gpu-compress.json", "sparse": "gpu-sparse.json"}
# The same evaluation as the CPU rows (bench_compress.EVALUATION), so the rows compare.
EVALUATION = {"perplexitySamples": 16, "sequenceLength": 256, "speedTokens": 32, "agreementPrompts": 16,
              "agreementTokens": 16}
# Seconds kept back from training for what every Job does besides (load, Wanda calibration, save, reload, CPU
# evaluation: ~15 s each on the H200 machine's 16 cores) and a margin.
RESERVE_PER_JOB = 18.0
RESERVE_FIXED = 20.0
# Shares of the training time left after the probes: the student has the most to learn.
SHARES = {"generate": 0.14, "distill": 0.62, "wanda-50": 0.12, "wanda-2-4": 0.12}
PROBE_STEPS = 40
# Step times assumed where their measurement failed (an H200's order of magnitude for the sample's batches).
FALLBACK_STEP_SECONDS = 0.25
# A Job is not started once the run is this far past its budget (the device call would be killed).
OVERRUN_SECONDS = 30.0
# --rerun: steps of each learning-rate probe, and seconds a pruned variant's Job spends besides its recovery once the
# model is converted and the corpus tokenised (teacher to the GPU, Wanda calibration, save, reload, CPU evaluation of
# the variant and of the full model: ~20 s on the H200 machine) with a margin.
RERUN_PROBE_STEPS = 40
RERUN_JOB_RESERVE = 40.0
DRY_RUN = {"generationBatchSize": 8, "generatedLength": 64, "batchSize": 4, "sequenceLength": 64,
           "recoveryBatchSize": 4, "recoverySequenceLength": 64}
DRY_EVALUATION = {"perplexitySamples": 4, "sequenceLength": 64, "speedTokens": 8, "agreementPrompts": 4,
                  "agreementTokens": 8}


class Run:
    """The results document, written to disk after every change."""

    def __init__(self, out: Path, mode: str, file: str | None = None) -> None:
        self.path = out / (file or RESULTS[mode])
        self.doc: dict[str, Any] = {"rows": [], "stages": {}, "errors": []}
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        self.doc["elapsed_seconds"] = round(self.elapsed(), 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=float))
        os.replace(tmp, self.path)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        print(f"[gpu-bench] {name} ... (at {self.elapsed():.0f} s)", file=sys.stderr, flush=True)
        try:
            value = fn()
        except Exception as exc:  # one failed stage must not cost the others' figures
            traceback.print_exc()
            self.doc["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            value = None
        self.doc["stages"][name] = round(time.perf_counter() - t0, 1)
        self.save()
        return value


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version(),
           "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": training.describe_device(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    return env


def _variants(sample: Path, dry_run: bool) -> dict[str, dict[str, Any]]:
    manifest = yaml.safe_load(sample.read_text())
    out = {}
    for v in manifest["spec"]["edge"]["variants"]:
        compression = copy.deepcopy(v.get("compression", {}))
        if dry_run:
            text = compression.get("trainingText", {})
            for key in ("generationBatchSize", "generatedLength"):
                if key in text:
                    text[key] = DRY_RUN[key]
            for part in ("distillation", "pruning"):
                for key in ("batchSize", "sequenceLength", "recoveryBatchSize", "recoverySequenceLength"):
                    if key in compression.get(part, {}):
                        compression[part][key] = DRY_RUN[key]
            if "distillation" in compression:
                compression["distillation"]["studentLayers"] = 1  # the tiny model has 2 layers
        out[v["name"]] = {"name": v["name"], "compression": compression, "gate": v.get("gate", {})}
    return out


def _spec(variant: dict[str, Any], source: str, evaluation: dict[str, Any]) -> CompressionJobSpec:
    return parse_spec({**variant, "modelSource": source, "evaluation": evaluation})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _held_out_kd(student: Any, teacher: Any, sequences: torch.Tensor, device: torch.device) -> float:
    """KL(teacher ‖ student) per token on sequences no training run saw (the calibration slice)."""
    total = 0.0
    for start in range(0, sequences.shape[0], 4):
        batch = sequences[start : start + 4].to(device)
        with training.autocast(device):
            t = teacher(input_ids=batch, use_cache=False).logits
            s = student(input_ids=batch, use_cache=False).logits
        total += float(training.kd_loss(s, t, 1.0)) * batch.shape[0]
    return total / sequences.shape[0]


def _bench(fn: Callable[[], Any], device: torch.device, repeats: int = 50) -> float:
    """Median milliseconds of `fn` (CUDA events around each call after a warm-up; host clock on the CPU)."""
    for _ in range(5):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    """The weight with the 2 smallest of every 4 consecutive inputs zeroed (a valid 2:4 pattern)."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape_as(weight)


def sparse_matmuls(device: torch.device) -> dict[str, Any]:
    """Dense against 2:4 semi-structured sparse bf16 linears: SmolLM2's shapes and one large one, decode and prefill."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    shapes = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
              "down 576x1536": (576, 1536), "large 8192x8192": (8192, 8192)}
    tokens = {"decode (1 token)": 1, "decode (batch 32)": 32, "prefill (4096 tokens)": 4096}
    rows = []
    for backend in ("cusparselt", "cutlass"):
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
        for shape_name, (out_f, in_f) in shapes.items():
            gen = torch.Generator(device=device).manual_seed(0)
            weight = _two_four(torch.randn(out_f, in_f, device=device, generator=gen, dtype=torch.bfloat16))
            try:
                sparse = to_sparse_semi_structured(weight)
            except Exception as exc:
                rows.append({"backend": backend, "shape": shape_name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            for token_name, m in tokens.items():
                x = torch.randn(m, in_f, device=device, generator=gen, dtype=torch.bfloat16)
                row: dict[str, Any] = {"backend": backend, "shape": shape_name, "tokens": token_name}
                try:
                    dense_out = torch.nn.functional.linear(x, weight)
                    sparse_out = torch.nn.functional.linear(x, sparse)
                    row["relative_error"] = float((sparse_out.float() - dense_out.float()).norm()
                                                  / dense_out.float().norm())
                    row["dense_ms"] = _bench(lambda x=x, w=weight: torch.nn.functional.linear(x, w), device)
                    row["sparse_ms"] = _bench(lambda x=x, s=sparse: torch.nn.functional.linear(x, s), device)
                    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return {"rows": rows}


@torch.no_grad()
def sparse_model(model: Any, device: torch.device) -> dict[str, Any]:
    """A 2:4-pruned model on the GPU in bf16: dense kernels against its linears as semi-structured tensors."""
    from torch.sparse import to_sparse_semi_structured

    from stratus_workers.models.quantized import target_linears

    model = model.to(device=device, dtype=torch.bfloat16).eval()
    for _, linear in target_linears(model):
        linear.weight.data = _two_four(linear.weight.data)
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    inputs = {"decode step, batch 1 (no cache)": torch.randint(0, vocab, (1, 1), generator=gen),
              "decode step, batch 32 (no cache)": torch.randint(0, vocab, (32, 1), generator=gen),
              "prefill (8 x 512 tokens)": torch.randint(0, vocab, (8, 512), generator=gen)}
    out: dict[str, Any] = {}
    dense_logits = {}
    for name, ids in inputs.items():
        ids = ids.to(device)
        dense_logits[name] = model(input_ids=ids, use_cache=False).logits.float()
        out[name] = {"dense_ms": _bench(lambda ids=ids: model(input_ids=ids, use_cache=False), device, 20)}
    for _, linear in target_linears(model):
        linear.weight = torch.nn.Parameter(to_sparse_semi_structured(linear.weight.data), requires_grad=False)
    for name, ids in inputs.items():
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        out[name]["relative_error"] = float((logits - dense_logits[name]).norm() / dense_logits[name].norm())
        out[name]["sparse_ms"] = _bench(lambda ids=ids: model(input_ids=ids, use_cache=False), device, 20)
        out[name]["speedup"] = out[name]["dense_ms"] / out[name]["sparse_ms"]
    return out


def _synthetic_corpus(vocab: int) -> corpus.CorpusSlices:
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, vocab, (96, corpus.BLOCK_TOKENS), generator=gen)
    return corpus.CorpusSlices(eval_blocks=blocks[:8], calibration_blocks=blocks[8:48], train_blocks=blocks[48:])


def cuda_smoke(device: torch.device, sample: Path, dry_run: bool) -> dict[str, Any]:
    """The CUDA training paths on random weights of the real shapes, with the sample's batch sizes: step times."""
    from stratus_workers.models.tiny import SMOLLM2_135M, TINY, random_llama

    variants = _variants(sample, dry_run=dry_run)
    d_spec = Distillation.model_validate(variants["student-15l"]["compression"]["distillation"])
    p_spec = Pruning.model_validate(variants["wanda-50"]["compression"]["pruning"])
    text = TrainingText.model_validate(variants["student-15l"]["compression"]["trainingText"])
    teacher = random_llama(TINY if dry_run else SMOLLM2_135M).to(device)
    data = TrainingBatches(_synthetic_corpus(teacher.config.vocab_size))
    out: dict[str, Any] = {}
    work = Path("/tmp/bench-compress-gpu-smoke")
    shutil.rmtree(work, ignore_errors=True)
    for steps in (3, 8):  # the difference is the steady step time, without the first step's warm-up
        spec = d_spec.model_copy(update={"steps": steps, "checkpoint_every": 10**6, "layer_selection": "importance"})
        _sync(device)
        t0 = time.perf_counter()
        _, figures = distill(teacher, spec, data, work_dir=work / str(steps), source="random", seed=0, device=device,
                             calibration=data.corpus.calibration_blocks[:8, :256])
        _sync(device)
        out[f"distill_{steps}_seconds"] = time.perf_counter() - t0
    out["distill_step_seconds"] = (out["distill_8_seconds"] - out["distill_3_seconds"]) / 5
    out["distill_tokens_per_second"] = d_spec.batch_size * d_spec.sequence_length / out["distill_step_seconds"]
    out["layers"] = figures["teacher_layers_kept"]
    pruned = copy.deepcopy(teacher)
    masks = prune_model(pruned, p_spec, data.corpus, 256)
    for steps in (3, 8):
        r_spec = p_spec.model_copy(update={"recovery_steps": steps})
        _sync(device)
        t0 = time.perf_counter()
        recover(pruned, teacher, masks, r_spec, data, 0, device)
        _sync(device)
        out[f"recovery_{steps}_seconds"] = time.perf_counter() - t0
    out["recovery_step_seconds"] = (out["recovery_8_seconds"] - out["recovery_3_seconds"]) / 5
    out["recovery_tokens_per_second"] = p_spec.recovery_batch_size * p_spec.recovery_sequence_length / out[
        "recovery_step_seconds"]
    out["sparsity_kept"] = all(bool((m.weight[~masks[n]] == 0).all()) for n, m in target_linears_of(pruned))
    ids = torch.randint(3, 1000, (text.generation_batch_size, 32), device=device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), training.autocast(device):
        generated = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=True,
                                     temperature=1.0, top_p=text.generation_top_p, top_k=0, pad_token_id=2,
                                     eos_token_id=2)
    _sync(device)
    seconds = time.perf_counter() - t0
    out["generation_rows"] = int(generated.shape[0])
    out["generation_new_tokens_per_second"] = generated.shape[0] * (generated.shape[1] - 32) / seconds
    return out


def target_linears_of(model: Any) -> list[tuple[str, Any]]:
    from stratus_workers.models.quantized import target_linears

    return list(target_linears(model))


def sparse_main(args: argparse.Namespace, run: Run, device: torch.device) -> int:
    from stratus_workers.models.tiny import SMOLLM2_135M, TINY, random_llama

    run.doc["smoke"] = run.stage("cuda-smoke", lambda: cuda_smoke(device, args.sample, args.dry_run))
    run.doc["sparse_matmuls"] = run.stage("sparse-matmuls", lambda: sparse_matmuls(device))
    arch = TINY if args.dry_run else SMOLLM2_135M
    run.doc["sparse_model"] = run.stage("sparse-model", lambda: sparse_model(random_llama(arch), device))
    run.save()
    print(json.dumps({"smoke": run.doc["smoke"], "errors": run.doc["errors"]}, default=float))
    for row in (run.doc["sparse_matmuls"] or {}).get("rows", []):
        print(json.dumps(row, default=float))
    print(json.dumps(run.doc["sparse_model"], default=float))
    return 0 if not run.doc["errors"] else 1


def _run_job(run: Run, spec: CompressionJobSpec, root: Path, work: Path, device: torch.device) -> None:
    """One variant's compression Job, as the operator would run it (the same function); its row into the results."""
    out = root / "artifacts" / spec.name

    def job() -> dict[str, Any]:
        t0 = time.perf_counter()
        result = compress(spec, out, work_dir=work, device=device)
        f = result.manifest["figures"]
        return {
            "name": spec.name, "recipe": spec.compression.summary, "status": result.summary.status,
            "reasons": result.summary.reasons, "seconds": round(time.perf_counter() - t0, 1),
            "job_seconds": result.summary.seconds, "device": f["device"], "speed_device": f["speed_device"],
            "training_tokens": f["training_tokens"], "sparsity": f.get("pruning", {}).get("sparsity"),
            "distillation": f.get("distillation"), "pruning": f.get("pruning"),
            "training_text": f.get("training_text"), "stages": result.manifest["stages"],
            "gate": spec.gate.model_dump(by_alias=True, exclude_none=True),
            "compression": spec.compression.model_dump(by_alias=True, exclude_none=True),
            **{k: f[k] for k in ("bytes", "size_ratio", "perplexity", "full_perplexity", "perplexity_increase",
                                 "tokens_per_second", "full_tokens_per_second", "speedup", "agreement", "layers")},
        }

    row = run.stage(f"job-{spec.name}", job)
    if row is not None:
        run.doc["rows"].append(row)
        brief = {k: row[k] for k in ("perplexity_increase", "agreement", "status", "training_tokens", "seconds")}
        print(f"[gpu-bench] {spec.name}: {json.dumps(brief)}", file=sys.stderr, flush=True)
        run.save()


def _probe_learning_rates(full: Any, p_spec: Pruning, slices: corpus.CorpusSlices, device: torch.device,
                          rates: list[float], steps: int, calibration_length: int) -> dict[str, Any]:
    """Prune once; from that model, `steps` recovery steps at each rate, then KL to the full model on held-out
    calibration text (which Wanda reads for its activation norms and no recovery trains on)."""
    teacher = copy.deepcopy(full).to(device).eval()
    pruned = copy.deepcopy(teacher)
    data = TrainingBatches(slices)
    masks = prune_model(pruned, p_spec, slices, calibration_length)
    held_out = slices.sequences("calibration", 8, min(256, p_spec.recovery_sequence_length), field="calibration")
    results: dict[str, Any] = {"before": {"held_out_kl": _held_out_kd(pruned, teacher, held_out, device)}}
    for lr in rates:
        student = copy.deepcopy(pruned)
        spec = p_spec.model_copy(update={"recovery_steps": steps, "recovery_learning_rate": lr,
                                         "recovery_warmup_steps": steps // 6})
        _sync(device)
        t0 = time.perf_counter()
        figures = recover(student, teacher, masks, spec, data, 0, device)
        _sync(device)
        seconds = time.perf_counter() - t0
        results[f"{lr:g}"] = {"learning_rate": lr, "seconds": round(seconds, 2), "step_seconds": seconds / steps,
                              "last_loss": figures["recovery_last_loss"],
                              "held_out_kl": _held_out_kd(student, teacher, held_out, device)}
        del student
    return results


def rerun_main(args: argparse.Namespace, run: Run, device: torch.device, evaluation: dict[str, Any]) -> int:
    """One pruned variant again: its recovery's learning rate probed, its steps sized to the budget, then its Job."""
    variant = copy.deepcopy(_variants(args.sample, args.dry_run)[args.rerun])
    recipe = variant["compression"]
    if "pruning" not in recipe or "distillation" in recipe:
        raise SystemExit(f"--rerun: {args.rerun} is not a pruned variant of the full model in {args.sample}")
    if recipe.get("trainingText", {}).get("generatedSequences", 0):
        raise SystemExit(f"--rerun: {args.rerun} asks for generated text; the probes train on the corpus alone, so "
                         "set its trainingText.generatedSequences to 0 (or run it with --as-sampled)")
    p_spec = Pruning.model_validate(recipe["pruning"])
    loaded = run.stage("load-model", lambda: load_model(args.source, dtype="float32", device="cpu"))
    if loaded is None:
        return 1
    slices = corpus.load_slices(loaded.tokenizer)
    probe_steps = 3 if args.dry_run else RERUN_PROBE_STEPS
    probes = run.stage("probe-learning-rate", lambda: _probe_learning_rates(
        loaded.model, p_spec, slices, device, args.probe_lr, probe_steps, evaluation["sequenceLength"]))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probes' models are gone; the Job makes its own
    lr, step_seconds = p_spec.recovery_learning_rate, FALLBACK_STEP_SECONDS
    if probes:
        tried = {k: v for k, v in probes.items() if k != "before"}
        lr = min(tried.values(), key=lambda v: v["held_out_kl"])["learning_rate"]
        step_seconds = list(tried.values())[-1]["step_seconds"]  # the last probe's: CUDA's warm-up is behind it
        run.doc["lr_probe"] = {"steps": probe_steps, "tokens_each": probe_steps * p_spec.recovery_batch_size
                               * p_spec.recovery_sequence_length, "results": probes, "chosen": lr}
    left = args.budget - run.elapsed() - RERUN_JOB_RESERVE
    steps = max(10, math.floor(left / step_seconds))
    recipe["pruning"].update(recoverySteps=steps, recoveryLearningRate=lr)
    run.doc["plan"] = {"rerun": args.rerun, "recovery_steps": steps, "recovery_learning_rate": lr,
                       "recovery_step_seconds": round(step_seconds, 4), "training_seconds": round(left, 1)}
    run.save()
    print(f"[gpu-bench] plan: {json.dumps(run.doc['plan'])}", file=sys.stderr, flush=True)
    _run_job(run, _spec(variant, args.source, evaluation), args.work, args.work / "work", device)
    return _finish(run, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["jobs", "sparse"], default="jobs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--source", default="bundled://smollm2-135m-instruct")
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-compress-gpu"))
    parser.add_argument("--dry-run", action="store_true", help="small batches and evaluation: a check of the script")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts under --work")
    parser.add_argument("--as-sampled", nargs="+", metavar="VARIANT",
                        help="run these variants exactly as the sample states them (no probes, no sizing)")
    parser.add_argument("--rerun", metavar="VARIANT",
                        help="one pruned variant: learning rate probed, recovery steps sized to --budget")
    parser.add_argument("--probe-lr", type=float, nargs="+", default=[1e-4, 3e-4, 6e-4],
                        help="--rerun: the recovery learning rates to probe")
    args = parser.parse_args(argv)
    setup_logging("info", "json")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.mode, f"gpu-compress-{args.rerun}.json" if args.rerun else None)
    device = training.resolve_device(args.device)
    if args.mode == "sparse":
        run.doc["environment"] = _environment(device)
        return sparse_main(args, run, device)
    evaluation = DRY_EVALUATION if args.dry_run else EVALUATION
    run.doc.update(environment=_environment(device), budget_seconds=args.budget, source=args.source,
                   sample=str(args.sample.relative_to(ROOT) if args.sample.is_relative_to(ROOT) else args.sample),
                   evaluation=evaluation, dry_run=args.dry_run)
    run.save()
    shutil.rmtree(args.work, ignore_errors=True)
    if args.rerun:
        return rerun_main(args, run, device, evaluation)
    work = args.work / "work"  # shared by every Job: the generated text and the student's checkpoint
    variants = _variants(args.sample, args.dry_run)
    if args.as_sampled:
        run.doc["plan"] = {"as_sampled": args.as_sampled}
        for name in args.as_sampled:
            _run_job(run, _spec(copy.deepcopy(variants[name]), args.source, evaluation), args.work, work, device)
        return _finish(run, args)

    loaded = run.stage("load-model", lambda: load_model(args.source, dtype="float32", device="cpu"))
    if loaded is None:
        return 1
    full, tokenizer = loaded.model, loaded.tokenizer
    slices = corpus.load_slices(tokenizer)
    teacher = copy.deepcopy(full).to(device).eval()
    student_recipe = variants["student-15l"]["compression"]
    text = TrainingText.model_validate(student_recipe.get("trainingText", {}))
    d_spec = Distillation.model_validate(student_recipe["distillation"])
    p_spec = Pruning.model_validate(variants["wanda-50"]["compression"]["pruning"])

    # 1. The teacher's generation rate: one chunk, written where the student's Job will find and reuse it.
    def one_chunk() -> dict[str, Any]:
        spec = text.model_copy(update={"generated_sequences": text.generation_batch_size})
        _sync(device)
        t0 = time.perf_counter()
        stream, figures = teacher_text.generate_text(teacher, tokenizer, spec, work_dir=work, source=args.source,
                                                     seed=0, device=device)
        _sync(device)
        seconds = time.perf_counter() - t0
        return {"stream": stream, "seconds_per_chunk": seconds, "tokens_per_chunk": int(stream.numel()),
                "figures": figures}

    chunk = run.stage("time-generation", one_chunk)
    if chunk is not None:
        run.doc["generation"] = {k: v for k, v in chunk.items() if k != "stream"}
        data = TrainingBatches(slices, chunk["stream"], text.corpus_share)
    else:  # without the teacher's text the Jobs still train, on the corpus alone (the error is reported)
        data = TrainingBatches(slices)
    calibration = slices.sequences("calibration", 8, min(256, d_spec.sequence_length), field="calibration")

    # 2. Which teacher layers the student starts from: the same short run from each, judged on held-out text.
    def probe() -> dict[str, Any]:
        results: dict[str, Any] = {}
        for selection in ("even", "importance"):
            spec = d_spec.model_copy(update={"steps": PROBE_STEPS, "layer_selection": selection,
                                             "warmup_steps": PROBE_STEPS // 6, "checkpoint_every": 10**6})
            _sync(device)
            t0 = time.perf_counter()
            student, figures = distill(teacher, spec, data, work_dir=args.work / f"probe-{selection}",
                                       source=args.source, seed=0, device=device, calibration=calibration)
            _sync(device)
            seconds = time.perf_counter() - t0
            results[selection] = {"layers": figures["teacher_layers_kept"], "seconds": round(seconds, 2),
                                  "step_seconds": seconds / PROBE_STEPS, "last_loss": figures["last_loss"],
                                  "held_out_kl": _held_out_kd(student, teacher, calibration, device)}
            del student
        return results

    probes = run.stage("probe-layer-selection", probe)
    if probes:
        chosen = min(probes, key=lambda k: probes[k]["held_out_kl"])
        run.doc["layer_probe"] = {"steps": PROBE_STEPS, "tokens_each": PROBE_STEPS * d_spec.batch_size *
                                  d_spec.sequence_length, "results": probes, "chosen": chosen}
        distill_step = max(p["step_seconds"] for p in probes.values())
    else:
        chosen, distill_step = d_spec.layer_selection, FALLBACK_STEP_SECONDS

    # 3. A recovery step of the full-depth pruned model.
    def recovery_step() -> float:
        pruned = copy.deepcopy(teacher)
        spec = p_spec.model_copy(update={"recovery_steps": 10})
        masks = prune_model(pruned, spec, slices, evaluation["sequenceLength"])
        _sync(device)
        t0 = time.perf_counter()
        recover(pruned, teacher, masks, spec, data, 0, device)
        _sync(device)
        return (time.perf_counter() - t0) / 10

    recovery_seconds = run.stage("time-recovery", recovery_step) or FALLBACK_STEP_SECONDS

    # 4. Size the rest from the measured rates so that the run ends inside the budget.
    jobs = ["student-15l", "student-15l-int8", "wanda-50", "wanda-2-4"]
    left = args.budget - run.elapsed() - RESERVE_FIXED - RESERVE_PER_JOB * len(jobs)
    chunks = 1 + max(0, math.floor(SHARES["generate"] * left / chunk["seconds_per_chunk"])) if chunk else 0
    plan = {
        "training_seconds": round(left, 1),
        "generated_sequences": chunks * text.generation_batch_size,
        "distill_steps": max(PROBE_STEPS, math.floor(SHARES["distill"] * left / distill_step)),
        "recovery_steps": {n: max(10, math.floor(SHARES[n] * left / recovery_seconds)) for n in ("wanda-50",
                                                                                                  "wanda-2-4")},
        "distill_step_seconds": round(distill_step, 4),
        "recovery_step_seconds": round(recovery_seconds, 4),
        "layer_selection": chosen,
    }
    run.doc["plan"] = plan
    run.save()
    print(f"[gpu-bench] plan: {json.dumps(plan)}", file=sys.stderr, flush=True)

    # 5. The Jobs, as the operator would run them (the same function), sharing the work directory.
    for name in jobs:
        if run.elapsed() > args.budget + OVERRUN_SECONDS:
            run.doc["errors"].append(f"job-{name}: skipped, the budget is spent ({run.elapsed():.0f} s)")
            continue
        variant = copy.deepcopy(variants[name])
        recipe = variant["compression"]
        recipe.setdefault("trainingText", {})["generatedSequences"] = plan["generated_sequences"]
        if "distillation" in recipe:
            recipe["distillation"].update(steps=plan["distill_steps"], layerSelection=chosen)
        if "pruning" in recipe:
            recipe["pruning"]["recoverySteps"] = plan["recovery_steps"][name]
        _run_job(run, _spec(variant, args.source, evaluation), args.work, work, device)

    return _finish(run, args)


def _finish(run: Run, args: argparse.Namespace) -> int:
    run.save()
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps({"rows": [{k: r[k] for k in ("name", "perplexity_increase", "agreement", "status")}
                               for r in run.doc["rows"]], "errors": run.doc["errors"],
                      "elapsed": round(run.elapsed())}, default=float))
    return 0 if not run.doc["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
