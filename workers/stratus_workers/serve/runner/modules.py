"""The module path: the Hugging Face modules themselves, driven over the per-row KV cache.

The runner calls each layer's own norms, projections and MLP instead of `model(...)`, so each
row of a batch sits at its own position in its own cache row. The arithmetic is exactly Hugging
Face's, and quantized or pruned linear layers work unchanged because they are still called as
modules. This is the CPU's path, and every model's path when its layers cannot be fused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from stratus_workers.serve.parallel import ParallelContext
from stratus_workers.serve.runner import ModelRunner, UnsupportedModelError, new_token_slots, to_device
from stratus_workers.serve.runner.cache import MIN_CAPACITY, KVCache


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as Llama applies it (rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class ModuleRunner(ModelRunner):
    """Runs the model's own modules; the cache starts at `initial_len` tokens a row and doubles as needed."""

    def __init__(
        self,
        model: Any,
        *,
        max_rows: int,
        max_len: int,
        initial_len: int = 256,
        parallel: ParallelContext | None = None,
        pool_tokens: int = 0,
    ) -> None:
        super().__init__(model, max_rows=max_rows, max_len=max_len, parallel=parallel, pool_tokens=pool_tokens)
        if parallel is not None and parallel.sharded:
            raise UnsupportedModelError("tensor parallel needs the fast path (plain Linear layers)")
        self.cache = KVCache(
            layers=len(self.layers),
            rows=max_rows,
            kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_len=max_len,
            capacity=min(max_len, max(initial_len, MIN_CAPACITY)),
            pool_tokens=pool_tokens,
        )

    def _forward(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
        logits_from: int = 0,
    ) -> torch.Tensor:
        hidden = self.embed(self.padded_ids(tokens))
        hidden = self.extend_hidden(first_row, hidden, starts, q_lens)
        hidden = hidden[:, logits_from:] if all_logits else self.last_tokens(hidden, q_lens)
        return self.head(hidden)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.model.model.embed_tokens(ids)
        return result

    def head(self, h: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.model.lm_head(self.model.model.norm(h)).float()
        return result

    def extend_hidden(self, first_row: int, h: torch.Tensor, starts: list[int], q_lens: list[int]) -> torch.Tensor:
        batch, q_max = h.shape[0], h.shape[1]
        ends = [s + q for s, q in zip(starts, q_lens, strict=True)]
        k_len = max(ends)
        dev = self.device
        start_t = to_device(starts, dev)
        positions = start_t[:, None] + torch.arange(q_max, device=dev)[None, :]  # [B, Q]
        # Key j is visible to the query at position p iff j <= p (causal, per row).
        mask = torch.arange(k_len, device=dev)[None, None, None, :] <= positions[:, None, :, None]
        hidden = h
        cos, sin = self.model.model.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        row_sl = slice(first_row, first_row + batch)
        write_rows = torch.arange(first_row, first_row + batch, device=dev)[:, None].expand(batch, q_max)
        slots = new_token_slots(first_row, starts, q_lens, dev)
        for layer, k_cache, v_cache in zip(self.layers, self.cache.keys, self.cache.values, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, q_max, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, q_max, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, q_max, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
            # Scatter each row's new keys to its own positions: index [row, :, pos] per (b, q).
            if slots is None:
                k_cache[write_rows, :, positions] = k.transpose(1, 2).to(k_cache.dtype)
                v_cache[write_rows, :, positions] = v.transpose(1, 2).to(v_cache.dtype)
            else:
                b, q_idx, rows, pos = slots
                k_cache[rows, :, pos] = k.transpose(1, 2)[b, q_idx].to(k_cache.dtype)
                v_cache[rows, :, pos] = v.transpose(1, 2)[b, q_idx].to(v_cache.dtype)
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
        self.cache.set_lengths(first_row, ends)
        return hidden
