"""The quantized modules a compressed artifact holds: int8 and int4 weight-only linears, dynamic int8 linears,
int8 and int4 embeddings, the codecs that make their codes, and where in a model they go.

Why these modules rather than torchao's tensor subclasses: an artifact must be a plain safetensors file
that any later Stratus version loads, and torchao's subclasses only serialise through pickles tied to
its version. The compute still runs on kept kernels: the weight-only linears call ATen's
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` (the same kernels torchao's CPU layouts
dispatch to; both are vectorised for bf16 activations, so activations are cast to bf16 around
them), and the dynamic linears run ATen's `torch._int_mm` on per-token int8 activations (see
DynamicInt8Linear for why not torch.ao's fbgemm dynamic linear). Choosing which layers to quantize
is compression's business (compress/quantize.py); this module is what loading an artifact needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# Rows (batch x tokens) up to which the packed int8 kernel beats widening the codes for a float GEMM.
PACKED_KERNEL_MAX_ROWS = 32
INT4_LEVELS = 15  # unsigned 4-bit codes 0..15, stored as (code - 8) * scale + zero, as the int4pack kernels expect


class _KeepsCodes(nn.Module):
    """Moves its quantised tensors between devices but never changes their dtype (model.to(bf16) is common)."""

    _fixed: tuple[str, ...] = ()
    # Buffers registered by the subclasses, declared for the type checker.
    qweight: torch.Tensor
    scales: torch.Tensor
    scales_and_zeros: torch.Tensor
    out_dtype: torch.dtype

    def _apply(self, fn: Any, recurse: bool = True) -> _KeepsCodes:
        fixed = {id(self._buffers.get(n)) for n in self._fixed if self._buffers.get(n) is not None}
        probe = fn(torch.zeros(1))

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            return t.to(probe.device) if id(t) in fixed else fn(t)

        super()._apply(keep_dtype, recurse)  # type: ignore[no-untyped-call]
        if probe.is_floating_point():
            self.out_dtype = probe.dtype
        self._refresh()
        return self

    def _refresh(self) -> None:
        """Rebuild derived (never stored) tensors after a move."""


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> [N, K/2] uint8, two codes a byte (low nibble first): a portable layout."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (int8 [N, K], fp32 scales [N])."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 (min/max per group): (packed uint8 [N, K/2], bf16 scales_and_zeros [K/g, N, 2])."""
    w = weight.detach().float()
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    lo = groups.amin(dim=-1, keepdim=True)
    hi = groups.amax(dim=-1, keepdim=True)
    # Scales and zeros are kept in bf16, which is what the kernel computes with, and which halves their
    # share of the file (at group 64, fp32 pairs would add 0.125 bytes to each 0.5-byte weight). They are
    # rounded first and the codes chosen against the rounded values, so the rounding costs nothing extra.
    scale = ((hi - lo) / INT4_LEVELS).clamp(min=1e-6).to(torch.bfloat16).float()
    zero = (lo + scale * 8).to(torch.bfloat16).float()  # the int4pack kernels compute (code - 8) * scale + zero
    codes = torch.round((groups - zero) / scale + 8).clamp(0, INT4_LEVELS)
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, N, 2]
    return _pack_int4(codes.reshape(n, k)), scales_and_zeros


