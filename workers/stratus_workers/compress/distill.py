"""Knowledge distillation into a shallower student built from the teacher's own layers, resumable from checkpoints."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from stratus_workers.compress.corpus import CorpusSlices
from stratus_workers.compress.spec import Distillation

log = logging.getLogger(__name__)

CHECKPOINT = "distill-checkpoint.pt"


def student_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always keeping the first and the last (they matter most)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return sorted({round(i * step) for i in range(student_layers)})


def build_student(teacher: Any, student_layers: int) -> tuple[Any, list[int]]:
    """A LlamaForCausalLM with `student_layers` decoder layers copied from the teacher."""
    from transformers import AutoModelForCausalLM

    n_teacher = int(teacher.config.num_hidden_layers)
    if student_layers >= n_teacher:
        raise ValueError(
            f"compression.distillation.studentLayers: {student_layers} is not fewer than "
            f"the teacher's {n_teacher} layers"
        )
    keep = student_layer_indices(n_teacher, student_layers)
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
    student.model.rotary_emb = type(student.model.rotary_emb)(config=config)
    return student, keep


def _fingerprint(spec: Distillation, source: str, seed: int) -> str:
    # Steps and checkpoint spacing are left out: a Job rerun with more steps continues where it stopped.
    settings = spec.model_dump(exclude={"steps", "checkpoint_every"})
    text = json.dumps({"spec": settings, "source": source, "seed": seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a Job killed mid-write leaves the previous checkpoint intact


def distill(
    teacher: Any, spec: Distillation, slices: CorpusSlices, *, work_dir: Path, source: str, seed: int
) -> tuple[Any, dict[str, Any]]:
    """Train a student; returns it (eval mode) and figures (layers kept, losses, resumed step)."""
    student, keep = build_student(teacher, spec.student_layers)
    torch.manual_seed(seed)
    student.train()
    student.requires_grad_(True)
    if student.config.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    fingerprint = _fingerprint(spec, source, seed)
    ckpt_path = work_dir / CHECKPOINT
    start = 0
    losses: list[float] = []
    if ckpt_path.is_file():
        try:
            payload = torch.load(ckpt_path, weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            log.warning(
                "ignoring unreadable distillation checkpoint", extra={"path": str(ckpt_path), "error": str(exc)}
            )
            payload = None
        if payload is not None and payload.get("fingerprint") == fingerprint:
            student.load_state_dict(payload["student"])
            optimizer.load_state_dict(payload["optimizer"])
            start = int(payload["step"])
            losses = list(payload["losses"])
            log.info("resuming distillation from checkpoint", extra={"step": start, "path": str(ckpt_path)})
        elif payload is not None:
            log.info("distillation checkpoint belongs to another recipe; starting over", extra={"path": str(ckpt_path)})
    temperature = spec.temperature
    for step in tqdm(range(start, spec.steps), desc="distillation", initial=start, total=spec.steps, disable=None):
        batch = slices.train_batch(step, spec.batch_size, spec.sequence_length, seed)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch, use_cache=False).logits.float()
        logits = student(input_ids=batch, use_cache=False).logits.float()
        vocab = logits.shape[-1]
        kl = (
            nn.functional.kl_div(
                torch.log_softmax(logits / temperature, dim=-1).reshape(-1, vocab),
                torch.log_softmax(teacher_logits / temperature, dim=-1).reshape(-1, vocab),
                log_target=True,
                reduction="batchmean",
            )
            * temperature**2
        )  # Hinton et al.: keeps the soft-target gradient scale independent of T
        ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), batch[:, 1:].reshape(-1))
        loss = spec.alpha * kl + (1.0 - spec.alpha) * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if done % spec.checkpoint_every == 0 or done == spec.steps:
            work_dir.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(
                ckpt_path,
                {
                    "fingerprint": fingerprint,
                    "step": done,
                    "losses": losses,
                    "student": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                },
            )
    student.eval()
    student.requires_grad_(False)
    figures = {
        "teacher_layers_kept": keep,
        "resumed_from_step": start,
        "steps": spec.steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    return student, figures
