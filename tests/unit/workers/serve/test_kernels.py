"""The CUDA decode path's Triton attention kernels, run by Triton's CPU interpreter against plain torch attention."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stratus_workers.serve import kernels

pytestmark = pytest.mark.unit

SCALE = 0.3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Keys a loop step, warps, stages: any launch computes the same attention (the steps' boundaries move).
LAUNCHES = [kernels.Launch(32, 4, 3), kernels.Launch(128, 2, 3), kernels.Launch(64, 4, 2)]


@pytest.fixture(scope="module")
def interp(triton_ready: None) -> ModuleType:
    """The kernels, run by Triton's interpreter where there is no GPU (tests/conftest.py sets it up)."""
    return kernels


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[int], pos: list[int]) -> torch.Tensor:
    """Query t against keys 0..pos[t] of row rows[t], grouped-query heads consecutive; [T, Hq * D]."""
    group = q.shape[1] // k.shape[1]
    out = []
    for t, (row, p) in enumerate(zip(rows, pos, strict=True)):
        keys = k[row, :, : p + 1].repeat_interleave(group, 0)
        values = v[row, :, : p + 1].repeat_interleave(group, 0)
        probs = torch.softmax((keys @ q[t][:, :, None])[:, :, 0] * SCALE, dim=-1)
        out.append((probs[:, None, :] @ values)[:, 0].reshape(-1))
    return torch.stack(out)


def test_block_table_cuts_runs_and_pads() -> None:
    # Runs of 3, 37 and 1 tokens (at 0, 3, 40) in blocks of 16: 1 + 3 + 1 blocks, padded to 7 empty ones.
    table = kernels.extend_blocks(np.array([0, 3, 40]), np.array([3, 37, 1]), 16, size=7)
    assert table.tolist() == [[0, 3, 19, 35, 40, 0, 0], [3, 16, 16, 5, 1, 0, 0]]
    assert kernels.max_extend_blocks(41, 3, 16) >= 5
    assert kernels.extend_block(4, 4) == 16 and kernels.extend_block(9, 3) == 16 and kernels.extend_block(64, 1) == 2
    # A pass whose longest row has 17-32 new tokens (a 16-token draft's verification) takes blocks of 32 where the
    # tile allows it: each row's keys read once; shorter and longer rows (prefill chunks) keep 16.
    assert [kernels.extend_block(32, 32, n) for n in (1, 9, 16, 17, 32, 33, 512)] == [16, 16, 16, 32, 32, 16, 16]
    assert kernels.extend_block(9, 3, 17) == 32 and kernels.extend_block(64, 1, 17) == 2
    # The sizes a graph of so many tokens may be captured with: no row of 17 fits in 16 tokens.
    assert [kernels.extend_block_sizes(32, 32, t) for t in (8, 16, 17, 1152)] == [{16}, {16}, {16, 32}, {16, 32}]
    assert kernels.extend_block_sizes(64, 1, 1152) == {2}


