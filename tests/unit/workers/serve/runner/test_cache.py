"""The per-row KV cache: growth, row moves and roll-backs, and tensors usable in and out of inference mode."""

from __future__ import annotations

import pytest
import torch

from stratus_workers.serve.runner.cache import MIN_CAPACITY, KVCache

pytestmark = pytest.mark.unit


def make(capacity: int = 4, max_len: int = 64, device_lengths: bool = False) -> KVCache:
    return KVCache(
        layers=2, rows=3, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
        max_len=max_len, capacity=capacity, device_lengths=device_lengths,
    )  # fmt: skip


def fill(cache: KVCache, row: int, n: int, value: float) -> None:
    for t in (*cache.keys, *cache.values):
        t[row, :, :n] = value
    cache.set_length(row, n)


def test_growth_keeps_what_the_rows_hold_and_stops_at_max_len() -> None:
    cache = make(capacity=MIN_CAPACITY, max_len=40)
    fill(cache, 1, MIN_CAPACITY, 7.0)
    cache.grow(MIN_CAPACITY + 1)
    assert cache.capacity == 2 * MIN_CAPACITY  # doubles rather than creeping up a token at a time
    assert bool((cache.keys[0][1, :, :MIN_CAPACITY] == 7.0).all()) and cache.lengths[1] == MIN_CAPACITY
    cache.grow(2 * MIN_CAPACITY + 1)
    assert cache.capacity == 40  # doubling, capped at max_len
    with pytest.raises(ValueError, match="41 tokens exceeds the cache limit of 40"):
        cache.grow(41)


def test_move_truncate_and_reset() -> None:
    cache = make(capacity=16, device_lengths=True)
    fill(cache, 2, 5, 3.0)
    cache.move(2, 0)
    assert cache.lengths == [5, 0, 0]
    assert cache.lengths_dev is not None and cache.lengths_dev.tolist() == [5, 0, 0]
    assert bool((cache.values[1][0, :, :5] == 3.0).all())
    cache.truncate(0, 2)
    assert cache.lengths[0] == 2
    with pytest.raises(ValueError, match="cannot truncate row 0 of length 2 to 3"):
        cache.truncate(0, 3)
    assert cache.lengths[0] == 2
    cache.reset(0)
    assert cache.lengths == [0, 0, 0] and cache.lengths_dev.tolist() == [0, 0, 0]


def test_rows_a_step_launched_ahead_computed_follow_moves_and_other_changes_void_them() -> None:
    cache = make(capacity=16, device_lengths=True)
    cache.set_lengths(0, [3, 4, 5])
    cache.advance(3)  # a decode step: the same rows, one token longer
    for row, value in enumerate((1.0, 2.0, 3.0)):
        for layer in cache.keys:
            layer[row, :, : cache.lengths[row] + 1] = value  # + 1: the key the step launched ahead wrote
    cache.watch(3)
    assert cache.ahead == [0, 1, 2] and cache.lengths == [4, 5, 6]
    assert cache.lengths_dev is not None and cache.lengths_dev.tolist() == [4, 5, 6]
    cache.move(2, 0)  # row 0's request left; the last row takes its place, with the step's work
    cache.reset(2)
    assert cache.ahead == [2, 1, None] and cache.lengths == [6, 5, 0]
    assert bool((cache.keys[1][0, :, :7] == 3.0).all())  # its 6 tokens and the key written ahead
    cache.truncate(1, 4)  # any other change to a row voids the step's work for it
    assert cache.ahead == [2, None, None]
    cache.set_lengths(2, [2])  # a prefill into a row
    cache.watch(None)
    cache.move(0, 1)  # nothing in flight: only the row's own tokens move
    assert cache.ahead is None and cache.lengths == [0, 6, 2]


