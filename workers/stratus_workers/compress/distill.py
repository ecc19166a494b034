"""Knowledge distillation into a shallower student built from the teacher's own layers, resumable from checkpoints."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from stratus_workers.compress import training
from stratus_workers.compress.spec import Distillation
from stratus_workers.compress.training import TrainingBatches

log = logging.getLogger(__name__)

CHECKPOINT = "distill-checkpoint.pt"


def student_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always keeping the first and the last (they matter most)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return sorted({round(i * step) for i in range(student_layers)})


def important_layer_indices(importance: list[float], student_layers: int) -> list[int]:
    """The first and the last layer, then the layers that change their input most (ShortGPT's block influence)."""
    n = len(importance)
    if student_layers == 1:
        return [n - 1]
    middle = sorted(range(1, n - 1), key=lambda i: (-importance[i], i))[: student_layers - 2]
    return sorted({0, n - 1, *middle})


@torch.no_grad()
def layer_importance(teacher: Any, calibration: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Per decoder layer: the mean of 1 - cos(input, output) over calibration tokens (0: the layer does nothing)."""
    layers = list(teacher.model.layers)
    totals = [0.0] * len(layers)
    count = 0
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):

        def before(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        def after(_m: nn.Module, _args: tuple[Any, ...], out: Any, i: int = i) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            x, y = inputs.pop(i).float(), hidden.float()
            totals[i] += float((1.0 - nn.functional.cosine_similarity(x, y, dim=-1)).sum())

        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after))
    device = next(teacher.parameters()).device
    try:
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start : start + batch_size].to(device)
            with training.autocast(device):
                teacher(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [t / count for t in totals]


def build_student(teacher: Any, student_layers: int, keep: list[int] | None = None) -> tuple[Any, list[int]]:
    """A LlamaForCausalLM with the teacher's layers `keep` (default: evenly spaced), on the teacher's device."""
    from transformers import AutoModelForCausalLM

    n_teacher = int(teacher.config.num_hidden_layers)
    if student_layers >= n_teacher:
        raise ValueError(
            f"compression.distillation.studentLayers: {student_layers} is not fewer than "
            f"the teacher's {n_teacher} layers"
        )
    keep = list(keep) if keep is not None else student_layer_indices(n_teacher, student_layers)
    if len(keep) != student_layers or sorted(set(keep)) != keep or keep[-1] >= n_teacher:
        raise ValueError(f"student layers {keep} are not {student_layers} distinct teacher layers in order")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = student_layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    state = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith("model.layers."):
            idx = int(key.split(".")[2])
            if idx not in keep:
                continue
            key = key.replace(f"model.layers.{idx}.", f"model.layers.{keep.index(idx)}.", 1)
        state[key] = tensor.detach().clone()
    student.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    device = next(teacher.parameters()).device
    student.model.rotary_emb = type(student.model.rotary_emb)(config=config).to(device)
    return student, keep


def _fingerprint(spec: Distillation, source: str, seed: int, data_key: str) -> str:
    # Steps, checkpoint spacing and the schedule's shape are left out: a Job rerun with more steps continues
    # where it stopped (under the new schedule from there on).
    settings = spec.model_dump(exclude={"steps", "checkpoint_every", "schedule", "warmup_steps"})
    text = json.dumps({"spec": settings, "source": source, "seed": seed, "data": data_key}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a Job killed mid-write leaves the previous checkpoint intact


def _read_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # a torn file fails in many ways inside the unpickler; all mean 'not usable'
        log.warning("ignoring unreadable distillation checkpoint", extra={"path": str(path), "error": str(exc)})
        return None
    if not isinstance(payload, dict) or payload.get("fingerprint") != fingerprint:
        log.info("distillation checkpoint belongs to another recipe; starting over", extra={"path": str(path)})
        return None
    return payload


def _hidden_capture(layers: list[nn.Module]) -> tuple[list[torch.Tensor], list[Any]]:
    """Forward hooks that collect each layer's output hidden states, in call order."""
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out)

    return captured, [layer.register_forward_hook(hook) for layer in layers]


def _hidden_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    # Normalised by the teacher's mean square: deep layers' residual streams are larger and would dominate.
    terms = [
        nn.functional.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-6)
        for s, t in zip(student_states, teacher_states, strict=True)
    ]
    return torch.stack(terms).mean()


