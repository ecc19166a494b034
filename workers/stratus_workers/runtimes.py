"""The engines that serve a model (torch, llama.cpp) and the GGUF weight types llama.cpp serves; torch-free."""

from __future__ import annotations

from typing import Literal, get_args

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
