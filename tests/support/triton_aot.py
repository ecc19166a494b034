"""Compiles serve/gemv.py's kernels for a GPU without one (Hopper's sm_90 by default): `python triton_aot.py`.

Triton's interpreter, which runs the kernels in the CPU tests, checks neither the compiler's typing of branches
nor its layouts; this compiles every launch shape the block rule picks for the 1b and 135M configs at batches 1 to
8, as Triton's just-in-time compiler would specialise them (16-byte aligned pointers, sizes divisible by 16), to
PTX and a cubin. Run it without TRITON_INTERPRET (the tests run it in a process of its own). The shapes come
from models.tiny's configs; Triton is imported only to compile, so a test without it can read them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M
from stratus_workers.serve import gemv

if TYPE_CHECKING:
    from triton.backends.compiler import GPUTarget

POINTERS = {"pos_ptr": "*i64", "rows_ptr": "*i64"}


def shapes(arch: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, query heads, kv heads, head size) of a models.tiny architecture (head size as
    transformers' Llama takes it when the config names none)."""
    heads = arch["num_attention_heads"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // heads
    return arch["hidden_size"], arch["intermediate_size"], heads, arch["num_key_value_heads"], head_dim


CONFIGS = {"1b": shapes(SMOLLM2_1B), "135m": shapes(SMOLLM2_135M)}


def compile_kernel(fn: Any, consts: dict[str, Any], sizes: dict[str, int], warps: int, target: GPUTarget) -> Any:
    import triton
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {}
    for name in names:
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
    # The JIT's specialisation: aligned pointers, and ints divisible by 16 marked so.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(names)
        if signature[name].startswith("*") or (name in sizes and sizes[name] % 16 == 0)
    }
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": 2})


def main(arch: int = 90) -> int:
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    count = 0
    for hidden, inter, n_q, n_kv, d in CONFIGS.values():
        strides = {"stride_h": hidden, "stride_d": hidden, "stride_o": hidden, "stride_cos": d, "stride_sin": d,
                   "stride_q": n_q * d, "stride_kr": n_kv * 1200 * d, "stride_kh": 1200 * d, "stride_kl": d,
                   "stride_vr": n_kv * 1200 * d, "stride_vh": 1200 * d, "stride_vl": d, "stride_a": inter,
                   "stride_x": hidden, "stride_y": hidden}  # fmt: skip
        for batch in (1, 2, 4, 8):
            b_pad = gemv._pow2_at_least(batch)
            sizes = {**strides, "hidden": hidden, "inter": inter, "batch": batch}
            blocks = gemv.blocks_for("qkv", (n_q + 2 * n_kv) * d, hidden, batch, d)
            for has_delta, has_bias in ((True, False), (False, True)):
                consts = dict(N_Q=n_q, N_KV=n_kv, HEAD_DIM=d, B_PAD=b_pad, BLOCK_H=blocks.n, BLOCK_K=blocks.k,
                              HAS_DELTA=has_delta, HAS_BIAS=has_bias)  # fmt: skip
                compile_kernel(gemv._norm_qkv_rope_kernel, consts, sizes, blocks.warps, target)
            blocks = gemv.blocks_for("gate_up", inter, hidden, batch)
            consts = dict(B_PAD=b_pad, BLOCK_N=blocks.n, BLOCK_K=blocks.k)
            compile_kernel(gemv._norm_gate_up_kernel, consts, sizes, blocks.warps, target)
            for n_out, k_in in ((hidden, n_q * d), (hidden, inter)):  # o, down
                blocks = gemv.blocks_for("plain", n_out, k_in, batch)
                consts = dict(B_PAD=b_pad, BLOCK_N=blocks.n, BLOCK_K=blocks.k)
                plain = {**sizes, "stride_x": k_in, "n_out": n_out, "k_in": k_in}
                compile_kernel(gemv._gemv_kernel, consts, plain, blocks.warps, target)
            count += 5
    print(f"compiled {count} kernels for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:])))
