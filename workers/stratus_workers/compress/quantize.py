"""Weight quantization: replaces a model's decoder linears (and its embedding and LM head) with quantized modules.

The modules themselves, and the codecs that make their codes, live in models/quantized.py: a loaded
artifact needs them, and the models package never imports compression.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from stratus_workers.models.quantized import (
    DynamicInt8Linear,
    Int4Embedding,
    Int4WeightLinear,
    Int8Embedding,
    Int8WeightLinear,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    set_module,
    target_linears,
)

log = logging.getLogger(__name__)


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Raise ValueError naming compression.quantization.groupSize when it does not divide a linear's input."""
    for name, linear in target_linears(model):
        if linear.in_features % group_size:
            divisors = [g for g in (32, 64, 128) if linear.in_features % g == 0]
            hint = f"use {' or '.join(map(str, divisors))}" if divisors else "no supported group size divides it"
            raise ValueError(
                f"compression.quantization.groupSize: {group_size} does not divide the input dimension "
                f"{linear.in_features} of {name}; {hint}"
            )


def quantize_model(model: Any, method: str, group_size: int, embedding_bits: int = 8) -> dict[str, int]:
    """Replace the decoder linears (and the embedding / LM head, as int8) in place; returns module counts.

    The tied 49152x576 embedding is a fifth of SmolLM2-135M; left in fp32 it alone would hold the
    int8 variant above 0.4x the fp32 size, so it is always quantized: int8 per row by default, or
    int4 group-wise like the linears (`embedding_bits=4`, int4-weight only), since the token
    embedding and the logits are where 4 bits usually cost the most.
    """
    if method == "int4-weight":
        check_group_size(model, group_size)
    counts = {"linear": 0, "embedding": 0, "lm_head": 0}
    for name, linear in list(target_linears(model)):
        if method == "int8-weight":
            new: nn.Module = Int8WeightLinear.from_linear(linear)
        elif method == "int4-weight":
            new = Int4WeightLinear.from_linear(linear, group_size)
        elif method == "int8-dynamic":
            new = DynamicInt8Linear.from_linear(linear)
        else:
            raise ValueError(f"compression.quantization.method: unknown method {method!r}")
        set_module(model, name, new)
        counts["linear"] += 1
    embed = model.model.embed_tokens
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and (
        model.lm_head.weight.data_ptr() == embed.weight.data_ptr()
    )
    head_bias = None if model.lm_head.bias is None else model.lm_head.bias.detach().clone()
    if embedding_bits == 4 and method == "int4-weight":
        if embed.weight.shape[1] % group_size:
            raise ValueError(
                f"compression.quantization.groupSize: {group_size} does not divide the embedding "
                f"dimension {embed.weight.shape[1]}"
            )
        packed, sz = quantize_int4_groupwise(embed.weight, group_size)
        model.model.embed_tokens = Int4Embedding(packed, sz, group_size, embed.padding_idx)
        if tied:
            model.lm_head = Int4WeightLinear(packed, sz, group_size, head_bias)  # the same tensors: stored once
        else:
            model.lm_head = Int4WeightLinear.from_linear(model.lm_head, group_size)
    else:
        q, s = quantize_int8_per_channel(embed.weight)
        model.model.embed_tokens = Int8Embedding(q, s, embed.padding_idx)
        if tied:
            model.lm_head = Int8WeightLinear(q, s, head_bias)  # the same tensors: stored once
        else:
            model.lm_head = Int8WeightLinear.from_linear(model.lm_head)
    counts["embedding"] = 1
    counts["lm_head"] = 1
    return counts
