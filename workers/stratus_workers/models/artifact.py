"""The compressed artifact format: config, tokenizer, one safetensors file with a layout, manifest.json.

The weights file holds plain tensors only (int8 codes, packed int4 nibbles, scales, sparse values and
bit masks), so any Stratus version loads it without pickles; `layout.json` says how each module's
tensors are to be read back. This module is the format's one owner: the compression Job writes
artifacts with it and the loader reads them with it (the manifest's name and format tag live in the
torch-free files.py, for processes that only need to recognise an artifact).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stratus_workers.models.files import ARTIFACT_FORMAT as ARTIFACT_FORMAT
from stratus_workers.models.files import MANIFEST_FILE as MANIFEST_FILE
from stratus_workers.models.files import ModelLoadError
from stratus_workers.models.quantized import (
    DynamicInt8Linear,
    Int4Embedding,
    Int4WeightLinear,
    Int8Embedding,
    Int8WeightLinear,
    set_module,
    target_linears,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
LAYOUT_FILE = "layout.json"
LAYOUT_VERSION = 1


def _pack_sparse(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pruned matrix as (its non-zero values in row-major order, a bit mask packed 8 a byte)."""
    w = weight.detach().contiguous()
    mask = w != 0
    bits = np.packbits(mask.flatten().numpy())
    return w[mask].clone(), torch.from_numpy(bits)


def _unpack_sparse(values: torch.Tensor, bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape))
    mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool)).reshape(shape)
    if int(mask.sum()) != values.numel():
        raise ModelLoadError(
            f"sparse tensor of shape {shape}: mask has {int(mask.sum())} entries, values {values.numel()}"
        )
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def save_weights(model: Any, directory: Path, *, sparse: bool) -> dict[str, Any]:
    """Write the model's tensors and their layout into `directory`; returns the layout."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}

    def put(key: str, tensor: torch.Tensor) -> None:
        ptr = tensor.data_ptr()
        if ptr in seen and tensors[seen[ptr]].shape == tensor.shape:
            aliases[key] = seen[ptr]  # tied weights: stored once
            return
        seen[ptr] = key
        tensors[key] = tensor.detach().contiguous()

    handled: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, Int8WeightLinear | DynamicInt8Linear):
            modules[name] = {"kind": module.kind, "bias": module.bias is not None}
            put(f"{name}.qweight", module.qweight)
            put(f"{name}.scales", module.scales)
        elif isinstance(module, Int4WeightLinear):
            modules[name] = {"kind": module.kind, "group_size": module.group_size, "bias": module.bias is not None}
            put(f"{name}.qweight", module.qweight)
            put(f"{name}.scales_and_zeros", module.scales_and_zeros)
        elif isinstance(module, Int4Embedding):
            modules[name] = {
                "kind": "int4-embedding",
                "group_size": module.group_size,
                "padding_idx": module.padding_idx,
            }
            put(f"{name}.qweight", module.qweight)
            put(f"{name}.scales_and_zeros", module.scales_and_zeros)
        elif isinstance(module, Int8Embedding):
            modules[name] = {"kind": "int8-embedding", "padding_idx": module.padding_idx}
            put(f"{name}.qweight", module.qweight)
            put(f"{name}.scales", module.scales)
        else:
            continue
        handled.add(name)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            put(f"{name}.bias", bias)
    if sparse:
        for name, linear in target_linears(model):
            values, bits = _pack_sparse(linear.weight)
            modules[name] = {"kind": "sparse", "shape": list(linear.weight.shape), "bias": linear.bias is not None}
            put(f"{name}.values", values)
            put(f"{name}.mask", bits)
            if linear.bias is not None:
                put(f"{name}.bias", linear.bias)
            handled.add(name)
    for key, tensor in model.state_dict(keep_vars=False).items():
        owner = key.rpartition(".")[0]
        if owner in handled:
            continue
        put(key, tensor)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": ARTIFACT_FORMAT})
    layout = {"version": LAYOUT_VERSION, "modules": modules, "aliases": aliases}
    (directory / LAYOUT_FILE).write_text(json.dumps(layout, indent=1, sort_keys=True))
    return layout


def save_artifact(model: Any, tokenizer: Any, directory: Path, *, sparse: bool) -> dict[str, Any]:
    """Write config, tokenizer, weights and layout (not the manifest: the job writes it last)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return save_weights(model, directory, sparse=sparse)


