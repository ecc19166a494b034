"""Model runner: batched forward passes of a Llama-family model over a per-row KV cache.

The runner drives the Hugging Face modules directly instead of calling `model(...)`, so that
each row of a batch sits at its own position in its own KV cache row. That is what lets the
engine add and remove requests between decode steps (continuous batching) and roll a row
back (speculative verification) without rebuilding any cache. Quantized or pruned linear
layers work unchanged because they are still called as modules.

On CUDA (or when asked for with `fast=True`) the runner takes a second path built for speed:
each layer's projections are fused into two matrices (q|k|v and gate|up), the KV cache is
allocated once at full length, and a decode step (one new token for rows 0..n-1) runs as a
CUDA graph captured per batch bucket (rows past the batch are padding). Row lengths live on
the device as well as on the host, so a step needs no host tensors other than the new token
ids, and the only host-device sync is the caller reading the sampled ids. `torch.compile`
fuses the small element-wise kernels (norms, rotary, SiLU) inside the captured step and a
Triton kernel (kernels.py) does the attention. Each step also leaves its argmax on the device
and the runner starts the next step on it at once; when the caller then sends exactly those
tokens (greedy decoding), that step is already running, so the GPU works while the host
samples, detokenizes and streams. With a `ParallelContext` the fast path shards heads and MLP
columns over ranks (tensor parallel).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stratus_workers.serve import kernels

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Batch sizes a decode graph is captured for; a batch runs in the smallest bucket that holds it.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MIN_KV_BUCKET = 64
MAX_GRAPHS = 96  # each graph holds its own activations; beyond this, decode runs eagerly


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the runner can drive."""


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a tensor-parallel group (rank 0 serves; every rank computes).

    Rank 0's runner repeats each of its calls (forward, reset, truncate, move, warmup) to the
    other ranks over `control` (a gloo group: small pickled messages), and their runners, in
    `follow()`, make the same calls, so every rank issues the same all-reduces in the same order.
    """

    rank: int
    world_size: int
    group: Any = None  # ProcessGroup for the activations' all-reduces (None: the default group)
    control: Any = None  # ProcessGroup (gloo) for rank 0's calls

    @property
    def leader(self) -> bool:
        return self.world_size > 1 and self.rank == 0


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The same arithmetic as LlamaRMSNorm: normalise in float32, scale in the model dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dataclass
class _LayerWeights:
    """One decoder layer's weights in the fast path's fused (and, under TP, sharded) form."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class _Step:
    """A queued decode step: its logits, its greedy choices (host copy) and when they are ready."""

    batch: int
    version: int
    logits: torch.Tensor
    argmax: torch.Tensor
    done: torch.cuda.Event | None


