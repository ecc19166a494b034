"""The per-row KV cache: growth, row moves and roll-backs, and tensors usable in and out of inference mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus_workers.serve.prefix import PrefixCache
from stratus_workers.serve.runner import cache as cache_module
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


def test_a_pass_may_run_beside_the_step_launched_ahead_only_over_rows_and_blocks_nothing_touched_since() -> None:
    """`untouched` (whether a prefill may run on a stream of its own beside the step launched ahead): rows above the
    step's that no copy or length change queued since its launch touched, reading pool blocks nothing wrote since;
    never with no step watched, over one of the step's rows, or while the cache could still grow."""
    cache = KVCache(
        layers=2, rows=6, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
        max_len=32, capacity=33, device_lengths=True, pool_tokens=64,
    )  # fmt: skip
    cache.set_lengths(0, [9, 9, 9, 9])
    assert not cache.untouched([4], [])  # nothing launched ahead
    cache.watch(3)
    assert cache.untouched([4, 5], [0, 1]) and cache.untouched([3], [])
    assert not cache.untouched([2, 4], [])  # one of the step's rows
    assert not cache.untouched([], [])
    for change, rows, slots in (
        (lambda: cache.reset(4), [4], []),
        (lambda: cache.set_lengths(4, [2]), [4], []),
        (lambda: cache.set_row_lengths([5], [1]), [5], []),
        (lambda: cache.truncate(3, 4), [3], []),
        (lambda: cache.move(3, 1), [3], []),  # a compaction: the row moved from
        (lambda: cache.save_blocks(3, positions=[0], slots=[2], block=4), [3], []),  # read by a queued copy
        (lambda: cache.save_blocks(0, positions=[4], slots=[1], block=4), [4], [1]),  # a block written
    ):
        cache.set_lengths(0, [9, 9, 9, 9])
        cache.watch(3)
        change()
        assert not cache.untouched(rows, slots), change
        assert cache.untouched([r for r in range(3, 6) if r not in (*rows, *cache.touched)], [0])
    cache.watch(None)
    assert not cache.untouched([4], [])
    small = make(capacity=16, max_len=64, device_lengths=True)
    small.watch(1)
    assert not small.untouched([2], [])  # a growth would copy every row under the step


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


KERNEL_COPIES = [pytest.param(False, id="torch"), pytest.param(True, id="kernel")]


@pytest.mark.parametrize("kernel_copies", KERNEL_COPIES)
def test_blocks_saved_to_the_pool_load_into_another_row(kernel_copies: bool) -> None:
    cache = make(capacity=16, device_lengths=True)
    cache.kernel_copies = kernel_copies
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
@pytest.mark.parametrize("kernel_copies", KERNEL_COPIES)
def test_row_bookkeeping_never_waits_for_the_device(kernel_copies: bool) -> None:
    """Row lengths, moves, roll-backs and the prefix pool's copies queue behind a decode step running ahead.

    A copy of a pageable CPU scalar into `lengths_dev` made the host wait for every step queued on the device
    (a profile showed it at each row move): under torch's sync debug mode any such wait raises.
    """
    cache = KVCache(
        layers=2, rows=4, kv_heads=2, head_dim=8, dtype=torch.bfloat16, device=torch.device("cuda"),
        max_len=128, capacity=64, device_lengths=True, pool_tokens=64, kernel_copies=kernel_copies,
    )  # fmt: skip
    assert cache.kernel_copies == kernel_copies
    cache.set_lengths(0, [20, 30])
    cache.save_blocks(0, [0], [0], 16)  # (the kernel compiles outside the check)
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_copies_equal_torch_copies_past_two_gigabytes_of_offsets() -> None:
    # Rows 6 and 7 of layer 1 start past 2**31 bytes (a ~1B server's 64 rows of 3,202 tokens span 13 GB a tensor,
    # where torch splits each copy into pieces of 32-bit offsets): the kernel's int64 offsets reach them.
    def wide(kernel: bool) -> KVCache:
        return KVCache(
            layers=2, rows=8, kv_heads=32, head_dim=64, dtype=torch.bfloat16, device=torch.device("cuda"),
            max_len=40_000, capacity=40_000, device_lengths=True, pool_tokens=256, kernel_copies=kernel,
        )  # fmt: skip

    caches = [wide(False), wide(True)]
    assert caches[1].all_keys.stride(0) * caches[1].all_keys.element_size() * 2 > 2**31
    gen = torch.Generator(device="cuda").manual_seed(3)
    for row, n in ((6, 40), (7, 37)):
        for name in ("all_keys", "all_values"):
            new = torch.randn((2, 32, n, 64), generator=gen, device="cuda", dtype=torch.bfloat16)
            for cache in caches:
                getattr(cache, name)[:, row, :, :n] = new
                cache.set_length(row, n)
    for cache in caches:
        cache.save_blocks(7, [0, 16], [5, 2], 16)
        cache.move(7, 3)
        cache.move(6, 7)
        cache.load_blocks(6, [2, 5], 16)
    torch_copies, kernel_copies = caches
    assert kernel_copies.pool_keys is not None and torch_copies.pool_keys is not None
    assert torch.equal(kernel_copies.pool_keys, torch_copies.pool_keys)
    assert kernel_copies.pool_values is not None and torch_copies.pool_values is not None
    assert torch.equal(kernel_copies.pool_values, torch_copies.pool_values)
    for row in (3, 6, 7):
        n = kernel_copies.lengths[row]
        assert n == torch_copies.lengths[row] and n
        for name in ("all_keys", "all_values"):
            assert torch.equal(getattr(kernel_copies, name)[:, row, :, :n], getattr(torch_copies, name)[:, row, :, :n])
    keys = kernel_copies.all_keys  # row 6 loaded the blocks saved from what row 3 holds now, in the other order
    assert torch.equal(keys[1, 6, :, :16], keys[1, 3, :, 16:32])
    assert torch.equal(keys[1, 6, :, 16:32], keys[1, 3, :, :16])


