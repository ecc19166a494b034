"""The compression Job: validate the spec, distill → prune → quantize, save, reload, evaluate, gate, publish."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from stratus_workers.compress import corpus, evaluate, teacher_text, to_gguf, training
from stratus_workers.compress.distill import distill
from stratus_workers.compress.prune import check_pattern, measured_sparsity, pattern_violations, prune_model, recover
from stratus_workers.compress.quantize import check_group_size, quantize_model
from stratus_workers.compress.spec import CompressionJobSpec, CompressionStatus, CompressionSummary, ExitCode
from stratus_workers.compress.training import TrainingBatches
from stratus_workers.models import artifact as artifacts
from stratus_workers.models.files import ARTIFACT_FORMAT
from stratus_workers.models.gguf_artifact import load_gguf_artifact
from stratus_workers.models.loader import cache_dir, load_model
from stratus_workers.runtimes import LLAMACPP_KV_VALUE_BYTES, RUNTIME_LLAMACPP, kv_bytes_per_token

log = logging.getLogger(__name__)

CORPUS_LICENCE = "text: public domain (Bible in Basic English, 1949/1964); package: MIT"
# Calibration text that ranks the teacher's layers for the student (layerSelection importance).
LAYER_CALIBRATION = (8, 256)
# Speed is measured where the variant will run: an edge node's CPU, whatever device trained it.
SPEED_DEVICE = "cpu"


class BadInput(ValueError):
    """The spec or the model is unusable; the message names the field."""


@dataclass
class JobResult:
    """What the Job reports: the exit code and the one-line summary (also the manifest's core)."""

    exit_code: ExitCode
    summary: CompressionSummary
    manifest: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float], **fields: Any) -> Iterator[None]:
    """Log one structured line per stage with its duration."""
    started = time.perf_counter()
    log.info("stage started", extra={"stage": name, **fields})
    try:
        yield
    finally:
        seconds = round(time.perf_counter() - started, 2)
        timings[name] = seconds
        log.info("stage finished", extra={"stage": name, "seconds": seconds, **fields})


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "spec"


def parse_spec(data: Any) -> CompressionJobSpec:
    """Validate a spec document; BadInput names every offending field (camelCase, as in the manifest)."""
    try:
        return CompressionJobSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            got = (
                f" (got {err['input']!r})"
                if err.get("type") != "missing" and not isinstance(err.get("input"), dict)
                else ""
            )
            problems.append(f"{_field_path(err['loc'])}: {err['msg']}{got}")
        raise BadInput("invalid compression spec: " + "; ".join(problems)) from None


def read_spec(path: Path) -> CompressionJobSpec:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"--spec: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"--spec: {path} is not readable JSON ({exc})") from None
    return parse_spec(data)


def _load_full(source: str) -> Any:
    try:
        loaded = load_model(source, dtype="float32", device="cpu")
    except Exception as exc:  # any failure to read the model is the input's fault, reported as such
        raise BadInput(f"modelSource: {exc}") from None
    model = loaded.model
    if not hasattr(model, "model") or not hasattr(model.model, "layers") or not hasattr(model.model, "embed_tokens"):
        raise BadInput(f"modelSource: {source} is a {type(model).__name__}; compression supports Llama-style decoders")
    if loaded.manifest:
        raise BadInput(f"modelSource: {source} is already a compressed artifact; compress the full model instead")
    return loaded