def test_a_step_launched_ahead_is_unchanged_until_one_of_its_rows_changes_or_moves() -> None:
    """`unchanged` (the pipeline's check, which cannot follow a move) reads the same bookkeeping as the single-device
    decoder's `ahead`: decode steps and rows above the step's leave it; a change or a move of one of its rows, or no
    step watched, or one of another size, do not."""
    cache = make(capacity=16)
    assert cache.rows == 3
    cache.set_lengths(0, [3, 4, 5])
    assert not cache.unchanged(2)  # nothing watched
    cache.watch(2)
    cache.advance(2)  # a decode step
    cache.set_length(2, 1)  # a row above the step's (a prefill into a new row)
    assert cache.unchanged(2) and not cache.unchanged(1) and not cache.unchanged(3)
    for change in (
        lambda: cache.truncate(1, 2),
        lambda: cache.set_row_lengths([2, 0], [1, 1]),
        lambda: cache.set_lengths(1, [1]),
        lambda: cache.reset(0),
        lambda: cache.move(1, 0),  # the single-device decoder follows it (ahead == [1, None]); the pipeline does not
        lambda: cache.move(2, 1),
        lambda: cache.move(0, 2),
    ):
        cache.set_lengths(0, [3, 4, 5])
        cache.watch(2)
        change()
        assert not cache.unchanged(2)
    cache.watch(None)
    assert not cache.unchanged(0)


def test_a_cache_grown_in_inference_mode_is_updated_outside_it() -> None:
    # Issue 12: growth inside a forward pass made inference tensors, which refuse in-place updates
    # outside inference mode; the engine's next row move then killed its thread.
    cache = make(capacity=MIN_CAPACITY)
    with torch.inference_mode():
        cache.grow(3 * MIN_CAPACITY)
        fill(cache, 2, 3 * MIN_CAPACITY, 1.0)
    assert cache.capacity == 3 * MIN_CAPACITY
    cache.move(2, 1)
    cache.truncate(1, 5)
    assert bool((cache.keys[1][1, :, : 3 * MIN_CAPACITY] == 1.0).all())


def test_blocks_saved_to_the_pool_load_into_another_row() -> None:
    cache = make(capacity=16, device_lengths=True)
    cache.pool_tokens = 64
    for layer, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
        k[1, :, :12] = torch.arange(12, dtype=torch.float32)[None, :, None] + 100 * layer
        v[1, :, :12] = -torch.arange(12, dtype=torch.float32)[None, :, None]
    cache.set_length(1, 12)
    cache.save_blocks(1, positions=[0, 4], slots=[3, 0], block=4)
    with pytest.raises(ValueError, match="holds 12 tokens; cannot save a block at 12"):
        cache.save_blocks(1, positions=[8, 12], slots=[1, 2], block=4)  # the second block is not there yet
    cache.load_blocks(2, slots=[3, 0], block=4)
    assert cache.lengths[2] == 8 and cache.lengths_dev is not None and cache.lengths_dev[2] == 8
    for k, v in zip(cache.keys, cache.values, strict=True):
        assert torch.equal(k[2, :, :8], k[1, :, :8]) and torch.equal(v[2, :, :8], v[1, :, :8])
    with pytest.raises(ValueError, match="loads into an empty row"):
        cache.load_blocks(2, slots=[3], block=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_row_bookkeeping_never_waits_for_the_device() -> None:
    """Row lengths, moves, roll-backs and the prefix pool's copies queue behind a decode step running ahead.

    A copy of a pageable CPU scalar into `lengths_dev` made the host wait for every step queued on the device
    (a profile showed it at each row move): under torch's sync debug mode any such wait raises.
    """
    cache = KVCache(
        layers=2, rows=4, kv_heads=2, head_dim=8, dtype=torch.bfloat16, device=torch.device("cuda"),
        max_len=128, capacity=64, device_lengths=True, pool_tokens=64,
    )  # fmt: skip
    cache.set_lengths(0, [20, 30])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache.set_length(2, 12)
        cache.truncate(1, 17)
        cache.move(2, 3)
        cache.reset(0)
        cache.set_row_lengths([0, 2], [5, 6])
        cache.advance(3)
        cache.save_blocks(1, [0], [1], 16)
        cache.reset(2)
        cache.load_blocks(2, [1], 16)
        assert cache.lengths_dev is not None
        with pytest.raises(RuntimeError, match="synchroniz"):  # the idiom that waited: the check does catch it
            cache.lengths_dev[0] = 6
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cache.lengths_dev is not None
    assert cache.lengths_dev.tolist() == cache.lengths == [6, 18, 16, 12]
