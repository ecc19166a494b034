"""The quantized modules compute what their dequantized weights say, on [B, L, in] inputs, and keep their codes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stratus_workers.models.quantized import (
    DynamicInt8Linear,
    Int4WeightLinear,
    Int8WeightLinear,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)

pytestmark = pytest.mark.unit


def test_int8_per_channel_round_trip_error_is_within_half_a_step() -> None:
    w = torch.randn(48, 64)
    q, s = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_int4_groupwise_error_is_within_half_a_step() -> None:
    w = torch.randn(32, 64)
    packed, sz = quantize_int4_groupwise(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 32)
    layer = Int4WeightLinear(packed, sz, 32, None)
    step = sz[..., 0].float().transpose(0, 1).repeat_interleave(32, dim=1)
    assert ((layer.dequantized() - w).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("kind", ["int8", "int4", "dynamic"])
def test_modules_match_their_float_reference_on_3d_inputs(kind: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=True)
    if kind == "int8":
        layer: nn.Module = Int8WeightLinear.from_linear(linear)
    elif kind == "int4":
        layer = Int4WeightLinear.from_linear(linear, 32)
    else:
        layer = DynamicInt8Linear.from_linear(linear)
    x = torch.randn(2, 5, 64)
    y = layer(x)
    assert y.shape == (2, 5, 32) and y.dtype == torch.float32
    with torch.no_grad():
        reference = linear(x)
        if kind != "dynamic":  # the kernel must compute exactly what the stored codes say, up to bf16 activations
            exact = x @ layer.dequantized().T + linear.bias
            assert (y - exact).abs().max() < 0.02 * exact.abs().max()
    # 4-bit weights of a 64-wide layer lose more than 8-bit ones; both stay close to the float layer.
    assert (y - reference).abs().max() < (0.12 if kind == "int4" else 0.05) * reference.abs().max()


def test_casting_the_model_keeps_the_integer_codes_and_fp32_scales() -> None:
    layer = Int8WeightLinear.from_linear(nn.Linear(64, 32))
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int8 and layer.scales.dtype == torch.float32
    assert layer(torch.randn(1, 3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
