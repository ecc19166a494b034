"""Writes a torch Llama model as GGUF (f32, with `gguf`) and quantizes it with llama.cpp's own quantizer.

The compression Job's last step for a `gguf` recipe: whatever distillation and pruning made in torch
is written once in full precision, then `llama_model_quantize` (llama.cpp's quantizer, reached
through llama-cpp-python) turns it into the asked-for type, exactly as `llama-quantize` would.
The tensor names and the q/k row order follow llama.cpp's `convert_hf_to_gguf.py` for the `llama`
architecture; the tokenizer's vocabulary, merges and special ids go in as well so the file is a
complete model for llama.cpp tools, though Stratus itself tokenizes with the artifact's Hugging
Face tokenizer.
"""

from __future__ import annotations

import ctypes
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stratus_workers.models.gguf_artifact import GGUF_FILE
from stratus_workers.runtimes import GGUF_FTYPES

ARCH = "llama"
# gguf TokenType values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


class GGUFExportError(ValueError):
    """The model cannot be written as a llama.cpp `llama` GGUF; the message says why."""


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise GGUFExportError(f"rope type {rope_type!r} is not written to GGUF by Stratus; only default rotary")
    theta = getattr(config, "rope_theta", None) or (params.get("rope_theta") if isinstance(params, dict) else None)
    return float(theta or 10000.0)


def check_exportable(model: Any) -> None:
    """Raise GGUFExportError unless `model` is a plain Llama decoder with dense float linears."""
    config = model.config
    if getattr(config, "model_type", None) != ARCH:
        raise GGUFExportError(f"GGUF export supports model_type llama, not {getattr(config, 'model_type', '?')!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("GGUF export supports Llama models without attention or MLP biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"GGUF export supports the SiLU MLP, not {config.hidden_act!r}")
    _rope_theta(config)
    for name, module in model.named_modules():
        if name.endswith(("_proj", "lm_head", "embed_tokens")) and not isinstance(
            getattr(module, "weight", None), torch.Tensor
        ):
            raise GGUFExportError(f"{name} is {type(module).__name__}; GGUF export needs float weights")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # Hugging Face rotates the two halves of each head; llama.cpp's `llama` rope rotates pairs.
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(model: Any) -> dict[str, np.ndarray]:
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {
        "token_embd.weight": state["model.embed_tokens.weight"].numpy(),
        "output_norm.weight": state["model.norm.weight"].numpy(),
    }
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if not tied and "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"].numpy()
    for i in range(int(config.num_hidden_layers)):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            key = f"model.layers.{i}.{hf_name}"
            if key not in state:
                raise GGUFExportError(f"the model has no tensor {key}")
            data = state[key].numpy()
            if hf_name == "self_attn.q_proj.weight":
                data = _permute(data, heads)
            elif hf_name == "self_attn.k_proj.weight":
                data = _permute(data, kv_heads)
            out[f"blk.{i}.{gguf_name}"] = data
    return out


def _vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their llama.cpp types, and the BPE merges, from a Hugging Face fast tokenizer."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {token.content: token for token in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(token)
        special = added.get(token)
        types.append(TOKEN_NORMAL if special is None else TOKEN_CONTROL if special.special else TOKEN_USER_DEFINED)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizer.json) BPE tokenizer")
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')!r}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_gguf(model: Any, tokenizer: Any, path: Path, *, name: str = "") -> None:
    """Write `model` (a float Llama decoder) and its tokenizer as an f32 GGUF file at `path`."""
    import gguf

    check_exportable(model)
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    vocab_size = int(config.vocab_size)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(config.hidden_size) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(0)  # all f32
    tokens, types, merges = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    for setter, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, eos),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if isinstance(value, int):
            setter(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    for tensor_name, data in _tensors(model).items():
        writer.add_tensor(tensor_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_quantizer() -> None:
    """Raise GGUFExportError unless llama.cpp's quantizer (llama-cpp-python) is installed here."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise GGUFExportError(
            f"compression.quantization.method gguf needs llama-cpp-python in the compression image ({exc}); "
            "`make setup` installs it, or pick a torch method (int8-weight, int4-weight)"
        ) from None


def quantize_gguf(source: Path, target: Path, gguf_type: str, *, threads: int = 0) -> None:
    """Quantize the GGUF at `source` into `target` with llama.cpp's quantizer (as `llama-quantize` does)."""
    ftype = GGUF_FTYPES.get(gguf_type)  # type: ignore[call-overload]
    if ftype is None:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_FTYPES)}")
    check_quantizer()
    import llama_cpp

    from stratus_workers.serve.llamacpp import set_log_threshold

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    # A K-quant warns once per tensor it falls back on; the figures list the types the file ended up with.
    previous = set_log_threshold(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        set_log_threshold(previous)
    if status != 0:
        raise GGUFExportError(f"llama.cpp could not quantize {source} to {gguf_type} (status {status})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (what llama.cpp's fallbacks made of a K-quant)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        name = tensor.tensor_type.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def save_gguf_artifact(
    model: Any, tokenizer: Any, directory: Path, gguf_type: str, *, work_dir: Path, threads: int = 0
) -> dict[str, Any]:
    """Write config, tokenizer and `model.gguf` (quantized to `gguf_type`) into `directory`; returns figures."""
    directory.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    full = work_dir / "model-f32.gguf"
    try:
        write_gguf(model, tokenizer, full, name=directory.name)
        quantize_gguf(full, directory / GGUF_FILE, gguf_type, threads=threads)
    finally:
        full.unlink(missing_ok=True)
    return {"gguf_type": gguf_type, "tensor_types": tensor_types(directory / GGUF_FILE)}
