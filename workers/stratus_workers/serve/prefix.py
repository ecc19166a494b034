"""Automatic prefix caching: which blocks of earlier prompts' keys and values the runner's pool holds.

A sequence's tokens are cut into blocks of `block_size`; a block is identified by its tokens and
the block before it, so a block stands for the whole prefix that ends with it (a chat's system
prompt, earlier turns, few-shot examples). The blocks form a tree keyed exactly by token tuples
(no hash can collide into another user's prefix). When a row has been prefilled, and again when
it finishes, the engine stores its full blocks (`insert`); a new request takes the longest chain
of stored blocks that starts its prompt (`lookup`), has the runner copy their keys and values into
its row, and prefills only the rest. The pool has room for `capacity` blocks; when it is full the
least recently used leaf goes first, so a shared system prompt outlives the answers hanging off it.

This module only does the bookkeeping (which block sits in which pool slot); the runner's KV
cache does the copies. Nothing here touches torch.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

# Block ids, unique in the process, not just in one cache: the runner's shared prefix names its blocks by id
# (runner/cache.py), and an engine that starts a new cache after a failed step must not name other keys the same.
_IDS = itertools.count(1)


@dataclass(eq=False)
class _Block:
    key: tuple[int, tuple[int, ...]]  # (parent's id, this block's tokens)
    id: int
    slot: int
    parent: _Block | None
    children: int = 0


@dataclass
class PrefixStats:
    """Counters since start: prompt tokens looked up, tokens found cached (not recomputed), blocks evicted."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0
    stored_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass(frozen=True)
class Cursor:
    """How far a sequence's tokens are known to be stored: its first `count` blocks, the last of them `block`.

    A row's prompt is looked up once and stored twice (prefilled, finished); with the cursor those stores start
    where the last one ended instead of walking the whole chain again (a 3,000-token system prompt is ~190 blocks
    a walk). It holds only while `block` is still stored: eviction takes leaves, so then every block before it is
    too; otherwise the walk starts from the root."""

    block: _Block | None = None
    count: int = 0


@dataclass
class Insertion:
    """The blocks `insert` newly stored: the row positions to copy from, and the pool slots to copy to; `cursor`:
    where the tokens stand stored now."""

    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    cursor: Cursor = field(default_factory=Cursor)


