"""Pruning of the decoder linears: magnitude or Wanda scores, unstructured or 2:4, with optional recovery."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from stratus_workers.compress.corpus import CorpusSlices
from stratus_workers.compress.spec import Pruning
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


def _activation_norms(model: Any, calibration: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over all calibration tokens for every input feature j of every decoder linear (one dense pass).

    The Wanda paper recomputes inputs layer by layer after pruning the layers below; one pass over the
    dense model is the cheaper variant (what its authors report as close) and is what runs here.
    """
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, linear in target_linears(model):
        sums[name] = torch.zeros(linear.in_features, dtype=torch.float64)

        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor, key: str = name) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[key] += (x * x).sum(dim=0)

        hooks.append(linear.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in tqdm(range(0, calibration.shape[0], batch_size), desc="wanda calibration", disable=None):
                model(input_ids=calibration[start : start + batch_size], use_cache=False)
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
    student: Any, teacher: Any, masks: dict[str, torch.Tensor], spec: Pruning, slices: CorpusSlices, seed: int
) -> list[float]:
    """Short fine-tune of the pruned model towards the dense one (KL on logits), masks held fixed.

    Matching the dense model's distribution (self-distillation) rather than the corpus' next tokens keeps
    the recovered model a compression of the original instead of a domain-adapted one, which would
    flatter the held-out perplexity measured on the same corpus.
    """
    modules = dict(target_linears(student))
    student.train()
    student.requires_grad_(False)
    params = []
    for name in masks:
        modules[name].weight.requires_grad_(True)
        params.append(modules[name].weight)
    optimizer = torch.optim.AdamW(params, lr=spec.recovery_learning_rate, weight_decay=0.0)
    losses: list[float] = []
    for step in tqdm(range(spec.recovery_steps), desc="pruning recovery", disable=None):
        batch = slices.train_batch(step, spec.recovery_batch_size, spec.recovery_sequence_length, seed + 7919)
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), dim=-1)
        logits = student(input_ids=batch, use_cache=False).logits.float()
        loss = nn.functional.kl_div(torch.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")
        loss = loss / batch.shape[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        with torch.no_grad():
            for name, mask in masks.items():
                modules[name].weight.mul_(mask)  # pruned weights stay exactly zero
        losses.append(float(loss.detach()))
    student.eval()
    student.requires_grad_(False)
    return losses
