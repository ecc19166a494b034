"""Per-row KV cache: one key and one value tensor per layer, each row a sequence at its own length."""

from __future__ import annotations

import torch

MIN_CAPACITY = 16


class KVCache:
    """Keys and values of `rows` sequences, [rows, kv_heads, capacity, head_dim] for each layer.

    Rows join, leave, roll back and move independently; `lengths` says how many tokens each holds
    (and `lengths_dev`, when asked for, mirrors it on the device for a decode step that must not
    read host memory). `version` counts the changes made outside a decode step, so a step computed
    ahead of time can tell whether the rows it assumed still stand.

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
    ) -> None:
        self.layers = layers
        self.rows = rows
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_len = max_len
        self.lengths = [0] * rows
        self.lengths_dev: torch.Tensor | None = None
        if device_lengths:
            with torch.inference_mode(False):
                self.lengths_dev = torch.zeros(rows, dtype=torch.long, device=device)
        self.version = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(capacity)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def grow(self, needed: int) -> None:
        """Make room for `needed` tokens a row (doubling), or raise ValueError past `max_len`."""
        if needed > self.max_len:
            raise ValueError(f"sequence of {needed} tokens exceeds the cache limit of {self.max_len}")
        if needed > self.capacity:
            self._allocate(min(self.max_len, max(needed, self.capacity * 2, MIN_CAPACITY)))

    def _allocate(self, capacity: int) -> None:
        shape = (self.rows, self.kv_heads, capacity, self.head_dim)
        with torch.inference_mode(False):
            keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
            values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
            if self.capacity:
                for old, new in zip((*self.keys, *self.values), (*keys, *values), strict=True):
                    new[:, :, : self.capacity].copy_(old)
        self.keys, self.values, self.capacity = keys, values, capacity

    def set_length(self, row: int, length: int) -> None:
        self.lengths[row] = length
        if self.lengths_dev is not None:
            self.lengths_dev[row] = length
        self.version += 1

    def set_lengths(self, first_row: int, lengths: list[int]) -> None:
        """Rows first_row.. now hold `lengths` tokens (after a prefill or an extension)."""
        end = first_row + len(lengths)
        self.lengths[first_row:end] = lengths
        if self.lengths_dev is not None:
            self.lengths_dev[first_row:end] = torch.tensor(lengths, dtype=torch.long).to(self.device, non_blocking=True)
        self.version += 1

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
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self.set_length(row, length)

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` and empty `src`."""
        n = self.lengths[src]
        for cache in (*self.keys, *self.values):
            cache[dst, :, :n].copy_(cache[src, :, :n])
        self.set_length(dst, n)
        self.set_length(src, 0)