class PrefixCache:
    """The tree of cached blocks over a pool of `capacity` block slots."""

    def __init__(self, block_size: int, capacity: int) -> None:
        if block_size < 1 or capacity < 1:
            raise ValueError(
                f"a prefix cache needs a block size and a capacity of at least 1, got {block_size}, {capacity}"
            )
        self.block_size = block_size
        self.capacity = capacity
        self.stats = PrefixStats()
        self._blocks: dict[tuple[int, tuple[int, ...]], _Block] = {}
        # Leaves (blocks nothing hangs off), least recently used first: the only blocks eviction takes.
        self._leaves: collections.OrderedDict[int, _Block] = collections.OrderedDict()
        self._free = list(range(capacity - 1, -1, -1))
        self._by_slot: dict[int, _Block] = {}
        # The tokens of the chain the last lookup found, and its blocks: the next prompt that starts with them (a
        # chat app's system prompt, which every request repeats) is matched by one list comparison at C speed
        # instead of a dict lookup of a block's token tuple per block (~190 for 3,000 tokens: a lookup took 129 µs
        # that way on a CPU of CI's kind, 11 µs this way; docs/benchmarks.md, "Session 20"). test_prefix.py checks
        # that it finds what a walk from the root finds.
        self._last: tuple[list[int], list[_Block], list[int], list[int]] = ([], [], [], [])  # (+ slots, ids)

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, tokens: Sequence[int], limit: int, start: Cursor | None = None) -> list[_Block]:
        """The stored blocks that continue `start` (the root by default) along `tokens`, up to block `limit`."""
        found: list[_Block] = []
        parent = start.block.id if start is not None and start.block is not None else 0
        b = self.block_size
        for i in range(start.count if start is not None else 0, limit):
            block = self._blocks.get((parent, tuple(tokens[i * b : (i + 1) * b])))
            if block is None:
                break
            found.append(block)
            parent = block.id
        return found

    def _touch(self, last: _Block | None) -> None:
        if last is not None and last.id in self._leaves:
            self._leaves.move_to_end(last.id)

    def _holds(self, cursor: Cursor | None, tokens: Sequence[int]) -> bool:
        """Whether `cursor` (of `tokens`' first blocks) still stands: its last block is still the one stored."""
        if cursor is None or cursor.count * self.block_size > len(tokens):
            return False
        return cursor.block is None or self._blocks.get(cursor.block.key) is cursor.block

    def lookup(self, prompt: Sequence[int]) -> tuple[list[int], list[int], Cursor]:
        """The longest cached prefix of `prompt` (at least one token is left to compute): its blocks' pool slots in
        order; their ids (unlike a slot, an id names one block's keys and values for good, never reused after an
        eviction: how the runner knows two rows hold the same ones); and the chain's cursor (for the prompt's
        `insert`s to start from)."""
        b = self.block_size
        limit = (len(prompt) - 1) // b  # the last token's logits must be computed
        n = self._remembered(prompt, limit)
        _, chain, slots, ids = self._last
        more = self._chain(prompt, limit, Cursor(chain[n - 1], n) if n else None)
        if more or n < len(chain):
            chain = chain[:n] + more
            slots, ids = [block.slot for block in chain], [block.id for block in chain]
            self._last = (list(prompt[: len(chain) * b]), chain, slots, ids)
        last = chain[-1] if chain else None
        self._touch(last)
        self.stats.queried_tokens += len(prompt)
        self.stats.hit_tokens += len(chain) * b
        return slots[:], ids[:], Cursor(last, len(chain))

    def _remembered(self, prompt: Sequence[int], limit: int) -> int:
        """How many blocks of the last lookup's chain `prompt` starts with: all of them (at most `limit`) where it
        holds their tokens and the last of them is still stored (then so is every block before it: eviction takes
        leaves); else none."""
        tokens, blocks, _, _ = self._last
        n = min(len(blocks), limit)
        if not n or self._blocks.get(blocks[n - 1].key) is not blocks[n - 1]:
            return 0
        end = n * self.block_size
        head = prompt[:end]
        if not isinstance(head, list):
            head = list(head)
        return n if head == (tokens if end == len(tokens) else tokens[:end]) else 0

    def insert(self, tokens: Sequence[int], cursor: Cursor | None = None) -> Insertion:
        """Store every full block of `tokens` not stored yet; returns what the runner must copy where.

        `cursor`: where an earlier `lookup` or `insert` of the same tokens' start left them (the walk starts there
        while it stands). Makes room by evicting least recently used leaves, never a block of `tokens`' own chain;
        stops early when nothing else can go.
        """
        b = self.block_size
        full = len(tokens) // b
        start = cursor if cursor is not None and self._holds(cursor, tokens) else Cursor()
        chain = self._chain(tokens, full, start)
        parent = chain[-1] if chain else start.block
        done = start.count + len(chain)
        self._touch(parent)
        out = Insertion()
        for i in range(done, full):
            slot = self._take_slot(protect=parent)
            if slot is None:
                break
            block = _Block(
                (parent.id if parent else 0, tuple(tokens[i * b : (i + 1) * b])), next(_IDS), slot, parent
            )
            self._blocks[block.key] = block
            self._by_slot[slot] = block
            if parent is not None:
                parent.children += 1
                self._leaves.pop(parent.id, None)
            self._leaves[block.id] = block
            out.positions.append(i * b)
            out.slots.append(slot)
            self.stats.stored_blocks += 1
            parent = block
            done = i + 1
        out.cursor = Cursor(parent, done)
        return out

    def _take_slot(self, protect: _Block | None) -> int | None:
        if self._free:
            return self._free.pop()
        for victim in self._leaves.values():
            if victim is not protect:
                self._evict(victim)
                return self._free.pop()
        return None

    def _evict(self, block: _Block) -> None:
        del self._blocks[block.key]
        del self._leaves[block.id]
        del self._by_slot[block.slot]
        self._free.append(block.slot)
        self.stats.evicted_blocks += 1
        parent = block.parent
        if parent is not None:
            parent.children -= 1
            if parent.children == 0:
                self._leaves[parent.id] = parent  # now a leaf, counted as just used: its child was