def _validate_against_model(spec: CompressionJobSpec, model: Any, slices: corpus.CorpusSlices) -> None:
    """Checks that need the model or the corpus, done before any long step so bad input fails fast."""
    recipe = spec.compression
    try:
        if recipe.distillation:
            layers = int(model.config.num_hidden_layers)
            if recipe.distillation.student_layers >= layers:
                raise ValueError(
                    f"compression.distillation.studentLayers: {recipe.distillation.student_layers} is not "
                    f"fewer than the model's {layers} layers"
                )
            if recipe.distillation.layer_selection == "importance":
                slices.sequences("calibration", *LAYER_CALIBRATION, field="compression.distillation.layerSelection")
        if recipe.pruning:
            check_pattern(model, recipe.pruning)
            if recipe.pruning.method == "wanda":
                slices.sequences(
                    "calibration",
                    recipe.pruning.calibration_samples,
                    spec.evaluation.sequence_length,
                    field="compression.pruning.calibrationSamples",
                )
        if recipe.quantization and recipe.quantization.method == "int4-weight":
            check_group_size(model, recipe.quantization.group_size)
        if recipe.runtime == RUNTIME_LLAMACPP:
            to_gguf.check_exportable(model)
            to_gguf.check_quantizer()
        slices.sequences(
            "eval",
            spec.evaluation.perplexity_samples,
            spec.evaluation.sequence_length,
            field="evaluation.perplexitySamples",
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def _baseline_key(spec: CompressionJobSpec, tokenizer: Any) -> str:
    ev = spec.evaluation
    parts = [
        spec.model_source,
        ev.perplexity_samples,
        ev.sequence_length,
        ev.agreement_prompts,
        ev.agreement_tokens,
        corpus.CORPUS_NAME,
        len(tokenizer),
        torch.__version__,
        "serving-runner",  # perplexity measured through the serving runner (not model(...)) since GGUF variants
        # The agreement prompts' ids the references continue: another wording or rendering (BOS or not) is
        # another baseline, not a cached one made from other ids.
        hashlib.sha256(json.dumps(evaluate.prompt_ids(tokenizer, ev.agreement_prompts)).encode()).hexdigest(),
    ]
    path = Path(spec.model_source)
    if path.is_dir():  # a local model: its weights' identity is part of the key
        parts += [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.glob("*.safetensors"))]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _full_model_baseline(
    spec: CompressionJobSpec, full: Any, tokenizer: Any, eval_ids: torch.Tensor, timings: dict[str, float]
) -> tuple[float, list[torch.Tensor]]:
    """The full model's perplexity and greedy continuations; cached, as every variant of a model shares them."""
    ev = spec.evaluation
    path = cache_dir() / "baselines" / f"{_baseline_key(spec, tokenizer)}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return float(data["perplexity"]), [torch.tensor(r) for r in data["references"]]
        except (OSError, ValueError, KeyError):
            pass
    with stage("evaluate-full-model", timings):
        ppl = evaluate.perplexity(evaluate.runner_for(full, rows=4, max_len=eval_ids.shape[1]), eval_ids)
        refs = evaluate.greedy_continuations(full, tokenizer, ev.agreement_prompts, ev.agreement_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"perplexity": ppl, "references": [r.tolist() for r in refs]}))
    os.replace(tmp, path)
    return ppl, refs


def gate_reasons(spec: CompressionJobSpec, figures: dict[str, Any]) -> list[str]:
    gate = spec.gate
    reasons = []
    violations = (figures.get("pruning") or {}).get("pattern_violations")
    if violations:  # not a limit anyone sets: a 2:4 variant that is not 2:4 is not what was asked for
        reasons.append(f"the artifact breaks the 2:4 pattern in {violations} groups of 4 weights")
    if gate.max_perplexity_increase is not None and figures["perplexity_increase"] > gate.max_perplexity_increase:
        reasons.append(
            f"perplexity increase {figures['perplexity_increase']:+.2%} exceeds maxPerplexityIncrease "
            f"{gate.max_perplexity_increase:.2%}"
        )
    if gate.min_agreement is not None and figures["agreement"] < gate.min_agreement:
        reasons.append(f"agreement {figures['agreement']:.3f} is below minAgreement {gate.min_agreement:.3f}")
    if gate.max_size_ratio is not None and figures["size_ratio"] > gate.max_size_ratio:
        reasons.append(f"size {figures['size_ratio']:.3f}x fp32 exceeds maxSizeRatio {gate.max_size_ratio:.3f}")
    return reasons