def _cascade_cache(monkeypatch: pytest.MonkeyPatch, kernel_copies: bool = False) -> KVCache:
    monkeypatch.setattr(cache_module, "CASCADE_MIN_TOKENS", 8)  # two blocks of 4, not 256 tokens
    cache = KVCache(
        layers=2, rows=4, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
        max_len=64, capacity=64, device_lengths=True, pool_tokens=64, cascade=True, kernel_copies=kernel_copies,
    )  # fmt: skip
    assert cache.kernel_copies == kernel_copies  # (Triton's interpreter runs the kernel on the CPU)
    return cache


def _held(cache: KVCache, row: int) -> torch.Tensor:
    """What a reader that takes the shared prefix sees of `row`: its keys and values [2, layers, heads, len, dim]."""
    n, hollow = cache.lengths[row], cache.hollow[row]
    held = torch.stack([cache.all_keys[:, row, :, :n], cache.all_values[:, row, :, :n]]).clone()
    assert hollow <= cache.shared[row] <= n
    if hollow:
        assert cache.shared_keys is not None and cache.shared_values is not None
        held[:, :, :, :hollow] = torch.stack([cache.shared_keys[:, :, :hollow], cache.shared_values[:, :, :hollow]])
    return held


def _check(cache: KVCache, shadow: dict[int, torch.Tensor]) -> None:
    """Every row holds, or reads from the shared prefix, what was written to it; the device agrees on the counts;
    what a row reads from the prefix is what it holds where it holds it."""
    assert cache.shared_dev is not None and cache.shared_count is not None
    assert cache.shared_dev.tolist() == cache.shared
    assert cache.lengths_dev is not None and cache.lengths_dev.tolist() == cache.lengths
    for row in range(cache.rows):
        assert torch.equal(_held(cache, row), shadow[row][:, :, :, : cache.lengths[row]]), row
        n, hollow = cache.shared[row], cache.hollow[row]
        assert n <= int(cache.shared_count) and cache.shared_keys is not None
        assert torch.equal(cache.all_keys[:, row, :, hollow:n], cache.shared_keys[:, :, hollow:n])


@pytest.mark.parametrize("kernel_copies", KERNEL_COPIES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["load", "write", "truncate", "move", "reset", "fill", "forget"]),
                              st.integers(0, 3), st.integers(0, 3), st.integers(0, 24)), min_size=4, max_size=40))
