"""Model runner: batched forward passes of a Llama-family model over a per-row KV cache.

The runner drives the Hugging Face modules directly instead of calling `model(...)`, so that
each row of a batch sits at its own position in its own KV cache row. That is what lets the
engine add and remove requests between decode steps (continuous batching) and roll a row
back (speculative verification) without rebuilding any cache. Quantized or pruned linear
layers work unchanged because they are still called as modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the runner can drive."""


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class ModelRunner:
    """Holds one model and a KV cache of `max_rows` rows; rows are kept contiguous from 0."""

    def __init__(self, model: Any, *, max_rows: int, max_len: int, initial_len: int = 256) -> None:
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {getattr(config, 'model_type', '?')!r} is not supported by the serving runner; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.config = config
        self.max_rows = max_rows
        self.max_len = max_len
        self.layers = list(model.model.layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.scale = self.head_dim**-0.5
        first = next(model.parameters())
        self.device = first.device
        # Quantized layers hold integer codes; activations (and the cache) follow the norms' dtype.
        self.dtype = model.model.norm.weight.dtype
        self.lengths = [0] * max_rows
        self._capacity = 0
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._grow(min(initial_len, max_len))

    # -- cache management ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        if needed > self.max_len:
            raise ValueError(f"sequence of {needed} tokens exceeds the cache limit of {self.max_len}")
        new_cap = min(self.max_len, max(needed, self._capacity * 2, 16))
        shape = (self.max_rows, self.num_kv_heads, new_cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        if self._capacity:
            for old, new in zip((*self._k, *self._v), (*new_k, *new_v), strict=True):
                new[:, :, : self._capacity].copy_(old)
        self._k, self._v, self._capacity = new_k, new_v, new_cap

    def reset(self, row: int) -> None:
        self.lengths[row] = 0

    def truncate(self, row: int, length: int) -> None:
        """Forget everything after `length` tokens in `row` (rejected speculative tokens)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self.lengths[row] = length

    def move(self, src: int, dst: int) -> None:
        """Move row `src`'s cache into row `dst` (keeps active rows contiguous after one leaves)."""
        if src == dst:
            return
        n = self.lengths[src]
        for cache in (*self._k, *self._v):
            cache[dst, :, :n].copy_(cache[src, :, :n])
        self.lengths[dst] = n
        self.lengths[src] = 0

    # -- forward ------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, first_row: int, tokens: Sequence[Sequence[int]], *, all_logits: bool = False) -> torch.Tensor:
        """Append `tokens[i]` to row `first_row + i` and return logits.

        Returns [B, V] logits of each row's last new token, or [B, Q, V] for every new token
        when `all_logits` (Q is the longest row; shorter rows are padded at the end).
        """
        batch = len(tokens)
        if batch == 0:
            raise ValueError("forward needs at least one row")
        rows = range(first_row, first_row + batch)
        q_lens = [len(t) for t in tokens]
        if min(q_lens) == 0:
            raise ValueError("every row needs at least one new token")
        starts = [self.lengths[r] for r in rows]
        q_max = max(q_lens)
        ends = [s + q for s, q in zip(starts, q_lens, strict=True)]
        self._grow(max(starts) + q_max)
        k_len = max(ends)

        dev = self.device
        ids = torch.zeros((batch, q_max), dtype=torch.long)
        for i, row_tokens in enumerate(tokens):
            ids[i, : len(row_tokens)] = torch.as_tensor(row_tokens, dtype=torch.long)
        ids = ids.to(dev, non_blocking=True)
        start_t = torch.tensor(starts, dtype=torch.long).to(dev, non_blocking=True)
        positions = start_t[:, None] + torch.arange(q_max, device=dev)[None, :]  # [B, Q]
        # Key j is visible to the query at position p iff j <= p (causal, per row).
        mask = torch.arange(k_len, device=dev)[None, None, None, :] <= positions[:, None, :, None]

        hidden = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        row_sl = slice(first_row, first_row + batch)
        write_rows = torch.arange(first_row, first_row + batch, device=dev)[:, None].expand(batch, q_max)
        for layer, k_cache, v_cache in zip(self.layers, self._k, self._v, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, q_max, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, q_max, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, q_max, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = _apply_rotary(q, cos, sin)
            k = _apply_rotary(k, cos, sin)
            # Scatter each row's new keys to its own positions: index [row, :, pos] per (b, q).
            k_cache[write_rows, :, positions] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[write_rows, :, positions] = v.transpose(1, 2).to(v_cache.dtype)
            out = F.scaled_dot_product_attention(
                q,
                k_cache[row_sl, :, :k_len],
                v_cache[row_sl, :, :k_len],
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
            out = out.transpose(1, 2).reshape(batch, q_max, self.num_heads * self.head_dim)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        for r, end in zip(rows, ends, strict=True):
            self.lengths[r] = end
        if all_logits:
            return self.model.lm_head(self.model.model.norm(hidden)).float()
        last = torch.tensor([q - 1 for q in q_lens], device=dev)
        picked = hidden[torch.arange(batch, device=dev), last]
        return self.model.lm_head(self.model.model.norm(picked)).float()