def _stored_values(model: Any) -> int:
    """Weights (codes, floats) in the model, tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel()
    return total


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished artifact into place; an existing one is replaced only once the new one is whole."""
    # mkdtemp and safetensors create owner-only modes; the model server may run as another user.
    tmp.chmod(0o755)
    for item in tmp.iterdir():
        item.chmod(0o644)
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def _needs_training(spec: CompressionJobSpec) -> bool:
    recipe = spec.compression
    return bool(recipe.distillation) or bool(recipe.pruning and recipe.pruning.recovery_steps)


def _training_data(
    spec: CompressionJobSpec, teacher: Any, tokenizer: Any, slices: corpus.CorpusSlices, *, work_dir: Path,
    device: torch.device, timings: dict[str, float], figures: dict[str, Any],
) -> tuple[TrainingBatches, str]:
    """The batches distillation and recovery train on, and a key naming them (for checkpoint fingerprints)."""
    text = spec.compression.training_text
    if not text.generated_sequences:
        return TrainingBatches(slices), "corpus"
    with stage("generate-text", timings, sequences=text.generated_sequences, length=text.generated_length):
        stream, figures["training_text"] = teacher_text.generate_text(
            teacher, tokenizer, text, work_dir=work_dir, source=spec.model_source, seed=spec.seed, device=device
        )
    data = TrainingBatches(slices, stream, text.corpus_share)
    recipe = spec.compression
    try:
        if recipe.distillation:
            data.check(recipe.distillation.sequence_length, field="compression.distillation.sequenceLength")
        if recipe.pruning and recipe.pruning.recovery_steps:
            data.check(recipe.pruning.recovery_sequence_length, field="compression.pruning.recoverySequenceLength")
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    prompts = teacher_text.prompt_ids(tokenizer)
    key = f"{teacher_text.fingerprint(text, spec.model_source, spec.seed, prompts)}/{text.corpus_share}"
    return data, key