def test_a_row_reads_what_was_written_to_it_whether_it_holds_it_or_the_shared_prefix_does(
    monkeypatch: pytest.MonkeyPatch, kernel_copies: bool, ops: list[tuple[str, int, int, int]]
) -> None:
    # Rows load prompts of two families through the real prefix cache (a small pool: blocks get evicted and their
    # slots reused with other keys), write past their ends, roll back, move, empty and fill in any order, against a
    # shadow of what each row was given: a row that reads the shared prefix reads what it would have held, and the
    # prefix a row counts on is never overwritten. With `kernel_copies`, every copy is kernels.copy_tokens.
    cache = _cascade_cache(monkeypatch, kernel_copies)
    prefix = PrefixCache(block_size=4, capacity=8)
    gen = torch.Generator().manual_seed(len(ops))
    shape = (2, cache.layers, cache.kv_heads, cache.max_len, cache.head_dim)
    shadow = {row: torch.zeros(shape) for row in range(cache.rows)}
    pool: dict[int, torch.Tensor] = {}  # what each pool slot was given

    def write(row: int, start: int, end: int) -> None:
        new = torch.randn((2, cache.layers, cache.kv_heads, end - start, cache.head_dim), generator=gen)
        cache.all_keys[:, row, :, start:end], cache.all_values[:, row, :, start:end] = new[0], new[1]
        shadow[row][:, :, :, start:end] = new

    for op, row, other, n in ops:
        if op == "load":
            cache.reset(row)  # a new request takes the row
            prompt = [row % 2] * (9 + n)  # a family's prompt: its blocks are shared by its rows
            slots, ids, _ = prefix.lookup(prompt)
            if slots:
                cache.load_blocks(row, slots, 4, ids)
                for i, slot in enumerate(slots):
                    shadow[row][:, :, :, 4 * i : 4 * i + 4] = pool[slot]
            cache.grow(len(prompt))
            write(row, cache.lengths[row], len(prompt))  # a prefill: new keys past what was loaded
            cache.set_lengths(row, [len(prompt)])
            stored = prefix.insert(prompt)
            cache.save_blocks(row, stored.positions, stored.slots, 4)
            for position, slot in zip(stored.positions, stored.slots, strict=True):
                pool[slot] = shadow[row][:, :, :, position : position + 4].clone()
        elif op == "write" and cache.lengths[row] + n <= 64:
            write(row, cache.lengths[row], cache.lengths[row] + n)
            cache.set_row_lengths([row], [cache.lengths[row] + n])
        elif op == "truncate":
            cache.set_row_lengths([row], [cache.lengths[row] * n // 24])  # a roll-back, by any share
        elif op == "move" and row != other:
            cache.reset(other)  # the hole a finished request left
            cache.move(row, other)
            shadow[other] = shadow[row].clone()
        elif op == "forget":  # the engine starts a new prefix cache (after a failed step): slots come back anew
            prefix = PrefixCache(block_size=4, capacity=8)
        elif op == "reset":
            cache.reset(row)
        elif op == "fill":
            cache.fill([row])
            assert cache.hollow[row] == 0
        _check(cache, shadow)


@pytest.mark.parametrize("kernel_copies", KERNEL_COPIES)
def test_blocks_past_the_shared_prefix_extend_it_and_another_prefix_waits_for_its_rows(
    monkeypatch: pytest.MonkeyPatch, kernel_copies: bool
) -> None:
    cache = _cascade_cache(monkeypatch, kernel_copies)
    pool = torch.arange(64, dtype=torch.float32)
    cache.pool_keys = pool[None, None, :, None].expand(2, 2, 64, 4).clone()
    cache.pool_values = -cache.pool_keys
    cache.load_blocks(0, [0, 1], 4, [10, 11])  # two blocks: the shared prefix now, which the row need not hold
    cache.load_blocks(1, [0, 1, 2], 4, [10, 11, 12])  # one more: the prefix grows, row 0 still reads its 8
    assert cache.shared == [8, 12, 0, 0] and cache.hollow == [8, 12, 0, 0] and cache.shared_ids == (10, 11, 12)
    cache.load_blocks(2, [3, 4], 4, [20, 21])  # another prefix: rows count on this one, so row 2 holds its own
    assert cache.shared == [8, 12, 0, 0] and cache.shared_ids == (10, 11, 12)
    assert cache.all_keys[0, 2, 0, :8, 0].tolist() == list(range(12, 20))
    cache.load_blocks(3, [0], 4, [10])  # one block in common: under the least worth sharing, so held
    assert cache.shared[3] == 0 and cache.all_keys[0, 3, 0, :4, 0].tolist() == [0, 1, 2, 3]
    assert cache.all_keys[0, 1, 0, :12].abs().sum() == 0  # never copied into the sharing row
    cache.reset(3)
    cache.all_keys[:, 3] = 7.0  # what the row held before: not what it reads after the move
    cache.move(1, 3)  # the row moves without its (unheld) prefix, and reads it from the prefix still
    assert cache.shared[3] == cache.hollow[3] == 12 and _held(cache, 3)[0, 0, 0, :12, 0].tolist() == list(range(12))
    cache.save_blocks(3, [4], [5], 4)  # the pool lost a block the row reads from the prefix: it saves the real keys
    assert cache.hollow[3] == 0 and cache.pool_keys[0, 0, 20:24, 0].tolist() == [4, 5, 6, 7]
    cache.move(3, 1)
    cache.fill([1])  # a reader of rows alone (torch's attention): it holds them (already, since the save)
    assert cache.hollow[1] == 0 and cache.shared[1] == 12
    assert cache.all_keys[0, 1, 0, :12, 0].tolist() == list(range(12))
    for row in (0, 1, 3):
        cache.reset(row)
    cache.reset(2)
    cache.load_blocks(2, [3, 4], 4, [20, 21])  # nobody counts on the old prefix: replaced
    assert cache.shared == [0, 0, 8, 0] and cache.shared_ids == (20, 21)
    assert cache.shared_keys is not None and cache.shared_keys[0, 0, :8, 0].tolist() == list(range(12, 20))
    cache.stop_sharing()  # a reader that never takes the prefix: every row holds its tokens, none reads it
    assert not cache.cascade and cache.shared == [0, 0, 0, 0] and cache.all_keys[0, 2, 0, :8, 0].tolist() == list(
        range(12, 20)
    )
