"""Pruning of the decoder linears: magnitude or Wanda scores, unstructured or 2:4, with optional recovery."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from stratus_workers.compress import training
from stratus_workers.compress.corpus import CorpusSlices
from stratus_workers.compress.spec import Pruning
from stratus_workers.compress.training import TrainingBatches
from stratus_workers.models.quantized import target_linears

log = logging.getLogger(__name__)


def measured_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the decoder linears (what pruning targets), counted."""
    zeros = 0
    total = 0
    for _, linear in target_linears(model):
        zeros += int((linear.weight == 0).sum())
        total += linear.weight.numel()
    return zeros / total if total else 0.0


def pattern_violations(model: nn.Module) -> int:
    """Groups of 4 consecutive inputs holding more than 2 nonzero weights, over the decoder linears (2:4: 0)."""
    count = 0
    for _, linear in target_linears(model):
        weight = linear.weight
        if weight.shape[1] % 4:
            raise ValueError(f"a 2:4 check needs input dimensions divisible by 4, got {weight.shape[1]}")
        count += int(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=-1) > 2).sum())
    return count


def _activation_norms(model: Any, calibration: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over all calibration tokens for every input feature j of every decoder linear (one dense pass).

    The Wanda paper recomputes inputs layer by layer after pruning the layers below; one pass over the
    dense model is the cheaper variant (what its authors report as close) and is what runs here.
    """
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    device = next(model.parameters()).device
    for name, linear in target_linears(model):
        sums[name] = torch.zeros(linear.in_features, dtype=torch.float64, device=device)

        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor, key: str = name) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[key] += (x * x).sum(dim=0)

        hooks.append(linear.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in tqdm(range(0, calibration.shape[0], batch_size), desc="wanda calibration", disable=None):
                model(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return {k: v.sqrt().float() for k, v in sums.items()}


def _mask(scores: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """True where a weight is kept."""
    out_f, in_f = scores.shape
    if pattern == "2:4":
        groups = scores.reshape(out_f, in_f // 4, 4)
        keep_idx = groups.topk(2, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep_idx, True)
        return keep.reshape(out_f, in_f)
    if per_row:  # Wanda compares weights within an output row
        n_prune = int(in_f * sparsity)
        if n_prune == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        idx = scores.topk(n_prune, dim=1, largest=False).indices
        return torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)
    n_prune = int(scores.numel() * sparsity)
    if n_prune == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.flatten().kthvalue(n_prune).values
    keep = scores > threshold
    # Ties at the threshold can leave a few too many; drop exactly n_prune by index order.
    extra = int((~keep).sum()) - n_prune
    if extra < 0:
        candidates = ((scores == threshold) & keep).flatten().nonzero().flatten()[:-extra]
        keep.view(-1)[candidates] = False
    return keep


def check_pattern(model: nn.Module, spec: Pruning) -> None:
    if spec.pattern == "2:4":
        for name, linear in target_linears(model):
            if linear.in_features % 4:
                raise ValueError(
                    "compression.pruning.pattern: 2:4 needs input dimensions divisible by 4; "
                    f"{name} has {linear.in_features}"
                )


def prune_model(model: Any, spec: Pruning, slices: CorpusSlices, seq_len: int) -> dict[str, torch.Tensor]:
    """Zero weights in place and return the keep-masks by module name."""
    check_pattern(model, spec)
    norms: dict[str, torch.Tensor] = {}
    if spec.method == "wanda":
        calibration = slices.sequences(
            "calibration", spec.calibration_samples, seq_len, field="compression.pruning.calibrationSamples"
        )
        norms = _activation_norms(model, calibration)
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, linear in target_linears(model):
            scores = linear.weight.abs().float()
            if spec.method == "wanda":
                scores = scores * norms[name][None, :]
            elif spec.method != "magnitude":
                raise ValueError(f"compression.pruning.method: unknown method {spec.method!r}")
            mask = _mask(scores, spec.sparsity, spec.pattern, per_row=spec.method == "wanda")
            linear.weight.mul_(mask)
            masks[name] = mask
    return masks


def recover(
    student: Any,
    teacher: Any,
    masks: dict[str, torch.Tensor],
    spec: Pruning,
    data: TrainingBatches,
    seed: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Fine-tune the pruned model towards the dense one (KL on logits at `recoveryTemperature`), masks held fixed.

    Matching the dense model's distribution (self-distillation) rather than the corpus' next tokens keeps
    the recovered model a compression of the original instead of a domain-adapted one, which would
    flatter the held-out perplexity measured on the same corpus. Returns figures (losses, tokens, speed).
    """
    device = device or next(student.parameters()).device
    modules = dict(target_linears(student))
    student.train()
    student.requires_grad_(False)
    params = []
    for name in masks:
        modules[name].weight.requires_grad_(True)
        params.append(modules[name].weight)
    opt = training.optimizer(params, spec.recovery_learning_rate, device)
    losses: list[float] = []
    steps = spec.recovery_steps
    tokens_per_step = spec.recovery_batch_size * spec.recovery_sequence_length
    started = time.perf_counter()
    with training.progress_log("prune-recovery", steps, 0, tokens_per_step) as report:
        for step in tqdm(range(steps), desc="pruning recovery", disable=None):
            lr = training.learning_rate(step, steps, spec.recovery_learning_rate, warmup=spec.recovery_warmup_steps,
                                        schedule=spec.recovery_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = data.batch(step, spec.recovery_batch_size, spec.recovery_sequence_length, seed + 7919).to(device)
            with torch.no_grad(), training.autocast(device):
                target = teacher(input_ids=batch, use_cache=False).logits
            with training.autocast(device):
                logits = student(input_ids=batch, use_cache=False).logits
            loss = training.kd_loss(logits, target, spec.recovery_temperature)
            del target, logits
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            for name, mask in masks.items():  # no momentum builds up behind a pruned weight
                grad = modules[name].weight.grad
                if grad is not None:
                    grad.mul_(mask)
            opt.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    modules[name].weight.mul_(mask)  # pruned weights stay exactly zero
            losses.append(float(loss.detach()))
            report(step, loss=losses[-1], lr=lr)
    seconds = time.perf_counter() - started
    student.eval()
    student.requires_grad_(False)
    return {
        "recovery_first_loss": losses[0] if losses else None,
        "recovery_last_loss": losses[-1] if losses else None,
        "recovery_tokens": steps * tokens_per_step,
        "recovery_seconds": round(seconds, 1),
        "recovery_tokens_per_second": round(steps * tokens_per_step / seconds) if seconds > 0 else None,
    }