def compress(
    spec: CompressionJobSpec, out: Path, *, work_dir: Path | None = None, device: str | torch.device = "auto"
) -> JobResult:
    """Run one compression Job end to end. Raises BadInput before writing anything when the input is bad.

    Training and calibration run on `device` (auto: CUDA when present); evaluation runs on the CPU, where
    the variant will be served.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out: {out} exists and is not a directory")
    compute = device if isinstance(device, torch.device) else training.resolve_device(device)
    own_work_dir = work_dir is None  # a caller-given work dir is the caller's to keep (shared checkpoints)
    work_dir = Path(work_dir) if work_dir else out.parent / f".{out.name}.work"
    recipe = spec.compression
    torch.manual_seed(spec.seed)
    with stage("load-model", timings, source=spec.model_source, device=training.describe_device(compute)):
        loaded = _load_full(spec.model_source)
    full, tokenizer = loaded.model, loaded.tokenizer
    with stage("load-corpus", timings):
        slices = corpus.load_slices(tokenizer)
    _validate_against_model(spec, full, slices)
    ev = spec.evaluation
    eval_ids = slices.sequences("eval", ev.perplexity_samples, ev.sequence_length, field="evaluation.perplexitySamples")
    figures: dict[str, Any] = {}

    # The full model stays on the CPU for evaluation; a copy on the training device teaches and calibrates.
    teacher = full
    if compute.type != "cpu" and (recipe.distillation or recipe.pruning):
        teacher = copy.deepcopy(full).to(compute)
    data = TrainingBatches(slices)
    data_key = "corpus"
    if _needs_training(spec):
        work_dir.mkdir(parents=True, exist_ok=True)
        data, data_key = _training_data(spec, teacher, tokenizer, slices, work_dir=work_dir, device=compute,
                                        timings=timings, figures=figures)
    training_tokens = 0
    variant: Any
    if recipe.distillation:
        d = recipe.distillation
        calibration = (
            slices.sequences("calibration", *LAYER_CALIBRATION, field="compression.distillation.layerSelection")
            if d.layer_selection == "importance" else None
        )
        with stage("distill", timings, student_layers=d.student_layers, steps=d.steps):
            variant, figures["distillation"] = distill(
                teacher, d, data, work_dir=work_dir, source=spec.model_source, seed=spec.seed, device=compute,
                calibration=calibration, data_key=data_key,
            )
        training_tokens += figures["distillation"]["training_tokens"]
    elif recipe.pruning:
        variant = copy.deepcopy(teacher)
    else:
        variant = copy.deepcopy(full)
    if recipe.pruning:
        p = recipe.pruning
        with stage("prune", timings, method=p.method, pattern=p.pattern, sparsity=p.sparsity):
            masks = prune_model(variant, p, slices, ev.sequence_length)
            pruned: dict[str, Any] = {"sparsity_after_pruning": measured_sparsity(variant)}
        if p.recovery_steps:
            with stage("prune-recovery", timings, steps=p.recovery_steps):
                pruned.update(recover(variant, teacher, masks, p, data, spec.seed, compute))
            training_tokens += pruned["recovery_tokens"]
        del masks
        pruned["sparsity"] = measured_sparsity(variant)
        figures["pruning"] = pruned
    variant = variant.to("cpu")
    del teacher
    if compute.type == "cuda":
        torch.cuda.empty_cache()
    if recipe.quantization and recipe.runtime != RUNTIME_LLAMACPP:  # a GGUF is quantized by llama.cpp on save
        q = recipe.quantization
        with stage("quantize", timings, method=q.method):
            figures["quantization"] = {
                "modules": quantize_model(variant, q.method, q.group_size, q.embedding_bits),
                "embeddings": "int8 per row" if q.embedding_bits == 8 else f"int4, groups of {q.group_size}",
            }
    figures["device"] = training.describe_device(compute)
    figures["speed_device"] = SPEED_DEVICE
    figures["training_tokens"] = training_tokens

    out.parent.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if recipe.runtime == RUNTIME_LLAMACPP and recipe.quantization is not None:
            gguf_type = recipe.quantization.gguf_type
            with stage("save", timings, gguf_type=gguf_type):
                figures["quantization"] = to_gguf.save_gguf_artifact(
                    variant, tokenizer, tmp, gguf_type, work_dir=work_dir, threads=torch.get_num_threads()
                )
        else:
            with stage("save", timings):
                artifacts.save_artifact(
                    variant, tokenizer, tmp, sparse=bool(recipe.pruning) and not recipe.quantization
                )
        del variant
        # Evaluate exactly what the model server will load, with the runner that will serve it.
        with stage("reload", timings):
            reloaded, weights, stored = _reload(tmp, recipe.runtime)
        if recipe.pruning and recipe.pruning.pattern == "2:4" and not recipe.quantization:
            # What the server loads, after recovery moved every kept weight: the pattern must still hold.
            figures["pruning"]["pattern_violations"] = pattern_violations(reloaded)
        full_ppl, references = _full_model_baseline(spec, full, tokenizer, eval_ids, timings)
        with stage("evaluate", timings, runtime=recipe.runtime):
            speed_len = len(evaluate.prompt_ids(tokenizer, 1)[0]) + ev.speed_tokens
            longest = max([eval_ids.shape[1], speed_len, *(len(r) for r in references)])
            variant_runner = evaluate.runner_for(reloaded, rows=4, max_len=longest + 1)
            ppl = evaluate.perplexity(variant_runner, eval_ids)
            agree = evaluate.agreement(variant_runner, references, ev.agreement_tokens)
            full_runner = evaluate.runner_for(full, rows=1, max_len=speed_len + 1)
            speed = evaluate.tokens_per_second(
                {"full": full_runner, "variant": variant_runner}, tokenizer, ev.speed_tokens
            )
            del variant_runner, full_runner
        fp32 = artifacts.fp32_reference_bytes(full)
        figures.update(
            {
                "bytes": weights,
                "fp32_bytes": fp32,
                "size_ratio": weights / fp32,
                "perplexity": ppl,
                "full_perplexity": full_ppl,
                "perplexity_increase": ppl / full_ppl - 1.0,
                "tokens_per_second": speed["variant"],
                "full_tokens_per_second": speed["full"],
                "speedup": speed["variant"] / speed["full"],
                "agreement": agree,
                "parameters": stored,
                "layers": int(reloaded.config.num_hidden_layers),
                # The torch runner keeps its cache in the activations' dtype (fp32 on a CPU), llama.cpp in f16.
                "kv_bytes_per_token": kv_bytes_per_token(
                    reloaded.config, LLAMACPP_KV_VALUE_BYTES if recipe.runtime == RUNTIME_LLAMACPP else 4
                ),
            }
        )
        reasons = gate_reasons(spec, figures)
        status: CompressionStatus = "rejected" if reasons else "accepted"
        figures["artifact_bytes"] = artifacts.directory_bytes(tmp)  # before the manifest: a few KB either way
        manifest = {
            "format": ARTIFACT_FORMAT,
            "name": spec.name,
            "recipe": recipe.summary,
            "runtime": recipe.runtime,
            "status": status,
            "reasons": reasons,
            "source": spec.model_source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "spec": spec.model_dump(mode="json", by_alias=True),
            "figures": figures,
            "evaluation": {
                "corpus": corpus.CORPUS_NAME,
                "corpus_licence": CORPUS_LICENCE,
                "perplexity_tokens": int(eval_ids[:, 1:].numel()),
                "agreement": "teacher-forced top-1 agreement with the full model's greedy continuations of "
                f"{ev.agreement_prompts} fixed prompts, {ev.agreement_tokens} tokens each",
                "tokens_per_second": f"batch 1, greedy, {ev.speed_tokens} new tokens through the {recipe.runtime} "
                f"serving runner, best of 3 interleaved rounds, {torch.get_num_threads()} threads, "
                f"{platform.processor() or platform.machine()}",
            },
            "stages": timings,
            "versions": _versions(recipe.runtime),
        }
        (tmp / artifacts.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=float) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The checkpoints served their purpose once the artifact is whole.
    if own_work_dir:
        with contextlib.suppress(OSError):
            shutil.rmtree(work_dir)
    summary = CompressionSummary(
        name=spec.name,
        status=status,
        reasons=reasons,
        recipe=recipe.summary,
        artifact=str(out),
        size_bytes=weights,
        size_ratio=round(figures["size_ratio"], 4),
        perplexity=round(ppl, 3),
        full_perplexity=round(full_ppl, 3),
        perplexity_increase=round(figures["perplexity_increase"], 4),
        tokens_per_second=round(speed["variant"], 2),
        full_tokens_per_second=round(speed["full"], 2),
        agreement=round(agree, 4),
        sparsity=round(figures["pruning"]["sparsity"], 4) if recipe.pruning else None,
        kv_bytes_per_token=figures["kv_bytes_per_token"],
        seconds=round(time.perf_counter() - started, 1),
        device=figures["device"],
        speed_device=SPEED_DEVICE,
        training_tokens=training_tokens if _needs_training(spec) else None,
    )
    return JobResult(ExitCode.REJECTED if reasons else ExitCode.OK, summary, manifest)


def _reload(directory: Path, runtime: str) -> tuple[Any, int, int]:
    """The artifact as the server will load it, its weights' bytes and its stored values."""
    if runtime == RUNTIME_LLAMACPP:
        gguf, _ = load_gguf_artifact(directory)
        return gguf, gguf.weights_bytes, gguf.stored_values
    model, _ = artifacts.load_artifact(directory, dtype=torch.float32, device=torch.device("cpu"))
    return model, artifacts.weights_bytes(directory), _stored_values(model)


def _versions(runtime: str) -> dict[str, str]:
    import transformers

    versions = {"torch": torch.__version__, "transformers": str(transformers.__version__)}
    if runtime == RUNTIME_LLAMACPP:
        import llama_cpp

        versions["llama_cpp_python"] = str(llama_cpp.__version__)
    return versions