def _qkv_rope(
    h: torch.Tensor,
    delta: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_q: int,
    n_kv: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add of the previous layer's MLP output, norm, fused q|k|v projection, rotary.

    `h` is [..., hidden]; returns the new residual and q [..., n_q, D], k and v [..., n_kv, D].
    """
    h = h + delta
    x = _rms_norm(h, norm_w, eps)
    qkv = F.linear(x, w_qkv, b_qkv)
    q, k, v = torch.split(qkv, [n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    lead = qkv.shape[:-1]
    q = q.reshape(*lead, n_q, head_dim)
    k = k.reshape(*lead, n_kv, head_dim)
    v = v.reshape(*lead, n_kv, head_dim)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return h, _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin), v


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per row against that row's keys: q [B, Hq, D], keys/values [B, Hkv, K, D], bias [B, K].

    Grouped-query heads are folded into the query dimension so keys are read once per kv head.
    """
    batch, n_q, head_dim = q.shape
    n_kv = keys.shape[1]
    qg = q.view(batch, n_kv, n_q // n_kv, head_dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale + bias[:, None, None, :]
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values).reshape(batch, n_q * head_dim)


def _mlp_in(
    h: torch.Tensor,
    attn: torch.Tensor,
    b_o: torch.Tensor | None,
    norm_w: torch.Tensor,
    eps: float,
    w_gate_up: torch.Tensor,
    b_gate_up: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add of the attention output, norm, fused gate|up projection and SiLU(gate) * up."""
    if b_o is not None:
        attn = attn + b_o
    h = h + attn
    gate_up = F.linear(_rms_norm(h, norm_w, eps), w_gate_up, b_gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return h, F.silu(gate) * up


class ModelRunner:
    """Holds one model and a KV cache of `max_rows` rows; rows are kept contiguous from 0."""

    def __init__(
        self,
        model: Any,
        *,
        max_rows: int,
        max_len: int,
        initial_len: int = 256,
        fast: bool | None = None,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        parallel: ParallelContext | None = None,
    ) -> None:
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
        self.parallel = parallel or _DEFAULT_PARALLEL
        on_cuda = self.device.type == "cuda"
        fusable = self._fusable()
        # STRATUS_CUDA_GRAPHS / STRATUS_COMPILE / STRATUS_TRITON_ATTENTION=0 turn a stage off (debugging,
        # A/B timing); STRATUS_FAST_PATH=0 or 1 overrides the choice of path (1 runs the CUDA path's
        # arithmetic on the CPU too, which is how the CPU tests cover it).
        self.fast = fusable if fast is None else fast
        if self.fast and not fusable:
            raise UnsupportedModelError("the fast path needs plain Linear projections and a SiLU MLP")
        sharded = self.parallel is not None and self.parallel.world_size > 1
        if fast is None:
            if os.environ.get("STRATUS_FAST_PATH"):
                self.fast = self.fast and _env_flag("STRATUS_FAST_PATH", True)
            else:  # the CPU keeps the module path (exactly Hugging Face's arithmetic) unless sharded
                self.fast = self.fast and (on_cuda or sharded)
        if sharded and not self.fast:
            raise UnsupportedModelError("tensor parallel needs the fast path (plain Linear layers)")
        want_graphs = on_cuda and _env_flag("STRATUS_CUDA_GRAPHS", True) if cuda_graphs is None else cuda_graphs
        self.cuda_graphs = bool(self.fast and want_graphs and on_cuda)
        want_compile = on_cuda and _env_flag("STRATUS_COMPILE", True) if compile is None else compile
        self.compiled = bool(self.fast and want_compile)
        self._capacity = 0
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.parallel is not None and self.parallel.leader:
            self._lead(
                "__init__", max_rows=max_rows, max_len=max_len, fast=fast, cuda_graphs=cuda_graphs, compile=compile
            )
        if self.fast:
            self._init_fast()
        else:
            self._grow(min(initial_len, max_len))

    # -- cache management ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))

    def _allocate(self, capacity: int, kv_heads: int) -> None:
        shape = (self.max_rows, kv_heads, capacity, self.head_dim)
        # Ordinary tensors even when forward() grows the cache inside inference mode: an inference
        # tensor refuses in-place updates outside it, which killed the engine thread (issue 12).
        with torch.inference_mode(False):
            new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
            new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
            if self._capacity:
                for old, new in zip((*self._k, *self._v), (*new_k, *new_v), strict=True):
                    new[:, :, : self._capacity].copy_(old)
        self._k, self._v, self._capacity = new_k, new_v, capacity

    def _grow(self, needed: int) -> None:
        if needed > self.max_len:
            raise ValueError(f"sequence of {needed} tokens exceeds the cache limit of {self.max_len}")
        if needed <= self._capacity:
            return
        self._allocate(min(self.max_len, max(needed, self._capacity * 2, 16)), self.num_kv_heads)

    def _set_len(self, row: int, length: int) -> None:
        self.lengths[row] = length
        if self.fast:
            self._len_dev[row] = length
            self._version += 1

    @torch.inference_mode()
    def reset(self, row: int) -> None:
        self._lead("reset", row)
        self._set_len(row, 0)

    @torch.inference_mode()
    def truncate(self, row: int, length: int) -> None:
        """Forget everything after `length` tokens in `row` (rejected speculative tokens)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self._lead("truncate", row, length)
        self._set_len(row, length)

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Move row `src`'s cache into row `dst` (keeps active rows contiguous after one leaves)."""
        if src == dst:
            return
        self._lead("move", src, dst)
        n = self.lengths[src]
        for cache in (*self._k, *self._v):
            cache[dst, :, :n].copy_(cache[src, :, :n])
        self._set_len(dst, n)
        self._set_len(src, 0)

    # -- tensor parallel ----------------------------------------------------------------

    def _lead(self, method: str, *args: Any, **kwargs: Any) -> None:
        """On rank 0 of a tensor-parallel group: tell the other ranks to make the same call."""
        if self.parallel is not None and self.parallel.leader:
            _broadcast(self.parallel, (method, args, kwargs))

    def close(self) -> None:
        """On rank 0: release the other ranks from `follow()` (they return and their processes exit)."""
        self._lead("__stop__")

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
        self._grow(max(starts) + q_max)
        self._lead("forward", first_row, [list(t) for t in tokens], all_logits=all_logits)
        if self.fast and q_max == 1 and first_row == 0:
            logits = self._decode_static(batch, [t[0] for t in tokens])
            return logits[:, None] if all_logits else logits
        if self.fast:
            return self._forward_fused(first_row, tokens, starts, q_lens, all_logits)
        ends = [s + q for s, q in zip(starts, q_lens, strict=True)]
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
        if not all_logits:
            last = torch.tensor([q - 1 for q in q_lens], device=dev)
            hidden = hidden[torch.arange(batch, device=dev), last]
        result: torch.Tensor = self.model.lm_head(self.model.model.norm(hidden)).float()
        return result

    # -- the fast path ------------------------------------------------------------------

    def _fusable(self) -> bool:
        if getattr(self.config, "hidden_act", "silu") != "silu":
            return False
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            # Exact type: quantized or pruned subclasses keep their own forward and take the module path.
            if any(type(m) is not torch.nn.Linear for m in linears):
                return False
            if not hasattr(layer.input_layernorm, "weight") or getattr(attn, "q_norm", None) is not None:
                return False
        return True

    def _init_fast(self) -> None:
        par = self.parallel
        rank, world = (par.rank, par.world_size) if par is not None else (0, 1)
        if self.num_heads % world or self.num_kv_heads % world:
            raise UnsupportedModelError(
                f"{self.num_heads} attention heads and {self.num_kv_heads} kv heads do not split over {world} ranks"
            )
        self.world_size = world
        self.local_heads = self.num_heads // world
        self.local_kv_heads = self.num_kv_heads // world
        d = self.head_dim

        def shard_rows(w: torch.Tensor, per_rank: int) -> torch.Tensor:
            return w[rank * per_rank : (rank + 1) * per_rank]

        self._lw: list[_LayerWeights] = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_parts = [
                shard_rows(attn.q_proj.weight, self.local_heads * d),
                shard_rows(attn.k_proj.weight, self.local_kv_heads * d),
                shard_rows(attn.v_proj.weight, self.local_kv_heads * d),
            ]
            qkv_bias = None
            if attn.q_proj.bias is not None:
                qkv_bias = torch.cat(
                    [
                        shard_rows(attn.q_proj.bias, self.local_heads * d),
                        shard_rows(attn.k_proj.bias, self.local_kv_heads * d),
                        shard_rows(attn.v_proj.bias, self.local_kv_heads * d),
                    ]
                ).contiguous()
            inter = mlp.gate_proj.weight.shape[0] // world
            gate_up_bias = None
            if mlp.gate_proj.bias is not None:
                gate_up_bias = torch.cat([shard_rows(mlp.gate_proj.bias, inter), shard_rows(mlp.up_proj.bias, inter)])
            o_cols = attn.o_proj.weight[:, rank * self.local_heads * d : (rank + 1) * self.local_heads * d]
            down_cols = mlp.down_proj.weight[:, rank * inter : (rank + 1) * inter]
            self._lw.append(
                _LayerWeights(
                    in_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    eps=float(getattr(layer.input_layernorm, "variance_epsilon", self.config.rms_norm_eps)),
                    qkv=torch.cat(qkv_parts).contiguous(),
                    qkv_bias=qkv_bias,
                    o=o_cols.contiguous(),
                    o_bias=attn.o_proj.bias,
                    gate_up=torch.cat(
                        [shard_rows(mlp.gate_proj.weight, inter), shard_rows(mlp.up_proj.weight, inter)]
                    ).contiguous(),
                    gate_up_bias=gate_up_bias,
                    down=down_cols.contiguous(),
                    down_bias=mlp.down_proj.bias,
                )
            )
        if world > 1:
            # Each rank now holds only its shard of the big projections; drop the full copies.
            for layer in self.layers:
                for module in (*_attn_linears(layer), *_mlp_linears(layer)):
                    module.weight = torch.nn.Parameter(torch.empty(0, device=self.device), requires_grad=False)
        self._final_norm = self.model.model.norm.weight
        self._final_eps = float(getattr(self.model.model.norm, "variance_epsilon", 1e-6))
        self._embed = self.model.model.embed_tokens.weight
        self._lm_head = self.model.lm_head.weight
        # One spare slot past max_len: padded rows of a bucketed decode write there, never over live keys.
        capacity = self.max_len + 1
        with torch.inference_mode():
            positions = torch.arange(capacity, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.model.model.rotary_emb(probe, positions)
            self._cos, self._sin = cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()
        # Outside inference mode: move() and reset() update the cache from ordinary code.
        self._allocate(capacity, self.local_kv_heads)
        self._capacity = capacity
        dev = self.device
        self._len_dev = torch.zeros(self.max_rows, dtype=torch.long, device=dev)
        self._tok_dev = torch.zeros(self.max_rows, dtype=torch.long, device=dev)
        self._tok_host = torch.zeros(self.max_rows, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._tok_np = self._tok_host.numpy()
        self._rows_dev = torch.arange(self.max_rows, device=dev)
        self._kv_ar = torch.arange(capacity, device=dev)
        self._copy_done: torch.cuda.Event | None = None
        self._argmax_host = torch.zeros((2, self.max_rows), dtype=torch.long, pin_memory=dev.type == "cuda")
        self._slot = 0
        self._version = 0  # bumped by every change to rows outside a decode step
        self._spec: _Step | None = None
        self._expected: list[int] = []
        self._spec_pause = 0
        self.speculation_hits = 0
        # Running one step ahead pays on the GPU, where the step is asynchronous; a tensor-parallel
        # group would have to agree on every guess, so it decodes one step at a time.
        # STRATUS_DECODE_AHEAD=0 or 1 overrides (1 also runs it on the CPU, for the tests).
        ahead = os.environ.get("STRATUS_DECODE_AHEAD")
        self.speculate = _env_flag("STRATUS_DECODE_AHEAD", True) if ahead else self.cuda_graphs
        self.speculate = self.speculate and self.world_size == 1
        self._pool: Any = None
        self.triton_attention = (
            self.device.type == "cuda"
            and kernels.supports(self.head_dim, self.local_heads, self.local_kv_heads)
            and _env_flag("STRATUS_TRITON_ATTENTION", True)
        )
        self._set_step_fns(self.compiled)

    def _set_step_fns(self, compiled: bool) -> None:
        # Shapes and constants are baked into closures so that torch.compile sees them as constants
        # (one compiled graph serves every layer: the weights are arguments, the sizes are not).
        # Each layer is two compiled calls, split where tensor parallel all-reduces.
        n_q, n_kv, d, scale = self.local_heads, self.local_kv_heads, self.head_dim, self.scale

        def attention_block(
            h: torch.Tensor, delta: torch.Tensor, norm_w: torch.Tensor, eps: float, w_qkv: torch.Tensor,
            b_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor, w_o: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Residual add, norm, q|k|v, rotary, cache write at `pos`, attention, o-projection."""
            h, q, k, v = _qkv_rope(h, delta, norm_w, eps, w_qkv, b_qkv, cos, sin, n_q, n_kv, d)
            # Written in place (inductor fuses the scatter with the rotary kernel, no cache copy).
            k_cache[rows, :, pos] = k
            v_cache[rows, :, pos] = v
            batch, kv_len = h.shape[0], bias.shape[1]
            out = _decode_attention(q, k_cache[:batch, :, :kv_len], v_cache[:batch, :, :kv_len], bias, scale)
            return h, F.linear(out, w_o)

        def mlp_block(
            h: torch.Tensor, attn: torch.Tensor, b_o: torch.Tensor | None, norm_w: torch.Tensor, eps: float,
            w_gate_up: torch.Tensor, b_gate_up: torch.Tensor | None, w_down: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            h, act = _mlp_in(h, attn, b_o, norm_w, eps, w_gate_up, b_gate_up)
            return h, F.linear(act, w_down)

        def store_block(
            h: torch.Tensor, delta: torch.Tensor, norm_w: torch.Tensor, eps: float, w_qkv: torch.Tensor,
            b_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """attention_block up to the cache write; the Triton kernel does the attention itself."""
            h, q, k, v = _qkv_rope(h, delta, norm_w, eps, w_qkv, b_qkv, cos, sin, n_q, n_kv, d)
            k_cache[rows, :, pos] = k
            v_cache[rows, :, pos] = v
            return h, q

        fns: list[Callable[..., Any]] = [attention_block, mlp_block, store_block]
        self.compiled = compiled
        if compiled:
            fns = [torch.compile(fn, dynamic=True, fullgraph=True) for fn in fns]
        self._attn_fn, self._mlp_fn, self._store_fn = fns

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.parallel.group if self.parallel else None)
        return x

    def _forward_fused(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
    ) -> torch.Tensor:
        """Prefill, extend or verify (any number of new tokens per row) with the fused weights."""
        batch, q_max = len(tokens), max(q_lens)
        dev = self.device
        ids_host = np.zeros((batch, q_max), dtype=np.int64)
        for i, row_tokens in enumerate(tokens):
            ids_host[i, : len(row_tokens)] = row_tokens
        ends = [s + q for s, q in zip(starts, q_lens, strict=True)]
        k_len = max(ends)
        ids = torch.from_numpy(ids_host).to(dev, non_blocking=True)
        start_t = torch.tensor(starts, dtype=torch.long).to(dev, non_blocking=True)
        positions = start_t[:, None] + torch.arange(q_max, device=dev)[None, :]  # [B, Q]
        mask = torch.arange(k_len, device=dev)[None, None, None, :] <= positions[:, None, :, None]
        cos, sin = self._cos[positions], self._sin[positions]
        write_rows = torch.arange(first_row, first_row + batch, device=dev)[:, None].expand(batch, q_max)
        row_sl = slice(first_row, first_row + batch)
        h = F.embedding(ids, self._embed)
        delta = torch.zeros_like(h)
        for lw, k_cache, v_cache in zip(self._lw, self._k, self._v, strict=True):
            h, q, k, v = _qkv_rope(
                h, delta, lw.in_norm, lw.eps, lw.qkv, lw.qkv_bias, cos, sin,
                self.local_heads, self.local_kv_heads, self.head_dim,
            )  # fmt: skip
            k_cache[write_rows, :, positions] = k
            v_cache[write_rows, :, positions] = v
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k_cache[row_sl, :, :k_len],
                v_cache[row_sl, :, :k_len],
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.local_kv_heads != self.local_heads,
            )
            out = self._all_reduce(F.linear(out.transpose(1, 2).flatten(2), lw.o))
            h, act = _mlp_in(h, out, lw.o_bias, lw.post_norm, lw.eps, lw.gate_up, lw.gate_up_bias)
            delta = self._all_reduce(F.linear(act, lw.down))
            if lw.down_bias is not None:
                delta = delta + lw.down_bias
        h = h + delta
        for r, end in zip(range(first_row, first_row + batch), ends, strict=True):
            self.lengths[r] = end
        self._len_dev[row_sl] = start_t + torch.tensor(q_lens, dtype=torch.long).to(dev, non_blocking=True)
        self._version += 1
        if not all_logits:
            last = torch.tensor([q - 1 for q in q_lens], device=dev)
            h = h[torch.arange(batch, device=dev), last]
        return F.linear(_rms_norm(h, self._final_norm, self._final_eps), self._lm_head).float()

    def _decode_body(self, batch: int, kv_len: int) -> torch.Tensor:
        """One decode step for rows 0..batch-1 reading only device buffers (what a graph captures)."""
        pos = self._len_dev[:batch]
        rows = self._rows_dev[:batch]
        h = F.embedding(self._tok_dev[:batch], self._embed)
        cos, sin = self._cos[pos], self._sin[pos]
        # Row b sees keys 0..pos[b] (its cache plus the key written this step).
        bias = None if self.triton_attention else torch.where(self._kv_ar[:kv_len][None, :] <= pos[:, None], 0.0, -1e30)
        delta = torch.zeros_like(h)
        for lw, k_cache, v_cache in zip(self._lw, self._k, self._v, strict=True):
            if self.triton_attention:
                h, q = self._store_fn(
                    h, delta, lw.in_norm, lw.eps, lw.qkv, lw.qkv_bias, cos, sin, k_cache, v_cache, rows, pos
                )
                out = F.linear(kernels.decode_attention(q, k_cache, v_cache, pos, self.scale), lw.o)
            else:
                h, out = self._attn_fn(
                    h, delta, lw.in_norm, lw.eps, lw.qkv, lw.qkv_bias, cos, sin, k_cache, v_cache, rows, pos, bias,
                    lw.o,
                )
            h, delta = self._mlp_fn(
                h, self._all_reduce(out), lw.o_bias, lw.post_norm, lw.eps, lw.gate_up, lw.gate_up_bias, lw.down
            )
            delta = self._all_reduce(delta)
            if lw.down_bias is not None:
                delta = delta + lw.down_bias
        h = h + delta
        logits = F.linear(_rms_norm(h, self._final_norm, self._final_eps), self._lm_head).float()
        self._tok_dev[:batch].copy_(logits.argmax(dim=-1))  # the next step's input, if the caller is greedy
        return logits

    def _buckets(self, batch: int, kv_needed: int) -> tuple[int, int]:
        bucket = next((b for b in BATCH_BUCKETS if b >= batch and b <= self.max_rows), self.max_rows)
        bucket = max(bucket, batch)
        if self.triton_attention:
            return bucket, self._capacity  # the kernel reads each row's length itself: one graph per batch size
        kv = MIN_KV_BUCKET
        while kv < kv_needed:
            kv *= 2
        return bucket, min(kv, self._capacity)

    def _load_tokens(self, ids: list[int]) -> None:
        n = len(ids)
        if self.device.type != "cuda":
            self._tok_dev[:n] = torch.tensor(ids, dtype=torch.long)
            return
        # The pinned buffer is reused every step: wait until the last copy out of it has run.
        if self._copy_done is not None:
            self._copy_done.synchronize()
        self._tok_np[:n] = ids
        self._tok_dev[:n].copy_(self._tok_host[:n], non_blocking=True)
        if self._copy_done is None:
            self._copy_done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._copy_done.record()

    def _launch(self, batch: int) -> _Step:
        """Queue one decode step of rows 0..batch-1 (tokens already in _tok_dev); do not wait for it."""
        bucket, kv_len = self._buckets(batch, max(self.lengths[:batch]) + 1)
        graph = self._graph(bucket, kv_len) if self.cuda_graphs else None
        if graph is not None:
            graph[0].replay()
            logits = graph[1][:batch].clone()
        else:
            logits = self._decode_body(bucket, kv_len)[:batch]
        # The step left its greedy choices in _tok_dev (the next step's input); keep a host copy,
        # alternating two buffers so that a queued next step cannot overwrite one still unread.
        self._slot ^= 1
        host = self._argmax_host[self._slot]
        host[:batch].copy_(self._tok_dev[:batch], non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        return _Step(batch=batch, version=self._version, logits=logits, argmax=host, done=done)

    def _decode_static(self, batch: int, ids: list[int]) -> torch.Tensor:
        spec, self._spec = self._spec, None
        if spec is not None and spec.batch == batch and spec.version == self._version and ids == self._expected:
            step = spec  # the step launched ahead, fed by the last step's greedy choices, is this one
            self.speculation_hits += 1
        else:
            if spec is not None and spec.batch == batch and spec.version == self._version:
                self._spec_pause = 32  # sampled tokens are not the argmax (non-greedy requests): stop guessing
            self._load_tokens(ids)
            step = self._launch(batch)
        self._len_dev[:batch] += 1
        for r in range(batch):
            self.lengths[r] += 1
        if self._spec_pause:
            self._spec_pause -= 1
        elif self.speculate:
            # Start the next step now, on this step's argmax, so the GPU works while the caller samples,
            # detokenizes and streams. If the caller picks other tokens or changes the rows, the next
            # call runs the step again; the guess only wrote keys past each row's length.
            self._spec = self._launch(batch)
        return self._finish(step)

    def _finish(self, step: _Step) -> torch.Tensor:
        if step.done is not None:
            # Wait with the GIL released (Event.synchronize drops it; .tolist() in the caller would
            # hold it), so the event loop streams the last step's tokens while the GPU works.
            step.done.synchronize()
        self._expected = step.argmax[: step.batch].tolist()
        return step.logits

    def _graph(self, batch: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        key = (batch, kv_len)
        found = self._graphs.get(key)
        if found is not None or len(self._graphs) >= MAX_GRAPHS:
            return found
        while True:
            try:
                self._graphs[key] = self._capture(batch, kv_len)
                return self._graphs[key]
            except Exception as exc:
                # A kernel or compiler problem must not take serving down: drop the newest
                # optimisation and capture again (the plain torch step is still correct).
                if self.triton_attention:
                    self.triton_attention = False
                    stage = "Triton attention"
                elif self.compiled:
                    self._set_step_fns(False)
                    stage = "torch.compile"
                else:
                    raise
                log.warning("decode graph capture failed (%s: %s); retrying without %s", type(exc).__name__, exc, stage)
                self._graphs.clear()

    def _capture(self, batch: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (compiles, cuBLAS handles), then capture. The warm-up's cache
        # writes land at each row's next free slot, which the next real token overwrites; its
        # argmax overwrites the step's input tokens, which are put back.
        tokens = self._tok_dev.clone()
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_body(batch, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._tok_dev.copy_(tokens)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._decode_body(batch, kv_len)
        return graph, out

    @torch.inference_mode()
    def warmup(self, max_kv_len: int | None = None, batch_sizes: Sequence[int] | None = None) -> int:
        """Capture decode graphs ahead of traffic (so the first requests do not pay for it).

        Captures every batch bucket up to `max_rows` for each key-length bucket up to
        `max_kv_len` (default: the whole context); returns how many graphs exist.
        """
        if not (self.fast and self.cuda_graphs):
            return 0
        self._lead("warmup", max_kv_len, batch_sizes)
        limit = min(max_kv_len or self._capacity, self._capacity)
        sizes = batch_sizes or [b for b in BATCH_BUCKETS if b <= self.max_rows] or [self.max_rows]
        kv = MIN_KV_BUCKET
        kv_lens = []
        while True:
            kv_lens.append(min(kv, self._capacity))
            if kv >= limit:
                break
            kv *= 2
        for kv_len in kv_lens:
            for b in sizes:
                self._graph(*self._buckets(b, kv_len))
        torch.cuda.synchronize(self.device)
        return len(self._graphs)


# -- tensor parallel: rank 0 leads, the other ranks follow ---------------------------------


def _broadcast(ctx: ParallelContext, message: Any) -> Any:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


def follow(model: Any, ctx: ParallelContext) -> None:
    """On ranks 1..N-1: build the runner rank 0 builds, then repeat its calls until it closes."""
    method, _, kwargs = _broadcast(ctx, None)
    if method != "__init__":
        raise RuntimeError(f"tensor-parallel follower expected the runner's construction, got {method!r}")
    runner = ModelRunner(model, parallel=ctx, **kwargs)
    while True:
        method, args, kwargs = _broadcast(ctx, None)
        if method == "__stop__":
            return
        if method == "__init__":  # rank 0 built a new runner (a server restart in-process)
            runner = ModelRunner(model, parallel=ctx, **kwargs)
            continue
        getattr(runner, method)(*args, **kwargs)


def _attn_linears(layer: Any) -> tuple[Any, ...]:
    a = layer.self_attn
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj)


def _mlp_linears(layer: Any) -> tuple[Any, ...]:
    m = layer.mlp
    return (m.gate_proj, m.up_proj, m.down_proj)


_DEFAULT_PARALLEL: ParallelContext | None = None


@contextlib.contextmanager
def parallel_context(ctx: ParallelContext | None) -> Any:
    """Runners built inside this block shard themselves over `ctx` (the server's TP hook)."""
    global _DEFAULT_PARALLEL
    previous, _DEFAULT_PARALLEL = _DEFAULT_PARALLEL, ctx
    try:
        yield
    finally:
        _DEFAULT_PARALLEL = previous