def weights_bytes(directory: Path) -> int:
    return (directory / WEIGHTS_FILE).stat().st_size


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def fp32_reference_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors in fp32, tied tensors counted once: the 'size vs fp32' denominator."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * 4 if tensor.is_floating_point() else tensor.numel() * tensor.element_size()
    return total


def _read(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise ModelLoadError(f"artifact {path} is corrupt: tensor {key!r} is missing from {WEIGHTS_FILE}") from None


def load_artifact(path: Path, *, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """Rebuild a compressed artifact as a LlamaForCausalLM (quantized modules in place) plus its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    for required in ("config.json", WEIGHTS_FILE, LAYOUT_FILE):
        if not (path / required).is_file():
            raise ModelLoadError(f"artifact {path} is incomplete: {required} is missing; rerun its compression job")
    try:
        layout = json.loads((path / LAYOUT_FILE).read_text())
        # Cloned: the loaded tensors may share one unaligned buffer, and the packed int8/int4 CPU kernels
        # use aligned vector loads (an unaligned int8 LM head segfaults in _weight_int8pack_mm).
        tensors = {key: value.clone() for key, value in load_file(str(path / WEIGHTS_FILE)).items()}
    except (OSError, ValueError, json.JSONDecodeError, RuntimeError) as exc:
        raise ModelLoadError(f"artifact {path} is corrupt ({exc}); rerun its compression job") from exc
    if layout.get("version") != LAYOUT_VERSION:
        raise ModelLoadError(
            f"artifact {path} has layout version {layout.get('version')}; this Stratus reads {LAYOUT_VERSION}"
        )
    for alias, target in layout.get("aliases", {}).items():
        tensors[alias] = _read(tensors, target, path)
    config = AutoConfig.from_pretrained(path)
    # Built on the meta device: every tensor comes from the file, so random initialisation is wasted work.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    replaced: set[str] = set()
    for name, info in layout["modules"].items():
        kind = info["kind"]
        bias = tensors.get(f"{name}.bias") if info.get("bias") else None
        new: nn.Module
        if kind == "int8-weight":
            new = Int8WeightLinear(
                _read(tensors, f"{name}.qweight", path), _read(tensors, f"{name}.scales", path), bias
            )
        elif kind == "int8-dynamic":
            new = DynamicInt8Linear(
                _read(tensors, f"{name}.qweight", path), _read(tensors, f"{name}.scales", path), bias
            )
        elif kind == "int4-weight":
            new = Int4WeightLinear(
                _read(tensors, f"{name}.qweight", path),
                _read(tensors, f"{name}.scales_and_zeros", path),
                int(info["group_size"]),
                bias,
            )
        elif kind == "int8-embedding":
            new = Int8Embedding(
                _read(tensors, f"{name}.qweight", path), _read(tensors, f"{name}.scales", path), info.get("padding_idx")
            )
        elif kind == "int4-embedding":
            new = Int4Embedding(
                _read(tensors, f"{name}.qweight", path),
                _read(tensors, f"{name}.scales_and_zeros", path),
                int(info["group_size"]),
                info.get("padding_idx"),
            )
        elif kind == "sparse":
            weight = _unpack_sparse(
                _read(tensors, f"{name}.values", path), _read(tensors, f"{name}.mask", path), list(info["shape"])
            )
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias, requires_grad=False)
            new = linear
        else:
            raise ModelLoadError(f"artifact {path}: module {name} has unknown kind {kind!r}")
        set_module(model, name, new)
        replaced.add(name)
    dense = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in replaced}
    result = model.load_state_dict(dense, strict=False, assign=True)
    if config.tie_word_embeddings and "lm_head" not in replaced and "lm_head.weight" not in dense:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [k for k in result.missing_keys if k.rpartition(".")[0] not in replaced and k != "lm_head.weight"]
    if missing:
        raise ModelLoadError(
            f"artifact {path} is corrupt: tensors missing from {WEIGHTS_FILE}: {', '.join(missing[:5])}"
        )
    # Non-persistent buffers (rotary frequencies) are not in the file; rebuild them for real.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelLoadError(f"artifact {path} is corrupt: no data for {', '.join(leftover[:5])}")
    model.to(device=device, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    log.debug("artifact loaded", extra={"path": str(path), "modules": len(replaced), "pid": os.getpid()})
    return model, tokenizer
