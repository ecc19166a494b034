"""Triton kernels for the runner's CUDA decode step (optional: the runner falls back to torch ops).

`decode_attention` is one kernel for what torch does in four (q.kᵀ, mask, softmax, p.v): a
decode step's attention of one query per row against that row's own cached keys, reading each
key and value once. A step of a small model is a few hundred kernels long, so every kernel cut
matters; the bound on keys comes from the row lengths on the device, so one CUDA graph serves
every cache length. With `rows`, each query names its cache row. Where rows read many keys and
(row, kv head) programs are few, each row's keys are split over several programs (flash-decoding)
and a second kernel combines their partial softmaxes, as the packed pass does. A cascade step (rows sharing a
long prefix) reads the prefix once for all rows and each row's own keys in the same launch
(`_cascade_attention_kernel`), then combines.

`extend_attention` is the packed pass's (prefill and verification, packed without padding): every token is
a query at its own position in its own row, whose new keys are written first, which makes it causal within
the new tokens too. One program takes a block of up to 16 consecutive tokens of a row and reads the row's
keys once for all of them; where a few blocks read many keys, the keys are split over several programs and
a second kernel combines their partial softmaxes.

Without a GPU, Triton's interpreter runs these kernels (the CPU tests); it accepts tile shapes the
compiler refuses, so `extend_attention` checks them itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # CPU-only installs (the edge image) have no triton
    triton = None
    tl = None

    class OutOfResources(Exception):  # type: ignore[no-redef]  # never raised without triton
        """Stands for Triton's resource refusal where Triton is not installed."""

AVAILABLE = triton is not None

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """An attention kernel's tuning: keys per loop iteration, warps per program, software-pipeline stages."""

    block_n: int = 64
    warps: int = 4
    stages: int = 2


# Chosen by tests/bench/gpu_attention_sweep.py on an H200 (docs/benchmarks.md, "Session 14"): two warps and three
# stages wherever a program's tile is small (a decode step's 16 lines; an extend block of at most 32, the ~1B
# configuration's one query head a kv head), 5-20% faster there; tiles of 64-128 lines (the 135M's grouped heads)
# ran 13x slower with two warps (most likely spilled registers; not profiled), and take 32 keys a step instead. A
# decode step of few (row, kv head) programs (one stream, a few) is latency-bound: 128 keys a step and four warps
# take 11-28% off its kernel. Split decode kept the old launch (5% slower with the new ones).
SMALL_TILE_LAUNCH = Launch(block_n=64, warps=2, stages=3)
SMALL_TILE_LINES = 32
WIDE_TILE_LAUNCH = Launch(block_n=32, warps=4, stages=3)
FEW_PROGRAMS_DECODE_LAUNCH = Launch(block_n=128, warps=4, stages=3)
FEW_DECODE_PROGRAMS = 128
# What every kernel ran with before the sweep, and split decode steps still do: the least shared memory (32 KB a
# program), taken too where a GPU refuses a chosen launch (one of less shared memory than an H100's, for the chosen
# launches' 48-96 KB).
BASE_LAUNCH = Launch()


def decode_launch(splits: int, programs: int) -> Launch:
    """`decode_attention`'s launch for a step of `splits` key splits and `programs` (query, kv head) pairs."""
    if splits > 1:
        return BASE_LAUNCH
    return FEW_PROGRAMS_DECODE_LAUNCH if programs <= FEW_DECODE_PROGRAMS else SMALL_TILE_LAUNCH  # 16 lines a tile


def extend_launch(lines: int) -> Launch:
    """`extend_attention`'s launch for a tile of `lines` (token, head) lines."""
    return SMALL_TILE_LAUNCH if lines <= SMALL_TILE_LINES else WIDE_TILE_LAUNCH


_refused: set[tuple[str, Launch]] = set()


def launch_kernel(kernel: Any, grid: tuple[int, ...], launch: Launch | None, chosen: Launch, *args: Any,
                  **meta: Any) -> None:
    """Run `kernel[grid](*args, **meta)` with `launch`, else `chosen`; where this GPU refuses `chosen` for its
    resources (Triton's OutOfResources: shared memory, registers), with BASE_LAUNCH from then on. An explicit
    `launch` (a sweep's) is never replaced: its refusal is the caller's to see."""
    if launch is not None:
        kernel[grid](*args, BLOCK_N=launch.block_n, num_warps=launch.warps, num_stages=launch.stages, **meta)
        return
    key = (getattr(kernel, "__name__", repr(kernel)), chosen)
    use = BASE_LAUNCH if key in _refused else chosen
    try:
        kernel[grid](*args, BLOCK_N=use.block_n, num_warps=use.warps, num_stages=use.stages, **meta)
    except OutOfResources as exc:
        if use == BASE_LAUNCH:
            raise
        log.warning("attention launch %s refused here (%s); using %s", use, exc, BASE_LAUNCH)
        _refused.add(key)
        launch_kernel(kernel, grid, BASE_LAUNCH, BASE_LAUNCH, *args, **meta)


