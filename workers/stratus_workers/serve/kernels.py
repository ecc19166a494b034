"""Triton kernels for the runner's CUDA decode step (optional: the runner falls back to torch ops).

`decode_attention` is one kernel for what torch does in four (q.kᵀ, mask, softmax, p.v): a
decode step's attention of one query per row against that row's own cached keys, reading each
key and value once. A step of a small model is a few hundred kernels long, so every kernel cut
matters; the bound on keys comes from the row lengths on the device, so one CUDA graph serves
every cache length. With `rows`, each query names its cache row, so the same kernel attends the tokens of
a verification packed without padding: every token is a query at its own position in its own row (its
row's new keys are written first, which makes it causal within the new tokens too).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (the edge image) have no triton
    triton = None
    tl = None

AVAILABLE = triton is not None


if triton is not None:

    # No annotations on a kernel's parameters: Triton reads them as types (and knows no `Any`).
    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _decode_attention_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, rows_ptr,
        stride_qb, stride_qh,
        stride_kr, stride_kh, stride_kl,
        stride_vr, stride_vh, stride_vl,
        stride_ob, stride_oh,
        scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One program per (query, kv head): the GROUP query heads that share this kv head. Query b reads
        # cache row b, or rows[b] when the queries name their rows.
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        if HAS_ROWS:
            row = tl.load(rows_ptr + b)
        else:
            row = b
        n_keys = tl.load(pos_ptr + b) + 1  # keys 0..pos inclusive (this step's key is already written)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        live = g < GROUP
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=live[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_base = k_ptr + row * stride_kr + kv_head * stride_kh
        v_base = v_ptr + row * stride_vr + kv_head * stride_vh
        for start in tl.range(0, n_keys, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < n_keys
            k = tl.load(k_base + n[:, None] * stride_kl + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vl + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=live[:, None],
        )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (rows 0..B-1, or rows[b] for query b); caches [R, Hkv, L, D]; pos [B]: query b attends to
    keys 0..pos[b] of its row.

    Returns [B, Hq * D]. Needs CUDA tensors, a power-of-two head size of at least 16, and Hq a
    multiple of Hkv (grouped-query heads are consecutive, as in Hugging Face's repeat_kv).
    """
    assert triton is not None
    batch, n_q, head_dim = q.shape
    n_kv = k_cache.shape[1]
    group = n_q // n_kv
    out = torch.empty_like(q)
    _decode_attention_kernel[(batch, n_kv)](
        q, k_cache, v_cache, out, pos, pos if rows is None else rows,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        scale,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=64,
        HAS_ROWS=rows is not None,
        # float32 stays float32 (Triton's default would round the products to TensorFloat-32, which torch's
        # own float32 matrix products do not: the decode step and a verification would disagree).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32: the default, ignored for 16-bit
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out.view(batch, n_q * head_dim)


def supports(head_dim: int, n_q: int, n_kv: int) -> bool:
    """Whether `decode_attention` handles this attention shape."""
    return AVAILABLE and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and n_q % n_kv == 0
