"""Triton kernels of the fused small-batch decode layer: the matrix-vector products with their norms and epilogues.

At a few rows a decode step is bound by reading the weights once and by launching kernels, not by
arithmetic; the compiled step spends 12 kernels a layer (norm, q|k|v, two rotary kernels, attention, o,
norm, gate|up, SiLU, down and cuBLAS's split-K reduce), this layer 5:

1. `norm_qkv_rope`: the residual add and RMS norm (each program recomputes it over the whole input row,
   which is only `hidden` elements), the q|k|v product, bias, rotary and the cache write; one program
   also writes the new residual. A program takes matching rows of both halves of a head, which is what
   rotary (rotate_half) pairs.
2. `kernels.decode_attention`, unchanged.
3. `gemv` for the o projection.
4. `norm_gate_up`: residual add and norm again, the gate|up product and SiLU(gate) * up (a program takes
   matching gate and up rows).
5. `gemv` for the down projection (the next layer's residual delta).

Each program loops over the batch's rows, so the weights are read once for all of them. The rounding
follows the torch step's eager arithmetic (LlamaRMSNorm's, rotary's, SiLU's: each product rounded to the
model's dtype where torch rounds it); only the products' summation order differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (the edge image) have no triton
    triton = None
    tl = None

AVAILABLE = triton is not None

# Decode steps of at most this many rows run the fused layer (the batch buckets 1, 2, 4 and 8).
MAX_BATCH = 8
# A launch shape keeps at least this many programs where it can (two for each of an H200's 132 multiprocessors).
MIN_PROGRAMS = 256
# The most fp32 values a program's product tile ([rows of the batch, weight rows, BLOCK_K]) may hold.
TILE_LIMIT = 8192


@dataclass(frozen=True)
class Blocks:
    """A GEMV's launch shape: `n` weight rows a program (per half, for the paired kernels), `k` columns a step;
    `stages`: the loads Triton's pipeliner keeps in flight ahead of the products."""

    n: int
    k: int
    warps: int
    stages: int = 2


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def blocks_for(kind: str, n_out: int, k_in: int, batch: int, head_dim: int = 0) -> Blocks:
    """The launch shape of kernel `kind` ("qkv", "gate_up" or "plain") for `n_out` output rows (per half for
    gate_up: the intermediate size), `k_in` columns and `batch` rows.

    From an H200 sweep of batch-1 GEMVs (docs/bench-data/gpu-2026-11-30/gemv-09ee46d.txt, whose smallest tile won
    every shape): 8 weight rows a program (4 of each half for the paired kernels), fewer (down to 2 of each half)
    while that leaves under MIN_PROGRAMS programs (the 135M config's small products); 512 columns a step, or the
    one of 512, 256 and 128 that pads `k_in` least (576 gets 128; a masked lane reads nothing), halved while the
    product tile is too big for the batch; warps by `warps_for`. Except that an input shorter than 2,048 is taken
    1,024 columns a step (the 135M config's 576 in one step, its 1,536 in two), keeping the narrower step's warps: on
    an H200 that cut the 135M decode step at one row from 842 to 546 µs, and one stream through the server from
    1,070 to 1,584 tokens/s (docs/bench-data/gpu-2026-11-30-s10/; the kernel sweep, whose weights stay in L2
    between launches, had not shown it). Inputs of 2,048 and more (the ~1B config's) as whole decode steps
    measured best (docs/bench-data/gpu-2026-12-01-s11/, 1,037 -> 857 µs at one row): the plain GEMV (o, down) 2 rows
    a program, 1,024 columns a step, 2 warps (the ~1B's 2,048 outputs then make 1,024 programs instead of 256, whose
    loads in flight were too few: cuBLAS's split-K down beat them, not these); q|k|v 1,024 columns a step; gate|up 2
    warps at its 512 columns (1,024 was slower there).
    """
    k = min((512, 256, 128), key=lambda b: (-(-k_in // b) * b, -b))
    halves = 2 if kind != "plain" else 1
    rows = 8
    total = n_out * (2 if kind == "gate_up" else 1)  # weight rows in all
    while rows > 2 * halves and -(-total // rows) < MIN_PROGRAMS:
        rows //= 2
    n = rows // halves
    if kind == "qkv":
        n = min(n, head_dim // 2)
    k = _fit(k, n * halves, batch)
    warps = warps_for(kind, n * halves, k, n_out)
    if k_in < 2048:  # (the warps stay those of the narrower step: as measured)
        k = _fit(1024, n * halves, batch)
    elif kind == "plain":
        n, k, warps = 2, _fit(1024, 2, batch), 2
    elif kind == "qkv":
        k = _fit(1024, n * halves, batch)
    else:  # gate_up
        warps = 2
    return Blocks(n, k, warps)


def _fit(k: int, rows: int, batch: int) -> int:
    """`k` halved while the product tile ([batch rows, weight rows, k]) is too big."""
    while _pow2_at_least(batch) * rows * k > TILE_LIMIT and k > 64:
        k //= 2
    return k


def warps_for(kind: str, rows: int, k: int, n_out: int) -> int:
    """Warps for a program of `rows` weight rows by `k` columns: enough that each thread loads at least 8 elements
    (one 16-byte load), at most 4 (this module's own sweep on an H200, docs/bench-data/gpu-2026-11-30/
    gemv-layer-sweep-1b.txt: 4 warps beat 8 for the ~1B config's o (3.78 against 3.99 µs) and down (10.52 against
    11.38 µs), where the forerunner's plain GEMV had liked 8). `kind` and `n_out` are kept for a rule that needs
    them."""
    del kind, n_out
    return max(1, min(4, rows * k // 256))


def supports(head_dim: int, n_q: int, n_kv: int) -> bool:
    """Whether the fused layer handles this attention shape (Triton, a power-of-two head size of at least 16)."""
    return AVAILABLE and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and n_q % n_kv == 0


if triton is not None:

    # No annotations on a kernel's parameters: Triton reads them as types (and knows no `Any`).
    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _residual(h_ptr, d_ptr, stride_h, stride_d, b, k, mask, HAS_DELTA: tl.constexpr):  # type: ignore[no-untyped-def]
        # h + delta rounded to the model's dtype, as torch's add leaves it.
        h = tl.load(h_ptr + b[:, None] * stride_h + k[None, :], mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + b[:, None] * stride_d + k[None, :], mask=mask, other=0.0)
            h = (h.to(tl.float32) + d.to(tl.float32)).to(h.dtype)
        return h

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _rows_dot(x, w, B_PAD: tl.constexpr):  # type: ignore[no-untyped-def]
        # x [B_PAD, K] times w [N, K] transposed, float32: [B_PAD, N]. One row is the plain GEMV's 2-D tile (the
        # layout the batch-1 sweep measured); more rows broadcast to [B_PAD, N, K].
        if B_PAD == 1:
            out = tl.sum(w * x, axis=1)[None, :]
        else:
            out = tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        return out

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _norm_rstd(  # type: ignore[no-untyped-def]
        h_ptr, d_ptr, hout_ptr, stride_h, stride_d, stride_o, batch, hidden, eps, write,
        B_PAD: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DELTA: tl.constexpr,
    ):
        # Each row's 1 / RMS of h + delta (float32, [B_PAD]); with `write`, h + delta stored to hout (the residual).
        b = tl.arange(0, B_PAD)
        live = b < batch
        ss = tl.zeros([B_PAD], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = live[:, None] & (k[None, :] < hidden)
            s = _residual(h_ptr, d_ptr, stride_h, stride_d, b, k, mask, HAS_DELTA)
            if write:
                tl.store(hout_ptr + b[:, None] * stride_o + k[None, :], s, mask=mask)
            sf = s.to(tl.float32)
            ss += tl.sum(sf * sf, axis=1)
        return tl.rsqrt(ss / hidden + eps)

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _normed(  # type: ignore[no-untyped-def]
        h_ptr, d_ptr, nw_ptr, stride_h, stride_d, b, k, mask, rstd, hidden, HAS_DELTA: tl.constexpr,
    ):
        # LlamaRMSNorm's arithmetic on one chunk: normalise in float32, round, scale in the model's dtype.
        s = _residual(h_ptr, d_ptr, stride_h, stride_d, b, k, mask, HAS_DELTA)
        x = (s.to(tl.float32) * rstd[:, None]).to(s.dtype)
        w = tl.load(nw_ptr + k, mask=k < hidden, other=0.0)
        return (w[None, :].to(tl.float32) * x.to(tl.float32)).to(s.dtype).to(tl.float32)

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _norm_qkv_rope_kernel(  # type: ignore[no-untyped-def]
        h_ptr, d_ptr, hout_ptr, nw_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, rows_ptr, q_ptr, k_ptr, v_ptr,
        stride_h, stride_d, stride_o, stride_cos, stride_sin, stride_q,
        stride_kr, stride_kh, stride_kl,
        stride_vr, stride_vh, stride_vl,
        batch, hidden, eps,
        N_Q: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
        B_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        # One program: BLOCK_H rows of the first half of one head of q|k|v and their rotary partners in the second.
        pid = tl.program_id(0)
        PER_HEAD: tl.constexpr = HEAD_DIM // 2 // BLOCK_H
        head = pid // PER_HEAD
        d1 = (pid % PER_HEAD) * BLOCK_H + tl.arange(0, BLOCK_H)
        d2 = d1 + HEAD_DIM // 2
        r1 = head * HEAD_DIM + d1
        r2 = head * HEAD_DIM + d2
        b = tl.arange(0, B_PAD)
        live = b < batch
        rstd = _norm_rstd(
            h_ptr, d_ptr, hout_ptr, stride_h, stride_d, stride_o, batch, hidden, eps, pid == 0, B_PAD, BLOCK_K,
            HAS_DELTA,
        )
        acc1 = tl.zeros([B_PAD, BLOCK_H], tl.float32)
        acc2 = tl.zeros([B_PAD, BLOCK_H], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < hidden
            x = _normed(h_ptr, d_ptr, nw_ptr, stride_h, stride_d, b, k, live[:, None] & kmask[None, :], rstd, hidden,
                        HAS_DELTA)  # fmt: skip
            w1 = tl.load(w_ptr + r1[:, None] * hidden + k[None, :], mask=kmask[None, :], other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + r2[:, None] * hidden + k[None, :], mask=kmask[None, :], other=0.0).to(tl.float32)
            acc1 += _rows_dot(x, w1, B_PAD)
            acc2 += _rows_dot(x, w2, B_PAD)
        dtype = q_ptr.dtype.element_ty
        if HAS_BIAS:  # added in the float32 accumulator and rounded once, as F.linear's epilogue does
            acc1 += tl.load(bias_ptr + r1)[None, :].to(tl.float32)
            acc2 += tl.load(bias_ptr + r2)[None, :].to(tl.float32)
        a = acc1.to(dtype).to(tl.float32)
        c = acc2.to(dtype).to(tl.float32)
        pos = tl.load(pos_ptr + b, mask=live, other=0)
        bmask = live[:, None]
        if head < N_Q + N_KV:
            # rotate_half: the first half takes -second * sin, the second first * sin; each product rounded.
            cos1 = tl.load(cos_ptr + pos[:, None] * stride_cos + d1[None, :], mask=bmask, other=0.0).to(tl.float32)
            cos2 = tl.load(cos_ptr + pos[:, None] * stride_cos + d2[None, :], mask=bmask, other=0.0).to(tl.float32)
            sin1 = tl.load(sin_ptr + pos[:, None] * stride_sin + d1[None, :], mask=bmask, other=0.0).to(tl.float32)
            sin2 = tl.load(sin_ptr + pos[:, None] * stride_sin + d2[None, :], mask=bmask, other=0.0).to(tl.float32)
            o1 = ((a * cos1).to(dtype).to(tl.float32) - (c * sin1).to(dtype).to(tl.float32)).to(dtype)
            o2 = ((c * cos2).to(dtype).to(tl.float32) + (a * sin2).to(dtype).to(tl.float32)).to(dtype)
        else:
            o1 = a.to(dtype)
            o2 = c.to(dtype)
        if head < N_Q:
            tl.store(q_ptr + b[:, None] * stride_q + r1[None, :], o1, mask=bmask)
            tl.store(q_ptr + b[:, None] * stride_q + r2[None, :], o2, mask=bmask)
        else:
            # k or v: straight into the cache at (row, kv head, the row's position), where the attention reads it.
            row = tl.load(rows_ptr + b, mask=live, other=0)
            if head < N_Q + N_KV:
                base = k_ptr + row * stride_kr + (head - N_Q) * stride_kh + pos * stride_kl
            else:
                base = v_ptr + row * stride_vr + (head - N_Q - N_KV) * stride_vh + pos * stride_vl
            tl.store(base[:, None] + d1[None, :], o1, mask=bmask)
            tl.store(base[:, None] + d2[None, :], o2, mask=bmask)

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _norm_gate_up_kernel(  # type: ignore[no-untyped-def]
        h_ptr, d_ptr, hout_ptr, nw_ptr, w_ptr, act_ptr,
        stride_h, stride_d, stride_o, stride_a,
        batch, hidden, inter, eps,
        B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One program: BLOCK_N gate rows and the matching up rows; SiLU(gate) * up out.
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < inter
        b = tl.arange(0, B_PAD)
        live = b < batch
        rstd = _norm_rstd(
            h_ptr, d_ptr, hout_ptr, stride_h, stride_d, stride_o, batch, hidden, eps, pid == 0, B_PAD, BLOCK_K, True
        )
        acc_g = tl.zeros([B_PAD, BLOCK_N], tl.float32)
        acc_u = tl.zeros([B_PAD, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < hidden
            x = _normed(h_ptr, d_ptr, nw_ptr, stride_h, stride_d, b, k, live[:, None] & kmask[None, :], rstd, hidden,
                        True)  # fmt: skip
            wmask = nmask[:, None] & kmask[None, :]
            wg = tl.load(w_ptr + n[:, None] * hidden + k[None, :], mask=wmask, other=0.0).to(tl.float32)
            wu = tl.load(w_ptr + (n + inter)[:, None] * hidden + k[None, :], mask=wmask, other=0.0).to(tl.float32)
            acc_g += _rows_dot(x, wg, B_PAD)
            acc_u += _rows_dot(x, wu, B_PAD)
        dtype = act_ptr.dtype.element_ty
        g = acc_g.to(dtype).to(tl.float32)
        u = acc_u.to(dtype).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        out_mask = live[:, None] & nmask[None, :]
        tl.store(act_ptr + b[:, None] * stride_a + n[None, :], (silu * u).to(dtype), mask=out_mask)

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _gemv_kernel(  # type: ignore[no-untyped-def]
        x_ptr, w_ptr, y_ptr, stride_x, stride_y, batch, n_out, k_in,
        B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # y = x Wᵀ for a few rows of x: BLOCK_N weight rows a program, read once for every row.
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < n_out
        b = tl.arange(0, B_PAD)
        live = b < batch
        acc = tl.zeros([B_PAD, BLOCK_N], tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < k_in
            x = tl.load(x_ptr + b[:, None] * stride_x + k[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr + n[:, None] * k_in + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc += _rows_dot(x.to(tl.float32), w.to(tl.float32), B_PAD)
        tl.store(
            y_ptr + b[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty),
            mask=live[:, None] & nmask[None, :],
        )  # fmt: skip


def _check(batch: int, weights: tuple[torch.Tensor, ...], *tensors: torch.Tensor) -> None:
    if not 0 < batch <= MAX_BATCH:
        raise ValueError(f"the fused layer's kernels take 1 to {MAX_BATCH} rows, not {batch}")
    for w in weights:
        if not w.is_contiguous():
            raise ValueError(f"the fused layer's kernels need contiguous weights (got strides {w.stride()})")
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the fused layer's kernels need rows of contiguous elements (got strides {t.stride()})")


def norm_qkv_rope(
    h: torch.Tensor,
    delta: torch.Tensor | None,
    norm_w: torch.Tensor,
    eps: float,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_q: int,
    blocks: Blocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h + delta (the residual; delta None: zero), its RMS norm, the q|k|v product (+ b_qkv), rotary at `pos` and
    the cache write: k and v of row b to (rows[b], kv head, pos[b]) of the caches [R, Hkv, L, D].

    h, delta [B, hidden]; w_qkv [(n_q + 2 Hkv) * D, hidden] contiguous; cos, sin: the rotary tables [L, D] (row p
    for position p). Returns the new residual [B, hidden] and q [B, n_q, D].
    """
    assert triton is not None
    batch, hidden = h.shape
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    _check(batch, (norm_w, w_qkv), h, cos, sin, k_cache, v_cache, *(() if delta is None else (delta,)))
    blocks = blocks or blocks_for("qkv", w_qkv.shape[0], hidden, batch, head_dim)
    if (head_dim // 2) % blocks.n:
        raise ValueError(f"{blocks.n} rows of each half a program do not divide a head of {head_dim}")
    h_out = torch.empty_like(h)
    q = torch.empty(batch, n_q, head_dim, dtype=h.dtype, device=h.device)
    delta_t = h if delta is None else delta
    _norm_qkv_rope_kernel[((n_q + 2 * n_kv) * (head_dim // 2 // blocks.n),)](
        h, delta_t, h_out, norm_w, w_qkv, w_qkv if b_qkv is None else b_qkv, cos, sin, pos, rows, q, k_cache, v_cache,
        h.stride(0), delta_t.stride(0), h_out.stride(0), cos.stride(0), sin.stride(0), q.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        batch, hidden, eps,
        N_Q=n_q, N_KV=n_kv, HEAD_DIM=head_dim,
        B_PAD=_pow2_at_least(batch), BLOCK_H=blocks.n, BLOCK_K=blocks.k,
        HAS_DELTA=delta is not None, HAS_BIAS=b_qkv is not None,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return h_out, q


def norm_gate_up(
    h: torch.Tensor,
    delta: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    w_gate_up: torch.Tensor,
    blocks: Blocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h + delta (the residual), its RMS norm, the gate|up product ([2 * I, hidden] contiguous) and SiLU(gate) * up.

    Returns the new residual [B, hidden] and the activation [B, I].
    """
    assert triton is not None
    batch, hidden = h.shape
    inter = w_gate_up.shape[0] // 2
    _check(batch, (norm_w, w_gate_up), h, delta)
    blocks = blocks or blocks_for("gate_up", inter, hidden, batch)
    h_out = torch.empty_like(h)
    act = torch.empty(batch, inter, dtype=h.dtype, device=h.device)
    _norm_gate_up_kernel[(triton.cdiv(inter, blocks.n),)](
        h, delta, h_out, norm_w, w_gate_up, act,
        h.stride(0), delta.stride(0), h_out.stride(0), act.stride(0),
        batch, hidden, inter, eps,
        B_PAD=_pow2_at_least(batch), BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return h_out, act


def gemv(x: torch.Tensor, w: torch.Tensor, blocks: Blocks | None = None) -> torch.Tensor:
    """x [B, K] times w [N, K] (contiguous) transposed: [B, N], for a few rows of x (F.linear without bias)."""
    assert triton is not None
    batch, k_in = x.shape
    n_out = w.shape[0]
    _check(batch, (w,), x)
    blocks = blocks or blocks_for("plain", n_out, k_in, batch)
    y = torch.empty(batch, n_out, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_out, blocks.n),)](
        x, w, y, x.stride(0), y.stride(0), batch, n_out, k_in,
        B_PAD=_pow2_at_least(batch), BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return y