@settings(max_examples=25, deadline=None)
@given(
    heads=st.sampled_from([(4, 4), (6, 2), (9, 3), (8, 1)]),
    runs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40)), min_size=1, max_size=4),
    empty=st.integers(0, 3),
    splits=st.sampled_from([None, 1, 2, 4, 16]),
    longest=st.sampled_from([0, 17]),
    launch=st.sampled_from([None, *LAUNCHES]),
    prefix=st.sampled_from([0, 0, 1, 23, 40]),
    seed=st.integers(0, 2**16),
)
def test_extend_attention_is_each_tokens_own_attention(
    interp: ModuleType, heads: tuple[int, int], runs: list[tuple[int, int]], empty: int, splits: int | None,
    longest: int, launch: kernels.Launch | None, prefix: int, seed: int,
) -> None:
    # Packed rows of any lengths from any positions (a verification's drafts, a prefill's chunks after a cached
    # prefix); each run is a row of its own; empty blocks (a graph's padding) and a padding token change nothing;
    # the keys split over several programs or not (16 splits of 81 keys leave most splits without a key). With a
    # shared prefix, each row's first keys up to its start (at most `prefix`) are the prefix's, and the row does
    # not hold them (NaN there): they are read from the prefix.
    n_q, n_kv = heads
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(len(runs), n_kv, 81, 16, generator=gen)
    v = torch.randn(len(runs), n_kv, 81, 16, generator=gen)
    shared = None
    hollow_k, hollow_v = k, v
    if prefix:
        keys, values = torch.randn(n_kv, prefix, 16, generator=gen), torch.randn(n_kv, prefix, 16, generator=gen)
        counts = [min(start, prefix) for start, _ in runs]
        hollow_k, hollow_v = k.clone(), v.clone()
        for r, n in enumerate(counts):
            k[r, :, :n], v[r, :, :n] = keys[:, :n], values[:, :n]
            hollow_k[r, :, :n], hollow_v[r, :, :n] = float("nan"), float("nan")
        shared = kernels.SharedPrefix(
            keys.to(DEVICE), values.to(DEVICE), torch.tensor(counts, device=DEVICE),
            torch.tensor([prefix], device=DEVICE),
        )
    rows = [r for r, (_, n) in enumerate(runs) for _ in range(n)]
    pos = [s + i for s, n in runs for i in range(n)]
    q = torch.randn(len(rows) + 1, n_q, 16, generator=gen)  # the last token is padding: in no block
    lens = np.array([n for _, n in runs])
    block = kernels.extend_block(n_q, n_kv, longest)  # (the blocks of 16 tokens or, at 17, of 32 where they fit)
    table = interp.extend_blocks(np.cumsum(lens) - lens, lens, block, size=-(-lens // block).sum() + empty)
    on = [torch.tensor(x, device=DEVICE) for x in ([*pos, 0], [*rows, 0], table)]
    got = interp.extend_attention(
        q.to(DEVICE), hollow_k.to(DEVICE), hollow_v.to(DEVICE), *on, SCALE, splits=splits, block=block, launch=launch,
        shared=shared,
    ).cpu()
    torch.testing.assert_close(got[:-1], reference(q[:-1], k, v, rows, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", range(1, 65))
def test_every_head_grouping_gets_a_tile_the_compiler_takes(group: int) -> None:
    # The interpreter would run tiles the GPU compiler refuses (fewer than 16 lines, not a power of two).
    for longest in (1, 17):
        block = kernels.extend_block(2 * group, 2, longest)
        lines = block * kernels._group_pad(group)
        kernels.check_tile(lines, 64, kernels.extend_splits(24, 2 * group, 2, block))
        assert lines <= 256


def test_a_tile_the_compiler_refuses_is_refused() -> None:
    for lines, head_dim, splits in ((8, 64, 1), (48, 64, 1), (16, 24, 1), (16, 64, 3)):
        with pytest.raises(ValueError, match="would not compile"):
            kernels.check_tile(lines, head_dim, splits)


def test_key_splits_keep_a_small_pass_busy() -> None:
    # A chat's next turn (a few tokens after a long cached prefix) is a few blocks: split the keys; a big pass
    # has programs enough. A function of the pass's size, so a captured graph keeps its launch shape.
    assert kernels.extend_splits(24, 9, 3) == 16 and kernels.extend_splits(80, 9, 3) == 16
    assert kernels.extend_splits(576, 32, 32) == 1 and kernels.extend_splits(16, 32, 32) == 8
    assert kernels.extend_splits(512, 9, 3) == 2


def test_decode_attention_reads_each_rows_keys(interp: ModuleType) -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 6, 16, generator=gen), torch.randn(3, 2, 40, 16, generator=gen), torch.randn(3, 2, 40, 16)
    pos = [5, 17, 39]
    qd, kd, vd, pos_d = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch.tensor(pos, device=DEVICE)
    got = interp.decode_attention(qd, kd, vd, pos_d, SCALE).cpu()
    torch.testing.assert_close(got, reference(q, k, v, [0, 1, 2], pos), atol=1e-5, rtol=1e-5)
    rows = [2, 0, 2]  # queries naming their rows
    got = interp.decode_attention(qd, kd, vd, pos_d, SCALE, rows=torch.tensor(rows, device=DEVICE)).cpu()
    torch.testing.assert_close(got, reference(q, k, v, rows, pos), atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    heads=st.sampled_from([(4, 4), (9, 3), (8, 1)]),
    pos=st.lists(st.integers(0, 199), min_size=1, max_size=4),
    splits=st.sampled_from([1, 2, 4, 16]),
    named=st.booleans(),
    launch=st.sampled_from([None, *LAUNCHES]),
    seed=st.integers(0, 2**16),
)
def test_decode_attention_splits_a_rows_keys_without_changing_the_answer(
    interp: ModuleType, heads: tuple[int, int], pos: list[int], splits: int, named: bool,
    launch: kernels.Launch | None, seed: int,
) -> None:
    # Any lengths (one key, a share smaller than a tile, splits past a short row's keys that see none), with the
    # rows named or not: the combined partial softmaxes are the row's attention.
    n_q, n_kv = heads
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(len(pos), n_kv, 200, 16, generator=gen)
    v = torch.randn(len(pos), n_kv, 200, 16, generator=gen)
    q = torch.randn(len(pos), n_q, 16, generator=gen)
    rows = list(reversed(range(len(pos)))) if named else list(range(len(pos)))
    on_rows = torch.tensor(rows, device=DEVICE) if named else None
    got = interp.decode_attention(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch.tensor(pos, device=DEVICE), SCALE, rows=on_rows, splits=splits,
        launch=launch,
    ).cpu()
    torch.testing.assert_close(got, reference(q, k, v, rows, pos), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    heads=st.sampled_from([(4, 4), (9, 3), (8, 1), (32, 32)]),
    rows=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 60)), min_size=1, max_size=5),
    prefix=st.integers(1, 120),
    named=st.booleans(),
    launch=st.sampled_from([None, *LAUNCHES]),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_cascade_step_is_each_rows_own_attention(
    interp: ModuleType, heads: tuple[int, int], rows: list[tuple[int, int]], prefix: int, named: bool,
    launch: kernels.Launch | None, fused: bool, seed: int,
) -> None:
    # Rows sharing any part of a prefix (all of it, some, none) and holding any number of keys of their own past
    # it: reading the shared part from the prefix, once for all rows, gives each row's own attention, whether the
    # prefix's programs and the rows' own run in one launch or two. The rows do not hold the shared keys (NaN
    # there): any read of them would show.
    n_q, n_kv = heads
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(n_kv, prefix, 16, generator=gen), torch.randn(n_kv, prefix, 16, generator=gen)
    k = torch.randn(len(rows), n_kv, 200, 16, generator=gen)
    v = torch.randn(len(rows), n_kv, 200, 16, generator=gen)
    shared = [min(s, prefix) for s, _ in rows]
    hollow_k, hollow_v = k.clone(), v.clone()
    for r, n in enumerate(shared):
        k[r, :, :n], v[r, :, :n] = keys[:, :n], values[:, :n]
        hollow_k[r, :, :n], hollow_v[r, :, :n] = float("nan"), float("nan")
    pos = [n + own for n, (_, own) in zip(shared, rows, strict=True)]  # the step's key is the row's own
    q = torch.randn(len(rows), n_q, 16, generator=gen)
    order = list(reversed(range(len(rows)))) if named else list(range(len(rows)))
    qd = q[order] if named else q
    got = interp.decode_attention(
        qd.to(DEVICE), hollow_k.to(DEVICE), hollow_v.to(DEVICE), torch.tensor([pos[r] for r in order], device=DEVICE),
        SCALE, rows=torch.tensor(order, device=DEVICE) if named else None, launch=launch, fused=fused,
        shared=kernels.SharedPrefix(
            keys.to(DEVICE), values.to(DEVICE), torch.tensor(shared, device=DEVICE),
            torch.tensor([prefix], device=DEVICE),
        ),
    ).cpu()
    torch.testing.assert_close(got, reference(qd, k, v, order, [pos[r] for r in order]), atol=1e-5, rtol=1e-5)


def test_a_cascade_tile_is_one_the_compiler_takes() -> None:
    # The prefix kernel's tiles: 16-128 lines whatever the batch and grouping; chunks keep programs near the aim.
    for n_q, n_kv in ((9, 3), (32, 32), (8, 1), (64, 1)):
        for batch in (1, 3, 16, 64, 200):
            rows, tiles, chunks = kernels.cascade_shape(batch, n_q, n_kv)
            lines = rows * kernels._group_pad(n_q // n_kv)
            assert 16 <= lines <= kernels.CASCADE_LINES and rows * tiles >= batch > rows * (tiles - 1)
            assert 1 <= chunks <= kernels.MAX_CASCADE_CHUNKS
    assert kernels.cascade_shape(64, 9, 3) == (16, 4, 16) and kernels.cascade_shape(64, 32, 32) == (64, 1, 8)


def test_launch_settings_follow_the_tile() -> None:
    # Small tiles (a decode step's 16 lines, the ~1B's 32-line blocks) take two warps; wider ones (the 135M's grouped
    # heads) keep four (two ran 13x slower there on an H200); a split decode keeps the launch it had; a
    # decode step of few programs (one stream: 32 kv heads, or 3) takes more keys a step.
    assert kernels.decode_launch(1, 64 * 32).warps == 2 and kernels.decode_launch(4, 3) == kernels.Launch(64, 4, 2)
    assert kernels.decode_launch(1, 32).block_n == kernels.decode_launch(1, 8 * 3).block_n == 128
    assert kernels.extend_launch(16).warps == kernels.extend_launch(32).warps == 2
    assert kernels.extend_launch(64).warps == kernels.extend_launch(128).warps == 4


class _SmallGPU:
    """A stand-in for a Triton attention kernel on a GPU of 64 KB of shared memory a program (a T4's): it refuses, as
    Triton does (OutOfResources at the launch), a launch whose pipelined key and value tiles (stages x BLOCK_N keys x
    HEAD_DIM x 2 bytes, twice) need more, and records what ran."""

    __name__ = "small_gpu_kernel"
    LIMIT = 64 * 1024

    def __init__(self) -> None:
        self.ran: list[kernels.Launch] = []
        self.refused = 0

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def run(*args: object, BLOCK_N: int, num_warps: int, num_stages: int, HEAD_DIM: int, **meta: object) -> None:
            need = num_stages * BLOCK_N * HEAD_DIM * 2 * 2
            if need > self.LIMIT:
                self.refused += 1
                raise kernels.OutOfResources(need, self.LIMIT, "shared memory")
            self.ran.append(kernels.Launch(BLOCK_N, num_warps, num_stages))

        return run


def test_a_refused_launch_falls_back_to_the_base_launch_and_stays_there() -> None:
    kernel = _SmallGPU()
    few = kernels.FEW_PROGRAMS_DECODE_LAUNCH  # 96 KB of tiles at a head size of 64
    kernels.launch_kernel(kernel, (1,), None, few, 0, HEAD_DIM=64)
    kernels.launch_kernel(kernel, (1,), None, few, 0, HEAD_DIM=64)  # remembered: not tried again
    assert kernel.ran == [kernels.BASE_LAUNCH, kernels.BASE_LAUNCH] and kernel.refused == 1
    kernels.launch_kernel(kernel, (1,), None, kernels.SMALL_TILE_LAUNCH, 0, HEAD_DIM=64)  # 48 KB: runs as chosen
    assert kernel.ran[-1] == kernels.SMALL_TILE_LAUNCH
    with pytest.raises(kernels.OutOfResources):  # an explicit launch (a sweep's) is the caller's to see refused
        kernels.launch_kernel(kernel, (1,), few, few, 0, HEAD_DIM=64)
    with pytest.raises(kernels.OutOfResources):  # a head size so large that even the base launch is refused
        kernels.launch_kernel(kernel, (1,), None, few, 0, HEAD_DIM=512)


def test_decode_splits_only_where_programs_are_few() -> None:
    # 64 rows of a 135M-shaped model (3 kv heads) are 192 programs: split; 64 rows of 32 kv heads are plenty.
    assert kernels.decode_splits(64, 3) == 4 and kernels.decode_splits(1, 3) == kernels.MAX_SPLITS
    assert kernels.decode_splits(64, 32) == 1 and kernels.decode_splits(1, 32) == 16
    with pytest.raises(ValueError, match="power of two"):
        kernels.decode_attention(torch.zeros(1, 2, 16), torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16),
                                 torch.zeros(1, dtype=torch.long), SCALE, splits=3)  # fmt: skip
