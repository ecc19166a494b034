"""The prefix cache's bookkeeping: the longest cached prefix, exact token keys, least recently used leaves out
first, shared prefixes kept."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratus_workers.serve.prefix import Cursor, PrefixCache

pytestmark = pytest.mark.unit


def test_the_longest_cached_prefix_leaves_a_token_to_compute() -> None:
    cache = PrefixCache(block_size=4, capacity=8)
    stored = cache.insert(list(range(10)))  # two full blocks; the last two tokens are no block
    assert stored.positions == [0, 4] and len(set(stored.slots)) == 2
    assert cache.lookup(list(range(10)))[0] == stored.slots[:2]
    assert cache.lookup(list(range(8)))[0] == stored.slots[:1]  # the 8th token's logits must be computed
    assert cache.lookup([0, 1, 2, 3, 9, 9, 9, 9, 9])[0] == stored.slots[:1]
    assert cache.lookup([1, 2, 3, 4, 5])[0] == []
    assert cache.stats.queried_tokens == 10 + 8 + 9 + 5
    assert cache.stats.hit_tokens == 8 + 4 + 4
    assert cache.insert(list(range(10))).slots == []  # nothing new to store


def test_a_block_stands_for_its_whole_prefix() -> None:
    # The same four tokens after different prefixes are different blocks: keys are exact, never hashed.
    cache = PrefixCache(block_size=2, capacity=8)
    a = cache.insert([1, 2, 5, 6])
    b = cache.insert([3, 4, 5, 6])
    assert a.slots[1] != b.slots[1]
    assert cache.lookup([3, 4, 5, 6, 0])[0] == b.slots
    assert cache.lookup([9, 9, 5, 6, 0])[0] == []


def test_least_recently_used_leaves_go_first_and_a_shared_prefix_stays() -> None:
    cache = PrefixCache(block_size=2, capacity=4)
    system = [7, 7]
    first = cache.insert([*system, 1, 1])  # the system block and one answer block
    second = cache.insert([*system, 2, 2])
    assert len(cache) == 3 and first.slots[0] == cache.lookup([*system, 0])[0][0]
    cache.lookup([*system, 1, 1, 0])  # the first answer is used again: the second is now the oldest leaf
    third = cache.insert([*system, 3, 3, 4, 4])  # needs two slots: one free, then the oldest leaf goes
    assert cache.stats.evicted_blocks == 1
    assert cache.lookup([*system, 2, 2, 0])[0] == [first.slots[0]]  # evicted: only the shared block is left
    assert cache.lookup([*system, 1, 1, 0])[0] == first.slots
    assert cache.lookup([*system, 3, 3, 4, 4, 0])[0] == [first.slots[0], *third.slots]
    assert second.slots[0] in third.slots  # its slot was reused


def test_insertion_never_evicts_its_own_chain_and_stops_when_full() -> None:
    cache = PrefixCache(block_size=1, capacity=3)
    stored = cache.insert([1, 2, 3, 4, 5])
    assert stored.positions == [0, 1, 2]  # three blocks fit; the chain cannot evict itself for the fourth
    assert cache.lookup([1, 2, 3, 4, 5, 6])[0] == stored.slots


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PrefixCache(block_size=0, capacity=4)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(1, 30)), min_size=1, max_size=40),
       st.integers(1, 12))
def test_inserts_from_a_cursor_store_what_inserts_from_the_root_do(
    ops: list[tuple[int, int, int]], capacity: int
) -> None:
    # A request's life: looked up, its prompt stored once prefilled, prompt and answer stored when it ends; a
    # small pool evicts in between, so cursors go stale. The cache that walks from the cursors must store, evict
    # and find exactly what the one that always walks from the root does.
    walker, cursor_cache = PrefixCache(block_size=3, capacity=capacity), PrefixCache(block_size=3, capacity=capacity)
    live: list[tuple[list[int], Cursor]] = []
    for kind, family, length in ops:
        prompt = [family] * 4 + [family + kind] * length  # requests of a family share their first tokens
        if kind < 3 or not live:  # a new request
            slots, _, cursor = cursor_cache.lookup(prompt)
            assert slots == walker.lookup(prompt)[0]
            a, b = walker.insert(prompt), cursor_cache.insert(prompt, cursor)
            live.append((prompt, b.cursor))
        else:  # one ends: its prompt and answer
            prompt, cursor = live.pop(kind % len(live))
            answer = prompt + [kind] * length
            a, b = walker.insert(answer), cursor_cache.insert(answer, cursor)
        assert (a.positions, a.slots) == (b.positions, b.slots)
    assert walker.stats == cursor_cache.stats
    for prompt, _ in live:
        assert walker.lookup(prompt)[0] == cursor_cache.lookup(prompt)[0]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(0, 2)), min_size=1, max_size=40),
       st.integers(1, 10))
def test_a_lookup_from_the_last_chain_finds_what_a_walk_from_the_root_does(
    ops: list[tuple[int, int, int]], capacity: int
) -> None:
    # Prompts of a few families (a system prompt each) of random lengths, looked up and then stored, or not, or
    # another family's stored instead, in a small pool that evicts: the chain remembered from the last lookup may
    # be longer or shorter than the next prompt's, of another family, or evicted (and a block of the same tokens
    # stored again) since.
    cache = PrefixCache(block_size=2, capacity=capacity)
    for family, length, then in ops:
        prompt = [family] * 5 + [family + 1] * length
        slots, ids, cursor = cache.lookup(prompt)
        walked = cache._chain(prompt, (len(prompt) - 1) // 2)
        assert slots == [block.slot for block in walked] and ids == [block.id for block in walked]
        assert cursor.count == len(walked)
        if then == 1:
            cache.insert(prompt + [family + 2] * length, cursor)
        elif then == 2:
            other = (family + 1) % 4
            cache.insert([other] * 5 + [other + 3] * length)
