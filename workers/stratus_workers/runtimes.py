"""The engines that serve a model (torch, llama.cpp) and the GGUF weight types llama.cpp serves; torch-free."""

from __future__ import annotations

from typing import Any, Literal, get_args

Runtime = Literal["torch", "llamacpp"]
RUNTIME_TORCH: Runtime = "torch"
RUNTIME_LLAMACPP: Runtime = "llamacpp"
RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)

GGUFType = Literal["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0", "q4_1"]
# Each GGUF type as llama.cpp's `llama_ftype` number (its quantizer's target). K-quants need rows
# divisible by 256; llama.cpp quantizes the other tensors of such a model (SmolLM2's 576-wide ones)
# with a fallback type of similar size.
GGUF_FTYPES: dict[GGUFType, int] = {
    "f32": 0,
    "f16": 1,
    "q8_0": 7,
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_0": 8,
    "q4_k_m": 15,
    "q4_0": 2,
    "q4_1": 3,
}

# Speculative-decoding sessions a model server holds by default (its --max-sessions): each is one more
# cache row beside the decode batch's, which a llama.cpp server allocates up front.
DEFAULT_MAX_SESSIONS = 4
# llama.cpp's KV cache holds keys and values in f16.
LLAMACPP_KV_VALUE_BYTES = 2


def kv_bytes_per_token(config: Any, value_bytes: int) -> int:
    """Bytes one token takes in a KV cache of `config`'s model (keys and values of every layer)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers) * 2 * kv_heads * head_dim * value_bytes


def llamacpp_cache_bytes(per_token: int, *, max_batch_size: int, max_tokens: int, max_sessions: int) -> int:
    """What a llama.cpp server allocates for its cache at start: every row (batch and sessions) at full length."""
    return per_token * (max_batch_size + max_sessions) * max_tokens