if triton is not None:

    # No annotations on a kernel's parameters: Triton reads them as types (and knows no `Any`).
    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _store_split(base, line, acc, m_i, l_i, HEAD_DIM: tl.constexpr, live):  # type: ignore[no-untyped-def]
        # One split's partial softmax of its `live` lines, at `base`: [lines, HEAD_DIM + 2] float32 (acc, max, sum).
        d = tl.arange(0, HEAD_DIM)
        tl.store(base + line[:, None] * (HEAD_DIM + 2) + d[None, :], acc, mask=live[:, None])
        tl.store(base + line * (HEAD_DIM + 2) + HEAD_DIM, m_i, mask=live)
        tl.store(base + line * (HEAD_DIM + 2) + HEAD_DIM + 1, l_i, mask=live)

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _merge_splits(  # type: ignore[no-untyped-def]
        base, line, LINES: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, split_stride
    ):
        # The SPLITS partials `_store_split` left from `base` on (`split_stride` apart), rescaled to their common
        # maximum and summed, split after split: a decode step's combine (a few lines a program, many programs).
        d = tl.arange(0, HEAD_DIM)
        m = tl.full([LINES], float("-inf"), tl.float32)
        for split in tl.static_range(SPLITS):
            m = tl.maximum(m, tl.load(base + split * split_stride + line * (HEAD_DIM + 2) + HEAD_DIM))
        total = tl.zeros([LINES], tl.float32)
        acc = tl.zeros([LINES, HEAD_DIM], tl.float32)
        for split in tl.static_range(SPLITS):
            at = base + split * split_stride
            weight = tl.exp(tl.load(at + line * (HEAD_DIM + 2) + HEAD_DIM) - m)  # 0 for a split that saw nothing
            total += weight * tl.load(at + line * (HEAD_DIM + 2) + HEAD_DIM + 1)
            acc += weight[:, None] * tl.load(at + line[:, None] * (HEAD_DIM + 2) + d[None, :])
        return acc / total[:, None]

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _merge_splits_at_once(  # type: ignore[no-untyped-def]
        base, line, LINES: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, split_stride
    ):
        # `_merge_splits`, all the splits loaded as one [SPLITS, LINES, HEAD_DIM] tile (SPLITS a power of two): an
        # extend pass's combine, whose programs are few (one turn after a long cached prefix: 16 splits of one
        # block's 128 lines). On an H200 a cached turn's attention (32 tokens after 2,992 shared keys, as a graph
        # pads it) took 12.7 µs a layer against 16.4 split after split (135M), 20.5 against 22.0 (~1B)
        # (`gpu_attention_sweep.py --cached-turn`); a cascade decode step (64 rows), whose combine merges 17 parts of
        # a few lines in each of many programs, took 16.8 µs a layer this way against 13.7, and keeps
        # `_merge_splits`.
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        at = base + s[:, None] * split_stride + line[None, :] * (HEAD_DIM + 2)
        m = tl.load(at + HEAD_DIM)
        weight = tl.exp(m - tl.max(m, 0)[None, :])  # 0 for a split that saw nothing
        total = tl.sum(weight * tl.load(at + HEAD_DIM + 1), 0)
        return tl.sum(weight[:, :, None] * tl.load(at[:, :, None] + d[None, None, :]), 0) / total[:, None]

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _attend_split(  # type: ignore[no-untyped-def]
        q, k_base, v_base, stride_kl, stride_vl, first, n_keys, q_pos, split, scale,
        LINES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # The online softmax of q's LINES lines over this split's share of keys first..n_keys-1 (the shares are
        # BLOCK_N-aligned), line i seeing keys up to q_pos[i], which must lie below n_keys (the tile's keys past
        # n_keys load as zeros and only q_pos masks them): the unnormalised sum, the maximum and the sum of
        # weights (a line that saw no key of the split keeps -inf and 0, which _merge_splits weighs 0).
        per_split = tl.cdiv(tl.cdiv(n_keys - first, SPLITS), BLOCK_N) * BLOCK_N
        lo = first + split * per_split
        hi = tl.minimum(n_keys, lo + per_split)
        d = tl.arange(0, HEAD_DIM)
        m_i = tl.full([LINES], float("-inf"), tl.float32)
        l_i = tl.zeros([LINES], tl.float32)
        acc = tl.zeros([LINES, HEAD_DIM], tl.float32)
        for start in tl.range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < hi
            k = tl.load(k_base + n[:, None] * stride_kl + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(n[None, :] <= q_pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vl + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _own_keys_program(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, rows_ptr, part_ptr, shared_ptr,
        stride_qb, stride_qh,
        stride_kr, stride_kh, stride_kl,
        stride_vr, stride_vh, stride_vl,
        stride_ob, stride_oh,
        scale, b, kv_head, split, batch, n_heads,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_ROWS: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, CHUNKS: tl.constexpr,
    ):
        # The (query b, kv head, split) program: the GROUP query heads that share this kv head, against the split's
        # share of the row's keys (all of them with one split). Query b reads cache row b, or rows[b] when the
        # queries name their rows. With SPLITS > 1 the partial softmaxes go to `part` for _decode_combine_kernel: a
        # batch of a few rows of long context is otherwise too few programs to keep the GPU's memory busy. With
        # CHUNKS (a cascade step, one split) the row's first shared[row] keys are the shared prefix's, which
        # `_prefix_program` reads for every row at once in CHUNKS chunks: this program reads the rest and leaves its
        # partial after theirs, [CHUNKS + 1, queries, heads, HEAD_DIM + 2].
        if HAS_ROWS:
            row = tl.load(rows_ptr + b)
        else:
            row = b
        n_keys = tl.load(pos_ptr + b) + 1  # keys 0..pos inclusive (this step's key is already written)
        first = 0
        if CHUNKS > 0:
            first = tl.load(shared_ptr + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        live = g < GROUP
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=live[:, None], other=0.0)
        acc, m_i, l_i = _attend_split(
            q, k_ptr + row * stride_kr + kv_head * stride_kh, v_ptr + row * stride_vr + kv_head * stride_vh,
            stride_kl, stride_vl, first, n_keys, tl.zeros([GROUP_PAD], tl.int64) + (n_keys - 1), split, scale,
            GROUP_PAD, HEAD_DIM, BLOCK_N, SPLITS, PRECISION,
        )
        if SPLITS == 1 and CHUNKS == 0:
            tl.store(
                out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                mask=live[:, None],
            )
        else:  # part: [parts, queries, heads, HEAD_DIM + 2]; a split past the row's keys saw none
            base = part_ptr + ((CHUNKS + split) * batch + b) * n_heads * (HEAD_DIM + 2)
            _store_split(base, heads, acc, m_i, l_i, HEAD_DIM, live)

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _decode_attention_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, rows_ptr, part_ptr, shared_ptr,
        stride_qb, stride_qh,
        stride_kr, stride_kh, stride_kl,
        stride_vr, stride_vh, stride_vl,
        stride_ob, stride_oh,
        scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_ROWS: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, CHUNKS: tl.constexpr,
    ):
        # One program per (query, kv head, split): `_own_keys_program`.
        _own_keys_program(
            q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, rows_ptr, part_ptr, shared_ptr,
            stride_qb, stride_qh, stride_kr, stride_kh, stride_kl, stride_vr, stride_vh, stride_vl,
            stride_ob, stride_oh, scale, tl.program_id(0), tl.program_id(1), tl.program_id(2),
            tl.num_programs(0), tl.num_programs(1) * GROUP,
            GROUP, GROUP_PAD, HEAD_DIM, BLOCK_N, HAS_ROWS, SPLITS, PRECISION, CHUNKS,
        )  # fmt: skip

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _prefix_program(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, shared_ptr, count_ptr, part_ptr, rows_ptr,
        stride_qb, stride_qh, stride_kh, stride_kl, stride_vh, stride_vl,
        batch, scale, kv_head, chunk, tile, n_heads,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    ):
        # The (kv head, chunk of the shared prefix, tile of ROWS queries) program: the tile's (query, head) lines
        # against the chunk's keys, read once for all of them (the point of a cascade: 64 rows holding one
        # 3,000-token system prompt read it once a step, not 64 times). Query b sees the prefix's first
        # shared[row] keys of its row (none: its partial weighs nothing).
        line = tl.arange(0, ROWS * GROUP_PAD)
        b = tile * ROWS + line // GROUP_PAD
        g = line % GROUP_PAD
        live = (b < batch) & (g < GROUP)
        b = tl.minimum(b, batch - 1)
        heads = kv_head * GROUP + tl.minimum(g, GROUP - 1)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :])
        if HAS_ROWS:
            seen = tl.load(shared_ptr + tl.load(rows_ptr + b))
        else:
            seen = tl.load(shared_ptr + b)
        seen = tl.where(live, seen, 0)
        n_keys = tl.minimum(tl.load(count_ptr), tl.max(seen, 0))  # a tile of no sharing rows reads nothing
        acc, m_i, l_i = _attend_split(
            q, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh, stride_kl, stride_vl, 0, n_keys, seen - 1,
            chunk, scale, ROWS * GROUP_PAD, HEAD_DIM, BLOCK_N, CHUNKS, PRECISION,
        )
        _store_split(part_ptr + chunk * batch * n_heads * (HEAD_DIM + 2), b * n_heads + heads, acc, m_i, l_i,
                     HEAD_DIM, live)

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _prefix_attention_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, shared_ptr, count_ptr, part_ptr, rows_ptr,
        stride_qb, stride_qh, stride_kh, stride_kl, stride_vh, stride_vl,
        batch, scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    ):
        # One program per (kv head, chunk, tile): `_prefix_program` (a cascade step's prefix apart from its rows' own
        # keys: `decode_attention(..., fused=False)`).
        _prefix_program(
            q_ptr, k_ptr, v_ptr, shared_ptr, count_ptr, part_ptr, rows_ptr,
            stride_qb, stride_qh, stride_kh, stride_kl, stride_vh, stride_vl,
            batch, scale, tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0) * GROUP,
            GROUP, GROUP_PAD, ROWS, HEAD_DIM, BLOCK_N, CHUNKS, PRECISION, HAS_ROWS,
        )  # fmt: skip

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _cascade_attention_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, pos_ptr, rows_ptr, part_ptr, shared_ptr, prefix_k_ptr, prefix_v_ptr, count_ptr,
        stride_qb, stride_qh,
        stride_kr, stride_kh, stride_kl,
        stride_vr, stride_vh, stride_vl,
        stride_pkh, stride_pkl, stride_pvh, stride_pvl,
        batch, scale,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, OWN_PAD: tl.constexpr,
        ROWS: tl.constexpr, TILES: tl.constexpr, CHUNKS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    ):
        # A cascade step's two reads in one launch: the first KV_HEADS * CHUNKS * TILES programs are the prefix's
        # (`_prefix_program`), the next batch * KV_HEADS each query's own keys past it (`_own_keys_program`). Apart,
        # the second kernel was one more launch a layer in a step made of launches; here its programs run beside
        # the prefix's, which go first (they are the longer ones).
        pid = tl.program_id(0)
        n_heads = KV_HEADS * GROUP
        if pid < KV_HEADS * CHUNKS * TILES:
            _prefix_program(
                q_ptr, prefix_k_ptr, prefix_v_ptr, shared_ptr, count_ptr, part_ptr, rows_ptr,
                stride_qb, stride_qh, stride_pkh, stride_pkl, stride_pvh, stride_pvl,
                batch, scale, pid // (CHUNKS * TILES), (pid // TILES) % CHUNKS, pid % TILES, n_heads,
                GROUP, GROUP_PAD, ROWS, HEAD_DIM, BLOCK_N, CHUNKS, PRECISION, HAS_ROWS,
            )  # fmt: skip
        else:
            own = pid - KV_HEADS * CHUNKS * TILES
            _own_keys_program(
                q_ptr, k_ptr, v_ptr, part_ptr, pos_ptr, rows_ptr, part_ptr, shared_ptr,
                stride_qb, stride_qh, stride_kr, stride_kh, stride_kl, stride_vr, stride_vh, stride_vl,
                0, 0, scale, own // KV_HEADS, own % KV_HEADS, 0, batch, n_heads,
                GROUP, OWN_PAD, HEAD_DIM, BLOCK_N, HAS_ROWS, 1, PRECISION, CHUNKS,
            )  # fmt: skip

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _decode_combine_kernel(  # type: ignore[no-untyped-def]
        out_ptr, part_ptr, stride_ob, stride_oh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PARTS: tl.constexpr,
    ):
        # A decode step's PARTS partials of one (query, kv head): its key splits', or a cascade step's prefix chunks'
        # and the row's own keys'.
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + tl.minimum(g, GROUP - 1)
        n_heads = tl.num_programs(1) * GROUP
        out = _merge_splits(
            part_ptr + b * n_heads * (HEAD_DIM + 2), heads, GROUP_PAD, HEAD_DIM, PARTS,
            tl.num_programs(0) * n_heads * (HEAD_DIM + 2),
        )
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=(g < GROUP)[:, None],
        )

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _tile_lines(  # type: ignore[no-untyped-def]
        blocks_ptr, stride_blocks, blk, kv_head, line, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    ):
        # A block's first token and token count, and the (token, head) pairs of its tile's lines `line` (all of them,
        # or a combine program's share); lines past the block's tokens or the group's heads repeat a real one
        # (`live` says which lines to store).
        first = tl.load(blocks_ptr + blk)
        count = tl.load(blocks_ptr + stride_blocks + blk)
        tok = line // GROUP_PAD
        g = line % GROUP_PAD
        live = (tok < count) & (g < GROUP)
        tok = tl.minimum(tok, count - 1)
        heads = kv_head * GROUP + tl.minimum(g, GROUP - 1)
        return first, count, line, tok, live, heads

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _extend_attention_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, rows_ptr, blocks_ptr, part_ptr,
        shared_ptr, sk_ptr, sv_ptr,
        stride_qb, stride_qh,
        stride_kr, stride_kh, stride_kl,
        stride_vr, stride_vh, stride_vl,
        stride_ob, stride_oh,
        stride_blocks,
        stride_skh, stride_skl, stride_svh, stride_svl,
        scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, SHARED: tl.constexpr,
    ):
        # One program per (block, kv head, split): a block is up to BLOCK_M consecutive tokens of one row
        # (consecutive positions), so the row's keys are read once for all of them and all their GROUP query
        # heads. The tile's lines are (token, head) pairs; lines past the block's tokens repeat its last token and
        # are not stored. With SPLITS > 1 each program takes its share of the keys (a few blocks after a long
        # cached prefix are too few programs for the GPU) and leaves its partial softmax in `part` for
        # _extend_combine_kernel; with one it writes the output itself. The grid runs (split, kv head, block), blocks
        # slowest: a graph's block table is padded with empty blocks (room for its most rows), and their programs,
        # which only exit, then come after the real ones instead of between them (one turn after a 2,992-token
        # cached prefix in a 32-token graph, 1 real block of 33: 21.0 -> 16.8 µs a layer on an H200, the exact
        # table's time; `gpu_attention_sweep.py --cached-turn`).
        split = tl.program_id(0)
        kv_head = tl.program_id(1)
        blk = tl.program_id(2)
        first, count, line, tok, live, heads = _tile_lines(
            blocks_ptr, stride_blocks, blk, kv_head, tl.arange(0, BLOCK_M * GROUP_PAD), GROUP, GROUP_PAD
        )
        if count > 0:
            LINES: tl.constexpr = BLOCK_M * GROUP_PAD
            row = tl.load(rows_ptr + first)
            first_pos = tl.load(pos_ptr + first)
            q_pos = first_pos + tok
            n_keys = first_pos + count  # the block's last query sees keys 0..its position
            d = tl.arange(0, HEAD_DIM)
            q = tl.load(q_ptr + (first + tok)[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :])
            own = 0
            if SHARED:  # the row's first keys come from the shared prefix (SharedPrefix), the rest from the row
                own = tl.load(shared_ptr + row)
            acc, m_i, l_i = _attend_split(
                q, k_ptr + row * stride_kr + kv_head * stride_kh, v_ptr + row * stride_vr + kv_head * stride_vh,
                stride_kl, stride_vl, own, n_keys, q_pos, split, scale, LINES, HEAD_DIM, BLOCK_N, SPLITS, PRECISION,
            )
            if SHARED:
                acc_p, m_p, l_p = _attend_split(
                    q, sk_ptr + kv_head * stride_skh, sv_ptr + kv_head * stride_svh, stride_skl, stride_svl, 0, own,
                    tl.minimum(q_pos, own - 1), split, scale, LINES, HEAD_DIM, BLOCK_N, SPLITS, PRECISION,
                )  # (a line sees keys up to its q_pos: here every one of the prefix's, and none of a tile past it)
                m_new = tl.maximum(m_i, m_p)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                mine, theirs = tl.exp(m_i - m_safe), tl.exp(m_p - m_safe)
                acc = acc * mine[:, None] + acc_p * theirs[:, None]
                l_i = l_i * mine + l_p * theirs
                m_i = m_new
            if SPLITS == 1:  # key 0 is in this split: every line's sum is positive
                tl.store(
                    out_ptr + (first + tok)[:, None] * stride_ob + heads[:, None] * stride_oh + d[None, :],
                    (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                    mask=live[:, None],
                )
            else:
                # part: [blocks, kv heads, splits, lines, HEAD_DIM + 2] float32 (acc, then max, then sum)
                base = part_ptr + ((blk * tl.num_programs(1) + kv_head) * SPLITS + split) * LINES * (HEAD_DIM + 2)
                _store_split(base, line, acc, m_i, l_i, HEAD_DIM, line >= 0)

    @triton.jit  # type: ignore[misc,untyped-decorator]
    def _extend_combine_kernel(  # type: ignore[no-untyped-def]
        out_ptr, blocks_ptr, part_ptr,
        stride_ob, stride_oh,
        stride_blocks,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr, SUB: tl.constexpr,
    ):
        # The splits' partial softmaxes of SUB lines of one (block, kv head), rescaled to their common maximum and
        # summed: a program per SUB lines, not per block, since a few blocks (a short turn after a long prefix) left
        # a handful of programs each merging 16 splits of 128 lines (~20 µs a layer on an H200).
        blk = tl.program_id(2)  # (blocks slowest, as in _extend_attention_kernel)
        kv_head = tl.program_id(1)
        line = tl.program_id(0) * SUB + tl.arange(0, SUB)
        first, count, line, tok, live, heads = _tile_lines(
            blocks_ptr, stride_blocks, blk, kv_head, line, GROUP, GROUP_PAD
        )
        if count > 0:
            LINES: tl.constexpr = BLOCK_M * GROUP_PAD
            d = tl.arange(0, HEAD_DIM)
            base = part_ptr + (blk * tl.num_programs(1) + kv_head) * SPLITS * LINES * (HEAD_DIM + 2)
            tl.store(
                out_ptr + (first + tok)[:, None] * stride_ob + heads[:, None] * stride_oh + d[None, :],
                _merge_splits_at_once(base, line, SUB, HEAD_DIM, SPLITS, LINES * (HEAD_DIM + 2)).to(
                    out_ptr.dtype.element_ty
                ),
                mask=live[:, None],
            )

    @triton.jit(do_not_specialize=["segments"])  # type: ignore[misc,untyped-decorator]
    def _copy_tokens_kernel(  # type: ignore[no-untyped-def]
        src_k, src_v, dst_k, dst_v, table_ptr, segments,
        src_layer, src_head, dst_layer, dst_head,
        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # One program copies one segment's tokens (keys and values) in one (layer, kv head) plane. Offsets are
        # int64 throughout: the ~1B's cache of 64 rows of 3,202 tokens spans 13 GB a tensor.
        seg = tl.program_id(0)
        plane = tl.program_id(1)
        layer = (plane // HEADS).to(tl.int64)
        head = (plane % HEADS).to(tl.int64)
        src = tl.load(table_ptr + seg) + layer * src_layer + head * src_head
        dst = tl.load(table_ptr + segments + seg) + layer * dst_layer + head * dst_head
        n = tl.load(table_ptr + 2 * segments + seg)
        t = tl.arange(0, BLOCK_T).to(tl.int64)
        d = tl.arange(0, HEAD_DIM)
        for start in range(0, n, BLOCK_T):
            tok = start + t
            live = (tok < n)[:, None]
            off = tok[:, None] * HEAD_DIM + d[None, :]
            tl.store(dst_k + dst + off, tl.load(src_k + src + off, mask=live), mask=live)
            tl.store(dst_v + dst + off, tl.load(src_v + src + off, mask=live), mask=live)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
    rows: torch.Tensor | None = None,
    splits: int = 1,
    launch: Launch | None = None,
    shared: SharedPrefix | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """q [B, Hq, D] (rows 0..B-1, or rows[b] for query b); caches [R, Hkv, L, D]; pos [B]: query b attends to
    keys 0..pos[b] of its row; `splits`: programs per (query, kv head), each taking its share of the keys
    (`decode_splits`; a power of two), and a second kernel combining them; `launch`: the kernel's tuning
    (default `decode_launch`). With `shared` (one split), a row's first `shared.lengths[row]` keys are read from
    the shared prefix instead of the row, once for all the queries (`SharedPrefix`), in the same launch as the rows'
    own keys (`fused`; False: the prefix's kernel, then the rows', as before: A/B timing).

    Returns [B, Hq * D]. Needs CUDA tensors, a power-of-two head size of at least 16, and Hq a
    multiple of Hkv (grouped-query heads are consecutive, as in Hugging Face's repeat_kv).
    """
    assert triton is not None
    batch, n_q, head_dim = q.shape
    n_kv = k_cache.shape[1]
    group = n_q // n_kv
    group_pad = max(16, _group_pad(group))
    if not _pow2(splits):
        raise ValueError(f"decode_attention's splits must be a power of two, got {splits}")
    out = torch.empty_like(q)
    parts, chunks, part, lengths = splits, 0, out, pos  # (part and lengths: unused with one split and no prefix)
    if shared is not None:
        if splits != 1:
            raise ValueError(f"a cascade step reads each row's own keys in one split, got {splits}")
        # The prefix first, once for all queries, in chunks: partials 0..chunks-1; the rows' own keys the last.
        tile_rows, tiles, chunks = cascade_shape(batch, n_q, n_kv)
        parts, lengths = chunks + 1, shared.lengths
    if parts > 1:
        part = torch.empty(parts * batch * n_q * (head_dim + 2), dtype=torch.float32, device=q.device)
    if shared is not None and fused:
        launch_kernel(
            _cascade_attention_kernel, (n_kv * chunks * tiles + batch * n_kv,), launch,
            extend_launch(tile_rows * _group_pad(group)),
            q, k_cache, v_cache, pos, pos if rows is None else rows, part, shared.lengths, shared.keys,
            shared.values, shared.count,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            shared.keys.stride(0), shared.keys.stride(1), shared.values.stride(0), shared.values.stride(1),
            batch, scale,
            KV_HEADS=n_kv, GROUP=group, GROUP_PAD=_group_pad(group), OWN_PAD=group_pad, ROWS=tile_rows, TILES=tiles,
            CHUNKS=chunks, HEAD_DIM=head_dim, PRECISION=_precision(q), HAS_ROWS=rows is not None,
        )  # fmt: skip
    else:
        if shared is not None:
            launch_kernel(
                _prefix_attention_kernel, (n_kv, chunks, tiles), launch,
                extend_launch(tile_rows * _group_pad(group)),
                q, shared.keys, shared.values, shared.lengths, shared.count, part, pos if rows is None else rows,
                q.stride(0), q.stride(1),
                shared.keys.stride(0), shared.keys.stride(1), shared.values.stride(0), shared.values.stride(1),
                batch, scale,
                GROUP=group, GROUP_PAD=_group_pad(group), ROWS=tile_rows, HEAD_DIM=head_dim, CHUNKS=chunks,
                PRECISION=_precision(q), HAS_ROWS=rows is not None,
            )  # fmt: skip
        launch_kernel(
            _decode_attention_kernel, (batch, n_kv, splits), launch, decode_launch(splits, batch * n_kv),
            q, k_cache, v_cache, out, pos, pos if rows is None else rows, part, lengths,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1),
            scale,
            GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HAS_ROWS=rows is not None, SPLITS=splits,
            PRECISION=_precision(q), CHUNKS=chunks,
        )  # fmt: skip
    if parts > 1:
        _decode_combine_kernel[(batch, n_kv)](
            out, part, out.stride(0), out.stride(1),
            GROUP=group, GROUP_PAD=_group_pad(group), HEAD_DIM=head_dim, PARTS=parts,
            num_warps=4,
        )  # fmt: skip
    return out.view(batch, n_q * head_dim)


@dataclass(frozen=True)
class SharedPrefix:
    """A prefix of keys that several rows of a decode step hold (a chat's system prompt), kept once more on its own
    so that the step reads it once for all of them (cascade attention, as vLLM and FlashInfer do): one layer's
    `keys` and `values` [Hkv, P, D]; `lengths` [R], by cache row: how many of the row's first keys are read from
    the prefix (0: none, it reads its row alone), which the row itself need not hold (runner/cache.py);
    `count` [1]: the tokens the prefix holds."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    count: torch.Tensor


def _precision(q: torch.Tensor) -> str:
    # float32 stays float32 (Triton's default would round the products to TensorFloat-32, which torch's own float32
    # matrix products do not: the decode step and a verification would disagree); tf32 is ignored for 16-bit.
    return "ieee" if q.dtype == torch.float32 else "tf32"


# (query, head) lines a prefix program takes. 64: in one launch with the rows' own programs (`decode_attention`), the
# 135M's 64 rows after 2,992 shared keys took 9.7 µs a layer in tiles of 64 lines against 13.4 in tiles of 128 and
# 14.2 in tiles of 32 (H200, `gpu_attention_sweep.py --shared-sweep`; docs/benchmarks.md, "Session 22"); the ~1B's
# tiles were 64 lines already.
CASCADE_LINES = 64
CASCADE_PROGRAMS = 256
MAX_CASCADE_CHUNKS = 16


def cascade_shape(batch: int, n_q: int, n_kv: int) -> tuple[int, int, int]:
    """(queries a tile, tiles, chunks) of a cascade step's prefix programs: tiles of at most CASCADE_LINES lines (at
    least 16, the least a matrix product takes), and the prefix cut into chunks until (kv head, chunk, tile)
    programs are about CASCADE_PROGRAMS. A function of the sizes alone (a captured graph keeps its launch)."""
    group_pad = _group_pad(n_q // n_kv)
    rows = max(1, 16 // group_pad, min(CASCADE_LINES // group_pad, _group_pad(batch)))
    tiles = -(-batch // rows)
    chunks = 1
    while chunks < MAX_CASCADE_CHUNKS and n_kv * tiles * chunks * 2 <= CASCADE_PROGRAMS:
        chunks *= 2
    return rows, tiles, chunks


# A decode step whose rows read more keys than this splits them where (query, kv head) programs are few, aiming at
# DECODE_PROGRAMS programs (an H200 has 132 multiprocessors; a program is 4 warps, and memory wants many in flight).
DECODE_SPLIT_KEYS = 512
DECODE_PROGRAMS = 1024


def decode_splits(batch: int, n_kv: int) -> int:
    """Key splits for a decode step of `batch` rows over `n_kv` kv heads (when its rows read many keys): a
    function of the sizes alone, so that a CUDA graph captured for a batch bucket keeps its launch shape."""
    splits = 1
    while splits < MAX_SPLITS and batch * n_kv * splits * 2 <= DECODE_PROGRAMS:
        splits *= 2
    return splits


def _group_pad(group: int) -> int:
    return 1 << max(group - 1, 0).bit_length()


def extend_block(n_q: int, n_kv: int, longest: int = 0) -> int:
    """Tokens per block of `extend_attention` for this head shape and a pass whose longest row has `longest` new
    tokens: a tile of at most 128 (token, head) lines, or one token's padded group of heads where that is more; 32
    tokens where a row has 17 to 32 (a 16-token draft's verification: its row's keys read once, not twice: on an H200
    the ~1B pass of 32 such rows 4.28 against 4.42 ms, the kernel 36 against 48 µs a layer), else 16 (measured
    there: at 9 tokens a row 32 made the pass 2.5% slower; prefill chunks were not measured with 32)."""
    most = 32 if longest in WIDE_BLOCK_ROWS else 16
    return max(1, min(most, 128 // _group_pad(n_q // n_kv)))


WIDE_BLOCK_ROWS = range(17, 33)  # the longest rows whose pass `extend_block` gives blocks of 32


def extend_block_sizes(n_q: int, n_kv: int, tokens: int) -> set[int]:
    """Every block size `extend_block` gives a pass of `tokens` packed tokens (whose longest row has at most as
    many): the ones a CUDA graph of that many tokens may be captured with."""
    return {extend_block(n_q, n_kv, longest) for longest in (1, WIDE_BLOCK_ROWS.start) if longest <= tokens}


def extend_blocks(run_starts: np.ndarray, run_lens: np.ndarray, block: int, size: int = 0) -> np.ndarray:
    """The block table [2, N] (first token, token count) of packed runs (a row's new tokens: consecutive in the
    pack and in positions) cut into blocks of at most `block` tokens; padded to `size` blocks of no tokens."""
    per_run = -(-run_lens // block)
    total = int(per_run.sum())
    n = max(total, size)
    table = np.zeros((2, n), dtype=np.int64)
    run = np.repeat(np.arange(len(run_lens)), per_run)
    within = np.arange(total) - np.repeat(np.cumsum(per_run) - per_run, per_run)  # the block's index in its run
    table[0, :total] = run_starts[run] + within * block
    table[1, :total] = np.minimum(block, run_lens[run] - within * block)
    return table


def max_extend_blocks(tokens: int, rows: int, block: int) -> int:
    """The most blocks `tokens` packed tokens of at most `rows` rows can make (each row's last block may be short)."""
    return tokens // block + min(rows, tokens)


# The partial values one program of an extend pass's combine loads at once (splits x lines x head size): each
# program takes as many lines as keep under it (a power of two: 4 lines of 16 splits of 64).
COMBINE_TILE = 4096

# Programs an extend pass aims to keep busy (an H100/H200 has 132 multiprocessors), and the most key splits.
EXTEND_PROGRAMS = 256
MAX_SPLITS = 16


def extend_splits(tokens: int, n_q: int, n_kv: int, block: int = 0) -> int:
    """Key splits per block of an extend pass of `tokens` packed tokens in blocks of `block` (0: `extend_block`'s
    default): enough (block, kv head, split) programs to keep the GPU busy when few tokens read many keys (a chat's
    next turn after a long cached prefix). A function of the size alone, so that a CUDA graph captured for a token
    bucket keeps its launch shape."""
    blocks = max(1, tokens // (block or extend_block(n_q, n_kv))) * n_kv
    splits = 1
    while splits < MAX_SPLITS and blocks * splits * 2 <= EXTEND_PROGRAMS:
        splits *= 2
    return splits


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_tile(lines: int, head_dim: int, splits: int) -> None:
    """ValueError unless Triton's compiler takes this tile: power-of-two ranges, and matrix-product operands of at
    least 16 in every dimension (its CPU interpreter checks neither)."""
    if not (_pow2(lines) and _pow2(head_dim) and _pow2(splits)) or min(lines, head_dim) < 16:
        raise ValueError(
            f"extend_attention's tile of {lines} lines x {head_dim} (splits {splits}) would not compile: each must "
            "be a power of two, lines and head size at least 16"
        )


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    blocks: torch.Tensor,
    scale: float,
    splits: int | None = None,
    block: int = 0,
    launch: Launch | None = None,
    shared: SharedPrefix | None = None,
) -> torch.Tensor:
    """Packed tokens' attention: q [T, Hq, D], token t a query at position pos[t] of cache row rows[t] (its key
    already written), against keys 0..pos[t] of that row; caches [R, Hkv, L, D]; `blocks` [2, N] from
    `extend_blocks` (a block of no tokens does nothing, so a graph's table can be padded) cut in blocks of `block`
    tokens (0: `extend_block`'s default); `splits`: key splits (default `extend_splits`); `launch`: the kernel's
    tuning (default `extend_launch`); `shared`: a row's first `shared.lengths[row]` keys are the shared prefix's,
    read from there (its new tokens lie past them). Returns [T, Hq * D]; tokens in no block (padding) get
    unspecified values.
    """
    assert triton is not None
    tokens, n_q, head_dim = q.shape
    n_kv = k_cache.shape[1]
    group = n_q // n_kv
    block_m, group_pad = block or extend_block(n_q, n_kv), _group_pad(group)
    splits = splits or extend_splits(tokens, n_q, n_kv, block_m)
    check_tile(block_m * group_pad, head_dim, splits)
    n_blocks = blocks.shape[1]
    out = torch.empty_like(q)
    part = out  # unused with one split
    if splits > 1:
        part = torch.empty(
            n_blocks * n_kv * splits * block_m * group_pad * (head_dim + 2), dtype=torch.float32, device=q.device
        )
    launch_kernel(
        _extend_attention_kernel, (splits, n_kv, n_blocks), launch, extend_launch(block_m * group_pad),
        q, k_cache, v_cache, out, pos, rows, blocks, part,
        *((shared.lengths, shared.keys, shared.values) if shared is not None else (pos, k_cache, v_cache)),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        blocks.stride(0),
        *((shared.keys.stride(0), shared.keys.stride(1), shared.values.stride(0), shared.values.stride(1))
          if shared is not None else (0, 0, 0, 0)),
        scale,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, HEAD_DIM=head_dim, SPLITS=splits,
        PRECISION=_precision(q), SHARED=shared is not None,
    )  # fmt: skip
    if splits > 1:
        sub = max(1, min(block_m * group_pad, COMBINE_TILE // (splits * head_dim)))
        _extend_combine_kernel[(block_m * group_pad // sub, n_kv, n_blocks)](
            out, blocks, part,
            out.stride(0), out.stride(1),
            blocks.stride(0),
            GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, HEAD_DIM=head_dim, SPLITS=splits, SUB=sub,
            num_warps=4,
        )  # fmt: skip
    return out.view(tokens, n_q * head_dim)


def supports(head_dim: int, n_q: int, n_kv: int) -> bool:
    """Whether `decode_attention` handles this attention shape."""
    return AVAILABLE and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and n_q % n_kv == 0


COPY_TOKENS = 32  # tokens a copy program moves an iteration (of 16-128 dims: 1-8 KB a tensor)


def copy_tokens(
    src: tuple[torch.Tensor, torch.Tensor],
    dst: tuple[torch.Tensor, torch.Tensor],
    table: torch.Tensor,
    src_strides: tuple[int, int],
    dst_strides: tuple[int, int],
    layers: int,
    heads: int,
) -> None:
    """Copy token runs of keys and values between caches, every layer and kv head in one launch: `table` [3, S]
    int64 on the device, for each run its first token's offset in `src` and in `dst` (elements, within one (layer,
    kv head) plane) and its length in tokens; the planes are `*_strides` (layer, kv head) apart, a token
    `head_dim` elements. What torch's indexing and copies do in one launch a tensor, or more: a view whose offsets
    pass 2**31 bytes is split into pieces of 32-bit offsets, a launch each (eight a copy for the ~1B at 3,202
    tokens a row)."""
    assert triton is not None
    segments = table.shape[1]
    if not segments:
        return
    head_dim = src[0].shape[-1]
    _copy_tokens_kernel[(segments, layers * heads)](
        src[0], src[1], dst[0], dst[1], table, segments, *src_strides, *dst_strides,
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_T=COPY_TOKENS, num_warps=4,
    )  # fmt: skip
