"""Per-row KV cache (each row a sequence at its own length) and the block pool the prefix cache keeps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stratus_workers.serve import kernels
from stratus_workers.serve.runner.staging import to_device

MIN_CAPACITY = 16
# A prefix shorter than this is not worth a cascade step's two extra kernels a layer (see `KVCache.share`).
CASCADE_MIN_TOKENS = 256


def check_truncation(held: Sequence[int], rows: Sequence[int], lengths: Sequence[int]) -> None:
    """ValueError naming the first of `rows` whose new length is past its end (`held[row]` tokens) or negative: a
    roll-back only forgets. Callers check every row before they change any."""
    for row, length in zip(rows, lengths, strict=True):
        if not 0 <= length <= held[row]:
            raise ValueError(f"cannot truncate row {row} of length {held[row]} to {length}")


class KVCache:
    """Keys and values of `rows` sequences: one [layers, rows, kv_heads, capacity, head_dim] tensor each.

    `keys[l]` and `values[l]` are views of layer l, which is what the forward passes and the captured
    decode graphs index; a row move or a prefix copy touches every layer at once through the whole
    tensor. Rows join, leave, roll back and move independently; `lengths` says how many tokens each
    holds (and `lengths_dev`, when asked for, mirrors it on the device for a decode step that must not
    read host memory). While a decode step launched ahead of time is in flight (`watch`), `ahead` says,
    for each row that step computed, which of its rows the row holds now: a row move (compaction after
    a request left) carries the step's work along, with the key it wrote one past the row's length,
    and any other change to such a row (a reset, a prefill, a truncation) marks it None. So a finished
    request costs the step launched ahead nothing, and a change to a row above them (a session, a
    prefill into a new row) leaves it alone. A decoder that cannot follow a move (the pipeline's, serve/pipeline.py)
    takes its step only where `unchanged`: no row of it changed or moved. Since that launch the cache also notes the
    rows any queued copy or length change touched and the pool blocks written (`untouched`): a prefill of other rows
    reading other blocks need not queue behind the step (runner/fused.py, `prefill_beside`).

    The pool (`pool_tokens` tokens, allocated on first use) holds blocks of keys and values that
    finished or prefilled rows left behind, for the prefix cache (serve/prefix.py) to copy into new
    rows; which block is where is the prefix cache's business, the copies are this class's.

    With `cascade`, the cache also keeps one prefix the pool held (its blocks' keys and values, copied once more
    into `shared_keys`/`shared_values`) for attention to read once for every row that starts with it (kernels.py's
    SharedPrefix): `shared[row]` (and `shared_dev`) says how many of the row's first tokens are read from there,
    and a row that loaded them from the pool does not hold them itself (`hollow[row]` tokens: no copy of a
    3,000-token system prompt per request, 377 MB for the ~1B model). A row's count is set only where it loaded
    the very blocks the prefix was copied from (block ids, which the prefix cache never reuses), follows the row
    when it moves, and shrinks with it (a truncation, a reset); the prefix is replaced only while no row counts
    on it. Every change is queued on the device in order, so a step launched ahead reads what its launch saw.
    A reader that cannot take the prefix (torch's attention, a pipeline stage) has the rows it reads filled first
    (`fill`), or sharing stopped for good (`stop_sharing`).

    The tensors are ordinary tensors whichever mode allocates them: forward passes grow the cache
    inside inference mode, and an inference tensor refuses in-place updates outside it.
    """

    def __init__(
        self,
        *,
        layers: int,
        rows: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        capacity: int,
        device_lengths: bool = False,
        pool_tokens: int = 0,
        cascade: bool = False,
        kernel_copies: bool = False,
    ) -> None:
        self.layers = layers
        self.rows = rows
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_len = max_len
        # Row moves and prefix copies as one Triton launch each (kernels.copy_tokens) instead of torch's indexing and
        # copies, a launch or more a tensor: on an H200 a ~1B server of 3,202-token rows spent ~0.45 ms of host
        # time a saved prefix (its views pass 2**31 bytes, so each copy became eight launches).
        self.kernel_copies = kernel_copies and kernels.AVAILABLE and head_dim & (head_dim - 1) == 0
        self.lengths = [0] * rows
        self.lengths_dev: torch.Tensor | None = None
        if device_lengths:
            with torch.inference_mode(False):
                self.lengths_dev = torch.zeros(rows, dtype=torch.long, device=device)
        self.ahead: list[int | None] | None = None
        self.touched: set[int] = set()  # rows a queued change touched since a step was launched ahead (`watch`)
        self.pool_written: set[int] = set()  # pool blocks written since then
        self.capacity = 0
        self.all_keys = torch.empty(0)
        self.all_values = torch.empty(0)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(capacity)
        self.pool_tokens = pool_tokens
        self.pool_keys: torch.Tensor | None = None
        self.pool_values: torch.Tensor | None = None
        self.shared = [0] * rows
        self.hollow = [0] * rows  # the row's first tokens it does not hold (read from the shared prefix)
        self.shared_ids: tuple[int, ...] = ()  # the prefix cache's ids of the blocks the shared prefix holds
        self.shared_block = 0
        self.shared_keys: torch.Tensor | None = None
        self.shared_values: torch.Tensor | None = None
        self.shared_dev: torch.Tensor | None = None
        self.shared_count: torch.Tensor | None = None
        if cascade and pool_tokens and device_lengths:
            # Allocated now, at its largest: captured decode graphs hold its address.
            shape = (layers, kv_heads, min(max_len, pool_tokens), head_dim)
            with torch.inference_mode(False):
                self.shared_keys = torch.zeros(shape, dtype=dtype, device=device)
                self.shared_values = torch.zeros(shape, dtype=dtype, device=device)
                self.shared_dev = torch.zeros(rows, dtype=torch.long, device=device)
                self.shared_count = torch.zeros(1, dtype=torch.long, device=device)

    @property
    def cascade(self) -> bool:
        """Whether this cache keeps a shared prefix for decode steps to read once (`share`)."""
        return self.shared_keys is not None

    def sharing(self, batch: int) -> int:
        """How many of rows 0..batch-1 read the shared prefix (a decode step that must read it: one or more)."""
        rows = self.shared[:batch]
        return len(rows) - rows.count(0)  # (a count in C: this runs every decode step)

    def bytes(self) -> int:
        tensors = [self.all_keys, self.all_values]
        if self.pool_keys is not None and self.pool_values is not None:
            tensors += [self.pool_keys, self.pool_values]
        if self.shared_keys is not None and self.shared_values is not None:
            tensors += [self.shared_keys, self.shared_values]
        return sum(t.numel() * t.element_size() for t in tensors)

    def token_bytes(self) -> int:
        """Bytes one token of one row takes (keys and values of every layer)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def grow(self, needed: int) -> None:
        """Make room for `needed` tokens a row (doubling), or raise ValueError past `max_len` (and past the room
        allocated already: a cache may hold spare slots beyond max_len, which keys past a row's end may use)."""
        if needed > max(self.max_len, self.capacity):
            raise ValueError(f"sequence of {needed} tokens exceeds the cache limit of {self.max_len}")
        if needed > self.capacity:
            self._allocate(min(self.max_len, max(needed, self.capacity * 2, MIN_CAPACITY)))

    def _allocate(self, capacity: int) -> None:
        shape = (self.layers, self.rows, self.kv_heads, capacity, self.head_dim)
        with torch.inference_mode(False):
            keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            values = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.capacity:
                keys[:, :, :, : self.capacity].copy_(self.all_keys)
                values[:, :, :, : self.capacity].copy_(self.all_values)
        self.all_keys, self.all_values, self.capacity = keys, values, capacity
        self.keys, self.values = list(keys.unbind(0)), list(values.unbind(0))

    # -- lengths ----------------------------------------------------------------------------

    def watch(self, batch: int | None) -> None:
        """A decode step of rows 0..batch-1 was launched ahead of time (None: none is in flight)."""
        self.ahead = None if batch is None else list(range(batch))
        if batch is not None:
            self.touched.clear()
            self.pool_written.clear()

    def untouched(self, rows: Sequence[int], slots: Sequence[int]) -> bool:
        """Whether a pass writing `rows` and reading pool blocks `slots` may run beside the decode step launched
        ahead (`watch`) instead of behind it: the step is in flight and none of `rows` is one of the step's or was
        changed, moved or saved from since its launch, none of `slots` written since, and the cache is at its
        full size (a growth copies every row)."""
        ahead = self.ahead
        return (
            ahead is not None
            and bool(rows)
            and min(rows) >= len(ahead)
            and self.capacity >= self.max_len
            and self.touched.isdisjoint(rows)
            and self.pool_written.isdisjoint(slots)
        )

    def unchanged(self, batch: int) -> bool:
        """Whether a decode step of rows 0..batch-1 was launched ahead (`watch`) and none of its rows has changed or
        moved since: each row holds what the step computed, where it computed it."""
        return self.ahead == list(range(batch))

    def _changed(self, first_row: int, end: int) -> None:
        self.touched.update(range(first_row, end))
        ahead = self.ahead
        if ahead is not None:
            for row in range(first_row, min(end, len(ahead))):
                ahead[row] = None

    def set_length(self, row: int, length: int) -> None:
        self._set_length(row, length)
        self._changed(row, row + 1)

    def _set_length(self, row: int, length: int) -> None:
        self.lengths[row] = length
        self._set_shared(row, min(self.shared[row], length))
        if self.lengths_dev is not None:
            # fill_ takes the value as a kernel argument; `lengths_dev[row] = length` copies a CPU scalar and
            # waits for the device to drain first (the decode step running ahead included): an H200 profile
            # showed a 0.25-0.5 ms stall at every row move, reset and truncation.
            self.lengths_dev[row : row + 1].fill_(length)

    def set_lengths(self, first_row: int, lengths: list[int]) -> None:
        """Rows first_row.. now hold `lengths` tokens (after a prefill or an extension)."""
        end = first_row + len(lengths)
        self.lengths[first_row:end] = lengths
        for row, length in enumerate(lengths, first_row):
            self._set_shared(row, min(self.shared[row], length))
        if self.lengths_dev is not None:
            self.lengths_dev[first_row:end] = self._on_device(lengths)
        self._changed(first_row, end)

    def set_row_lengths(self, rows: list[int], lengths: list[int]) -> None:
        """Rows `rows` (any, in any order) now hold `lengths` tokens (after a forward over those rows)."""
        for row, length in zip(rows, lengths, strict=True):
            self.lengths[row] = length
            self._set_shared(row, min(self.shared[row], length))
        if self.lengths_dev is not None:  # rows and lengths in one copy (each is a pin and a launch on the host)
            both = self._on_device([*rows, *lengths])
            self.lengths_dev[both[: len(rows)]] = both[len(rows) :]
        # The rows in between did not change; marking them too only costs a step launched ahead, never a wrong one.
        self._changed(min(rows), max(rows) + 1)

    def advance(self, batch: int) -> None:
        """Rows 0..batch-1 each took one token (a decode step: not a change of rows)."""
        for r in range(batch):
            self.lengths[r] += 1
        if self.lengths_dev is not None:
            self.lengths_dev[:batch] += 1

    def reset(self, row: int) -> None:
        self.set_length(row, 0)

    def truncate(self, row: int, length: int) -> None:
        """Forget everything after `length` tokens in `row`; ValueError (and no change) past its end."""
        check_truncation(self.lengths, [row], [length])
        self.set_length(row, length)

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` and empty `src` (a step launched ahead follows the row)."""
        n = self.lengths[src]
        ahead = self.ahead
        carried = ahead[src] if ahead is not None and src < len(ahead) else None
        # The step in flight wrote the key of the row's next token at position n (queued before this copy).
        copy = min(n + 1, self.capacity) if carried is not None else n
        shared, hollow = self.shared[src], self.hollow[src]
        self.touched.update((src, dst))
        if self.kernel_copies:
            if copy > hollow:
                both = (self.all_keys, self.all_values)
                self._copy_tokens(both, both, [self._at(src, hollow)], [self._at(dst, hollow)], [copy - hollow])
        else:
            for cache in (self.all_keys, self.all_values):
                cache[:, dst, :, hollow:copy].copy_(cache[:, src, :, hollow:copy])
        self._set_length(dst, n)
        self._set_length(src, 0)
        self._set_shared(dst, shared)  # the row reads the shared prefix where it did
        self.hollow[dst] = hollow
        if ahead is not None:
            if dst < len(ahead):
                ahead[dst] = carried
            if src < len(ahead):
                ahead[src] = None

    # -- the prefix cache's block pool ------------------------------------------------------

    def _pool(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool, grown (doubling, up to `pool_tokens`) to hold at least `tokens` tokens."""
        if tokens > self.pool_tokens:
            raise ValueError(f"the prefix pool holds {self.pool_tokens} tokens; asked for {tokens}")
        have = 0 if self.pool_keys is None else self.pool_keys.shape[2]
        if self.pool_keys is None or self.pool_values is None or have < tokens:
            # A GPU takes the whole pool at once (no regrowth copies, no fragmentation); a CPU grows it.
            grow = max(tokens, 2 * have, 256) if self.device.type == "cpu" else self.pool_tokens
            size = min(self.pool_tokens, grow)
            shape = (self.layers, self.kv_heads, size, self.head_dim)
            with torch.inference_mode(False):
                keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
                values = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if self.pool_keys is not None and self.pool_values is not None:
                    keys[:, :, :have].copy_(self.pool_keys)
                    values[:, :, :have].copy_(self.pool_values)
            self.pool_keys, self.pool_values = keys, values
        assert self.pool_keys is not None and self.pool_values is not None
        return self.pool_keys, self.pool_values

    def _at(self, row: int, token: int) -> int:
        """Where `token` of `row` starts in a (layer, kv head) plane of the rows' tensors (elements)."""
        return row * self.all_keys.stride(1) + token * self.head_dim

    def warm_copies(self) -> None:
        """Compile the copy kernel now (a run of no tokens), not at the first prefix saved or row moved: the strides of
        the rows, the pool and the shared prefix are multiples of 16 alike, so one compilation serves them all."""
        if self.kernel_copies:
            both = (self.all_keys, self.all_values)
            self._copy_tokens(both, both, [0], [0], [0])

    def _copy_tokens(
        self, src: tuple[torch.Tensor, torch.Tensor], dst: tuple[torch.Tensor, torch.Tensor], src_starts: list[int],
        dst_starts: list[int], lengths: list[int],
    ) -> None:
        """kernels.copy_tokens of these runs (offsets within a plane, `_at`; the pool's and the shared prefix's
        planes are [tokens, head_dim]), in one copy of their table to the device and one launch."""
        table = self._on_device(np.array([src_starts, dst_starts, lengths], dtype=np.int64).reshape(-1)).view(3, -1)

        def planes(t: torch.Tensor) -> tuple[int, int]:  # (layer, kv head) strides: the rows' [L, R, H, C, D]
            return (t.stride(0), t.stride(2)) if t.dim() == 5 else (t.stride(0), t.stride(1))

        kernels.copy_tokens(src, dst, table, planes(src[0]), planes(dst[0]), self.layers, self.kv_heads)

    def _index(self, starts: list[int], block: int) -> torch.Tensor:
        idx = (np.asarray(starts, dtype=np.int64)[:, None] + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)
        return self._on_device(idx)

    def _on_device(self, values: np.ndarray | list[int]) -> torch.Tensor:
        # Without waiting for every step queued on the device (a decode step running ahead), at each prefill and
        # each prefix save or load.
        return to_device(values, self.device)

    def save_blocks(self, row: int, positions: list[int], slots: list[int], block: int) -> None:
        """Copy `block` tokens of `row` from each position in `positions` into pool block `slots[i]`."""
        if not positions:
            return
        if max(positions) + block > self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} tokens; cannot save a block at {max(positions)}")
        if min(positions) < self.hollow[row]:  # (blocks the pool lost and a sharing row saves again: rare)
            self.fill([row])
        pool_k, pool_v = self._pool((max(slots) + 1) * block)
        self.touched.add(row)
        self.pool_written.update(slots)
        if self.kernel_copies:
            d = self.head_dim
            self._copy_tokens(
                (self.all_keys, self.all_values), (pool_k, pool_v), [self._at(row, p) for p in positions],
                [s * block * d for s in slots], [block] * len(slots),
            )
            return
        src, dst = self._index([*positions, *(s * block for s in slots)], block).view(2, -1)  # one copy to the device
        for cache, pool in ((self.all_keys, pool_k), (self.all_values, pool_v)):
            pool.index_copy_(2, dst, cache[:, row].index_select(2, src))

    def load_blocks(self, row: int, slots: list[int], block: int, ids: Sequence[int] = ()) -> None:
        """Make pool blocks `slots`, in order, the first len(slots) * block tokens of the empty `row`; with the
        blocks' `ids` (the prefix cache's), the row reads those it has in common with the shared prefix from there,
        and is not given a copy of them (`share`)."""
        if self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} tokens; a prefix loads into an empty row")
        n = len(slots) * block
        if not n:
            return
        self.grow(n)
        pool_k, pool_v = self._pool((max(slots) + 1) * block)
        shared = self.share(list(ids), slots, block) if ids else 0
        if shared < n and self.kernel_copies:
            own = slots[shared // block :]
            d = self.head_dim
            self._copy_tokens(
                (pool_k, pool_v), (self.all_keys, self.all_values), [s * block * d for s in own],
                [self._at(row, shared + i * block) for i in range(len(own))], [block] * len(own),
            )
        elif shared < n:  # the row holds what it does not read from the shared prefix (blocks: `shared` is whole ones)
            src = self._index([s * block for s in slots[shared // block :]], block)
            for cache, pool in ((self.all_keys, pool_k), (self.all_values, pool_v)):
                cache[:, row, :, shared:n].copy_(pool.index_select(2, src))
        self.set_length(row, n)
        self._set_shared(row, shared)
        self.hollow[row] = shared

    # -- the shared prefix (cascade decode steps) -------------------------------------------

    def _set_shared(self, row: int, n: int) -> None:
        if self.hollow[row] > n:
            self.hollow[row] = n
        if self.shared[row] != n:
            self.shared[row] = n
            if self.shared_dev is not None:
                self.shared_dev[row : row + 1].fill_(n)  # a kernel argument: no wait for the queued steps

    def fill(self, rows: Sequence[int]) -> None:
        """Copy the shared prefix's part of each of `rows` into the row, for a reader that reads only the row."""
        if self.shared_keys is None or self.shared_values is None:
            return
        filled = [row for row in rows if self.hollow[row]]
        if self.kernel_copies and filled:
            self._copy_tokens(
                (self.shared_keys, self.shared_values), (self.all_keys, self.all_values), [0] * len(filled),
                [self._at(row, 0) for row in filled], [self.hollow[row] for row in filled],
            )
        for row in filled:
            hollow = self.hollow[row]
            self.touched.add(row)
            if not self.kernel_copies:
                self.all_keys[:, row, :, :hollow].copy_(self.shared_keys[:, :, :hollow])
                self.all_values[:, row, :, :hollow].copy_(self.shared_values[:, :, :hollow])
            self.hollow[row] = 0

    def stop_sharing(self) -> None:
        """Every row holds all its tokens again and none reads the shared prefix, from now on (a reader that cannot
        take it runs: torch's attention after the Triton kernel failed, a pipeline stage)."""
        self.fill(range(self.rows))
        for row in range(self.rows):
            self._set_shared(row, 0)
        self.shared_keys = self.shared_values = None

    def share(self, ids: list[int], slots: Sequence[int], block: int) -> int:
        """How many of the first tokens of the pool blocks `ids` (in pool slots `slots`), which a row
        loads, it reads from the shared prefix: those it has in common with it. Blocks past the prefix's end extend
        it (rows that read it read no further than they did); a prefix in common with too little of them is
        replaced where no row counts on it. None under CASCADE_MIN_TOKENS tokens, or past the prefix's room."""
        if self.shared_keys is None or self.shared_values is None or self.shared_count is None:
            return 0
        common = 0
        held = len(self.shared_ids)
        if block == self.shared_block and tuple(ids[:held]) == self.shared_ids:  # the usual case, at C speed
            common = held
        elif block == self.shared_block:
            for mine, theirs in zip(ids, self.shared_ids, strict=False):
                if mine != theirs:
                    break
                common += 1
        extend = common == held
        replace = common * block < CASCADE_MIN_TOKENS and not any(self.shared)
        end = min(len(ids), self.shared_keys.shape[2] // block)
        if common < end and (extend or replace) and end * block >= CASCADE_MIN_TOKENS:
            first = common if extend else 0
            assert self.pool_keys is not None and self.pool_values is not None  # the row loads from it
            if self.kernel_copies:
                d = self.head_dim
                self._copy_tokens(
                    (self.pool_keys, self.pool_values), (self.shared_keys, self.shared_values),
                    [s * block * d for s in slots[first:end]], [i * block * d for i in range(first, end)],
                    [block] * (end - first),
                )
            else:
                src = self._index([s * block for s in slots[first:end]], block)
                for shared, pool in ((self.shared_keys, self.pool_keys), (self.shared_values, self.pool_values)):
                    shared[:, :, first * block : end * block].copy_(pool.index_select(2, src))
            self.shared_ids, self.shared_block, common = tuple(ids[:end]), block, end
            self.shared_count.fill_(end * block)
        return common * block if common * block >= CASCADE_MIN_TOKENS else 0