class Int8WeightLinear(_KeepsCodes):
    """y = x W^T (+ b) with W stored as int8 per output channel; accepts [..., in] inputs."""

    kind = "int8-weight"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._fixed = ("qweight", "scales")
        self._refresh()

    def _refresh(self) -> None:
        self._scales_bf16 = self.scales.to(torch.bfloat16)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        q, s = quantize_int8_per_channel(linear.weight)
        return cls(q, s, None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.device.type == "cpu" and flat.shape[0] <= PACKED_KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.qweight, self._scales_bf16)
        else:
            # Prefill and evaluation batches: the packed kernel is tuned for decode and runs ~2x slower
            # than a float GEMM here, so widen the codes once and scale the outputs per channel instead.
            compute = flat.dtype if flat.dtype != torch.bfloat16 or flat.device.type != "cpu" else torch.float32
            y = (flat.to(compute) @ self.qweight.to(compute).T) * self.scales.to(compute)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        out: torch.Tensor = y + self.bias.to(y.dtype) if self.bias is not None else y
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4WeightLinear(_KeepsCodes):
    """y = x W^T (+ b) with W stored as group-wise asymmetric int4; accepts [..., in] inputs."""

    kind = "int4-weight"

    def __init__(
        self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("qweight", packed)  # portable nibble layout, the one written to disk
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._fixed = ("qweight", "scales_and_zeros")
        self._refresh()

    def _refresh(self) -> None:
        # The CPU kernel wants its own tile layout; it is derived at load time, never stored.
        # The CPU kernel tiles 16 output channels at a time; other shapes take the dequantizing path.
        self._kernel_weight: torch.Tensor | None = None
        if self.qweight.device.type == "cpu" and self.out_features % 16 == 0:
            codes = _unpack_int4(self.qweight).to(torch.int32)
            self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self._kernel_sz = self.scales_and_zeros

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4WeightLinear:
        packed, sz = quantize_int4_groupwise(linear.weight, group_size)
        return cls(packed, sz, group_size, None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        codes = _unpack_int4(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [N, K/g, 2]
        w = (codes - 8) * sz[..., :1] + sz[..., 1:]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.device.type == "cpu" and self._kernel_weight is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self._kernel_weight, self.group_size, self._kernel_sz
            )
        else:
            y = flat @ self.dequantized().to(flat.dtype).T
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        out: torch.Tensor = y + self.bias.to(y.dtype) if self.bias is not None else y
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}"


class DynamicInt8Linear(_KeepsCodes):
    """int8 weights (per channel) times int8 activations quantised per token at call time; the CPU speed option.

    Why not `torch.ao.nn.quantized.dynamic.Linear`: fbgemm's dynamic linear quantises the activations
    per tensor (and to 7 bits by default), which SmolLM2's outlier channels do not survive: measured on
    4 held-out sequences its perplexity went 10.22 -> 34.0 (18.1 with 8-bit activations), against 10.74
    with per-token scales. So activations get a scale per token (as torchao's int8 dynamic-activation
    config does) and the integer GEMM is ATen's `torch._int_mm`, with int32 accumulation.
    """

    kind = "int8-dynamic"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        self.register_buffer("bias", bias.float() if bias is not None else None)
        self._fixed = ("qweight", "scales", "bias")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DynamicInt8Linear:
        q, s = quantize_int8_per_channel(linear.weight)
        return cls(q, s, None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float()
        act_scales = (flat.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8)
        codes = torch.round(flat / act_scales).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(codes, self.qweight.t())  # int32 [rows, out]
        y = acc.float() * act_scales * self.scales
        bias = self.bias
        if isinstance(bias, torch.Tensor):
            y = y + bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic per-token"


class Int8Embedding(_KeepsCodes):
    """An embedding table stored as int8 per row; rows are dequantised on lookup.

    Tied to an `Int8WeightLinear` LM head it is one table on disk and in memory: per-row scales of the
    embedding are exactly per-output-channel scales of the head.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        self.out_dtype = torch.float32
        self._fixed = ("qweight", "scales")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.qweight).to(torch.float32)
        return (rows * self.scales[ids].unsqueeze(-1)).to(self.out_dtype)


class Int4Embedding(_KeepsCodes):
    """An embedding table stored as group-wise int4 (the layout of `Int4WeightLinear`); rows dequantised on lookup.

    Tied to an `Int4WeightLinear` LM head it shares that head's codes, scales and zeros.
    """

    def __init__(
        self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, padding_idx: int | None = None
    ) -> None:
        super().__init__()
        self.num_embeddings = packed.shape[0]
        self.embedding_dim = packed.shape[1] * 2
        self.group_size = group_size
        self.padding_idx = padding_idx
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))
        self.out_dtype = torch.float32
        self._fixed = ("qweight", "scales_and_zeros")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = _unpack_int4(self.qweight[flat]).float().reshape(flat.numel(), -1, self.group_size)
        sz = self.scales_and_zeros[:, flat].float().transpose(0, 1)  # [n, K/g, 2]
        rows = (codes - 8) * sz[..., :1] + sz[..., 1:]
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.out_dtype)


QuantizedLinear = Int8WeightLinear | Int4WeightLinear | DynamicInt8Linear


def target_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The decoder layers' linear modules (attention and MLP projections), by qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            yield name, module


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in `model` under its qualified `name` (e.g. model.layers.0.mlp.up_proj)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