def distill(
    teacher: Any,
    spec: Distillation,
    data: TrainingBatches,
    *,
    work_dir: Path,
    source: str,
    seed: int,
    device: torch.device | None = None,
    calibration: torch.Tensor | None = None,
    data_key: str = "corpus",
) -> tuple[Any, dict[str, Any]]:
    """Train a student on `device` (the teacher's); returns it (eval mode) and figures (layers, losses, tokens).

    `calibration` (sequences of the calibration slice) ranks the teacher's layers for layerSelection importance.
    """
    device = device or next(teacher.parameters()).device
    n_teacher = int(teacher.config.num_hidden_layers)
    fingerprint = _fingerprint(spec, source, seed, data_key)
    ckpt_path = work_dir / CHECKPOINT
    payload = _read_checkpoint(ckpt_path, fingerprint)
    importance: list[float] | None = None
    if payload is not None and "keep" in payload:
        keep = [int(i) for i in payload["keep"]]  # the layers the interrupted run chose, whatever the numerics now
    elif spec.layer_selection == "importance" and spec.student_layers > 2:
        if calibration is None:
            raise ValueError("compression.distillation.layerSelection importance needs calibration sequences")
        importance = layer_importance(teacher, calibration)
        keep = important_layer_indices(importance, spec.student_layers)
    else:
        keep = student_layer_indices(n_teacher, spec.student_layers)
    student, keep = build_student(teacher, spec.student_layers, keep)
    torch.manual_seed(seed)
    student.train()
    student.requires_grad_(True)
    if student.config.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    opt = training.optimizer(list(student.parameters()), spec.learning_rate, device)
    start = 0
    losses: list[float] = []
    if payload is not None:
        student.load_state_dict(payload["student"])
        opt.load_state_dict(payload["optimizer"])
        start = int(payload["step"])
        losses = list(payload["losses"])
        log.info("resuming distillation from checkpoint", extra={"step": start, "path": str(ckpt_path)})
    tokens_per_step = spec.batch_size * spec.sequence_length
    temperature = spec.temperature
    student_states: list[torch.Tensor] = []
    teacher_states: list[torch.Tensor] = []
    handles: list[Any] = []
    if spec.hidden_weight > 0:
        student_states, s_handles = _hidden_capture(list(student.model.layers))
        teacher_states, t_handles = _hidden_capture([teacher.model.layers[i] for i in keep])
        handles = s_handles + t_handles
    started = time.perf_counter()
    try:
        with training.progress_log("distill", spec.steps, start, tokens_per_step) as report:
            for step in tqdm(range(start, spec.steps), desc="distillation", initial=start, total=spec.steps,
                             disable=None):
                lr = training.learning_rate(step, spec.steps, spec.learning_rate, warmup=spec.warmup_steps,
                                            schedule=spec.schedule)
                for group in opt.param_groups:
                    group["lr"] = lr
                batch = data.batch(step, spec.batch_size, spec.sequence_length, seed).to(device)
                student_states.clear()
                teacher_states.clear()
                with torch.no_grad(), training.autocast(device):
                    teacher_logits = teacher(input_ids=batch, use_cache=False).logits
                with training.autocast(device):
                    logits = student(input_ids=batch, use_cache=False).logits
                loss = spec.alpha * training.kd_loss(logits, teacher_logits, temperature)
                if spec.alpha < 1.0:
                    vocab = logits.shape[-1]
                    ce = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab),
                                                     batch[:, 1:].reshape(-1))
                    loss = loss + (1.0 - spec.alpha) * ce
                if spec.hidden_weight > 0:
                    loss = loss + spec.hidden_weight * _hidden_loss(student_states, teacher_states)
                del teacher_logits, logits
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                report(step, loss=losses[-1], lr=lr)
                done = step + 1
                if done % spec.checkpoint_every == 0 or done == spec.steps:
                    work_dir.mkdir(parents=True, exist_ok=True)
                    _save_checkpoint(ckpt_path, {
                        "fingerprint": fingerprint, "step": done, "losses": losses, "keep": keep,
                        "student": student.state_dict(), "optimizer": opt.state_dict(),
                    })
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - started
    student.eval()
    student.requires_grad_(False)
    figures: dict[str, Any] = {
        "layer_selection": spec.layer_selection,
        "teacher_layers_kept": keep,
        "resumed_from_step": start,
        "steps": spec.steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "loss_curve": loss_curve(losses),
        "training_tokens": spec.steps * tokens_per_step,
        "seconds": round(seconds, 1),
        "tokens_per_second": round((spec.steps - start) * tokens_per_step / seconds) if seconds > 0 else None,
    }
    if importance is not None:
        figures["layer_importance"] = [round(v, 4) for v in importance]
    return student, figures


def loss_curve(losses: list[float], points: int = 10) -> list[float]:
    """A few evenly spaced losses (means of their stretch) for the manifest."""
    if not losses:
        return []
    size = max(1, len(losses) // points)
    return [round(sum(losses[i : i + size]) / len(losses[i : i + size]), 4) for i in range(0, len(losses), size)]
