"""The fused path: fused (and, under tensor parallel, sharded) weights, the prefill and decode step bodies.

Each layer's projections are fused into two matrices (q|k|v and gate|up), the KV cache is
allocated once at full length, and row lengths live on the device as well as on the host, so a
decode step reads only device buffers: graphs.py runs it per batch bucket, as a CUDA graph on
CUDA, and one step ahead for greedy callers. `torch.compile` fuses the small element-wise
kernels (norms, rotary, SiLU) inside the step, and a Triton kernel (serve/kernels.py) does its
attention. Prefill and verification are one packed pass (`_packed`): every new token a query at its
own position in its own row, no padding between rows, a CUDA graph per token bucket, and a block
attention kernel that reads a row's keys once for up to 16 (or 32) of its tokens; the eager prefill
(`_extend`) serves the rest (a tensor-parallel group, every-position logits, more than 1,024 tokens).
With a sharded `ParallelContext` each rank keeps its share of the heads and MLP
columns and the partial results are all-reduced. This is CUDA's path; `STRATUS_FAST_PATH=1`
runs the same arithmetic on the CPU, which is how the CPU tests cover it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from stratus_workers.serve import gemv, kernels
from stratus_workers.serve.parallel import ParallelContext
from stratus_workers.serve.runner import (
    Decoded,
    ModelRunner,
    UnsupportedModelError,
    check_rows,
    env_flag,
    env_int,
    new_token_slots,
    to_device,
)
from stratus_workers.serve.runner.cache import KVCache
from stratus_workers.serve.runner.graphs import GraphCache, StaticDecoder
from stratus_workers.serve.runner.modules import apply_rotary
from stratus_workers.serve.speculative import greedy_verdicts

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# A packed pass splits its attention's keys over several programs when some row reads more keys than this.
SPLIT_KEYS = 512
# Key slots a row has past max_len, which no live key uses (FusedRunner's cache: padding, and keys past a row's end).
SPARE_SLOTS = 2
# Token counts a packed pass (verification, prefill) is captured for (CUDA): 64 sessions' 8-token drafts are 576,
# their 16-token drafts (the router's largest max_draft_tokens) 1,088.
PACKED_BUCKETS = (
    8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 448, 512, 576, 640, 768, 896, 1024, 1088, 1152,
)


def fusable(model: Any) -> bool:
    """Whether every layer is plain Linear projections, a SiLU MLP and RMS norms with weights."""
    if getattr(model.config, "hidden_act", "silu") != "silu":
        return False
    for layer in model.model.layers:
        attn = layer.self_attn
        # Exact type: quantized or pruned subclasses keep their own forward and take the module path.
        if any(type(m) is not torch.nn.Linear for m in (*_attn_linears(layer), *_mlp_linears(layer))):
            return False
        if not hasattr(layer.input_layernorm, "weight") or getattr(attn, "q_norm", None) is not None:
            return False
    return True


def _attn_linears(layer: Any) -> tuple[Any, ...]:
    a = layer.self_attn
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj)


def _mlp_linears(layer: Any) -> tuple[Any, ...]:
    m = layer.mlp
    return (m.gate_proj, m.up_proj, m.down_proj)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The same arithmetic as LlamaRMSNorm: normalise in float32, scale in the model dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dataclass
class _LayerWeights:
    """One decoder layer's weights in fused (and, under tensor parallel, sharded) form."""

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
    return h, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


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


def _decode_out(
    h: torch.Tensor, norm_w: torch.Tensor, eps: float, w_head: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's end: final norm and head; float32 logits, the argmax and its log-probability."""
    logits = F.linear(_rms_norm(h, norm_w, eps), w_head).float()
    best = logits.argmax(dim=-1)
    return logits, best, logits.gather(1, best[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def _prefill_qkv_eager(n_q: int, n_kv: int, head_dim: int) -> Callable[..., Any]:
    def prefill_qkv(
        h: torch.Tensor, delta: torch.Tensor, norm_w: torch.Tensor, eps: float, w_qkv: torch.Tensor,
        b_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _qkv_rope(h, delta, norm_w, eps, w_qkv, b_qkv, cos, sin, n_q, n_kv, head_dim)

    return prefill_qkv


class FusedRunner(ModelRunner):
    """Fused weights and a static decode step; shards over `parallel` when it spans several ranks.

    `cuda_graphs` and `compile` default to on for CUDA (STRATUS_CUDA_GRAPHS / STRATUS_COMPILE /
    STRATUS_TRITON_ATTENTION=0 turn a stage off, for debugging and A/B timing); decode-ahead
    defaults to on with CUDA graphs (STRATUS_DECODE_AHEAD=0 or 1 overrides; 1 also runs it on the
    CPU, for the tests). A tensor-parallel group's runners are built by `build_runner`, which tells
    the other ranks to build theirs.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_rows: int,
        max_len: int,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        parallel: ParallelContext | None = None,
        pool_tokens: int = 0,
    ) -> None:
        super().__init__(model, max_rows=max_rows, max_len=max_len, parallel=parallel, pool_tokens=pool_tokens)
        if not fusable(model):
            raise UnsupportedModelError("the fast path needs plain Linear projections and a SiLU MLP")
        rank, world = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
        if self.num_heads % world or self.num_kv_heads % world:
            raise UnsupportedModelError(
                f"{self.num_heads} attention heads and {self.num_kv_heads} kv heads do not split over {world} ranks"
            )
        self.world_size = world
        self.local_heads = self.num_heads // world
        self.local_kv_heads = self.num_kv_heads // world
        self._lw = self._fuse_weights(rank, world)
        self._final_norm = self.model.model.norm.weight
        self._final_eps = float(getattr(self.model.model.norm, "variance_epsilon", 1e-6))
        self._embed = self.model.model.embed_tokens.weight
        self._lm_head = self.model.lm_head.weight
        # Spare slots past max_len (SPARE_SLOTS): padded rows of a bucketed decode write there, never over live keys,
        # and so do a row's keys past its end when it finishes by length on the decode step a mixed step takes (the
        # mixed pass's key, then the primed step's: core._mixed launches both before it knows the row is done).
        capacity = max_len + SPARE_SLOTS
        with torch.inference_mode():
            positions = torch.arange(capacity, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.model.model.rotary_emb(probe, positions)
            self._cos, self._sin = cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()
        on_cuda = self.device.type == "cuda"
        self.triton_attention = (
            on_cuda
            and kernels.supports(self.head_dim, self.local_heads, self.local_kv_heads)
            and env_flag("STRATUS_TRITON_ATTENTION", True)
        )
        self.cache = KVCache(
            layers=len(self.layers),
            rows=max_rows,
            kv_heads=self.local_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_len=max_len,
            capacity=capacity,
            device_lengths=True,
            pool_tokens=pool_tokens,
            # Rows that load a long cached prefix read it from one shared copy, and decode steps read that once for
            # all of them (kernels.SharedPrefix), where the Triton attention runs; STRATUS_CASCADE=0 turns that off.
            cascade=self.triton_attention and env_flag("STRATUS_CASCADE", True),
            kernel_copies=self.triton_attention and env_flag("STRATUS_KERNEL_COPIES", True),
        )
        # Each layer's view of the shared prefix (its tensors are allocated once, for good).
        self._shared_layers: list[kernels.SharedPrefix | None] = [None] * len(self._lw)
        cache = self.cache
        if cache.shared_keys is not None and cache.shared_values is not None:
            assert cache.shared_dev is not None and cache.shared_count is not None
            self._shared_layers = [
                kernels.SharedPrefix(k, v, cache.shared_dev, cache.shared_count)
                for k, v in zip(cache.shared_keys.unbind(0), cache.shared_values.unbind(0), strict=True)
            ]
        self._rows_dev = torch.arange(max_rows, device=self.device)
        with torch.inference_mode(False):  # written by every decode step, graphs included
            self.greedy_logprobs = torch.zeros(max_rows, dtype=torch.float32, device=self.device)
        self._kv_ar = torch.arange(capacity, device=self.device)
        want_graphs = env_flag("STRATUS_CUDA_GRAPHS", True) if cuda_graphs is None else cuda_graphs
        self.cuda_graphs = bool(on_cuda and want_graphs)
        self.compiled = bool(on_cuda and env_flag("STRATUS_COMPILE", True) if compile is None else compile)
        # Decode steps of a few rows as the fused small-batch layer (serve/gemv.py: 5 kernels a layer, not 12)
        # where the Triton attention runs; STRATUS_GEMV_LAYER=0 turns it off. `gemv_batches`: the batch sizes whose
        # steps ran it (a graph's at its capture).
        self.gemv_layer = self.triton_attention and self.gemv_refusal() is None and env_flag("STRATUS_GEMV_LAYER", True)
        # Its kernels take up to gemv.MAX_BATCH rows, but only one row was measured on a GPU (an H200: the ~1B
        # decode step 1,049 against 1,062 µs, 135M 856 against 906); a run with the layer up to 8 rows saw ~1B
        # cloud-only decoding at 8 streams fall to 728 tokens/s (6,503 the stop before), unexplained. So one row by
        # default; STRATUS_GEMV_MAX_BATCH widens it.
        self.gemv_max_batch = env_int("STRATUS_GEMV_MAX_BATCH", 1, 1, gemv.MAX_BATCH)
        self.gemv_batches: set[int] = set()
        self._set_step_fns(self.compiled)
        # Running one step ahead pays on the GPU, where the step is asynchronous; a tensor-parallel
        # group would have to agree on every guess, so it decodes one step at a time.
        ahead = env_flag("STRATUS_DECODE_AHEAD", self.cuda_graphs) and world == 1
        self.decoder = StaticDecoder(self, cuda_graphs=self.cuda_graphs, decode_ahead=ahead)
        # A prefill of rows the step launched ahead does not hold on a stream of its own beside that step, not
        # queued behind it (`prefill_beside`): opt-in (STRATUS_PREFILL_BESIDE=1). On an H200 at 64 streams it cut
        # the TTFT p50 of uncached 3,000-token prompts 18% (135M: 33.5 against 41.1 ms), but cached turns gained
        # nothing (135M 7.3-9.1 against 7.6-8.1 ms; the ~1B 17.1 against 10.4-14.3, its prefill steps 7.9 ms) and
        # tokens/s went both ways (docs/serving.md, "Prefill beside the decode step").
        self._beside: Any = (
            torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            if ahead and on_cuda and env_flag("STRATUS_PREFILL_BESIDE", False)
            else None
        )
        if self._beside is not None:
            self.decoder.before_ahead = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._beside_main: Any = None  # the stream work after a prefill beside waits on, while one is queued
        self.packed_verify = True  # off for good after a packed verification failed to run (forward_rows)
        # Packed passes (verification; prefill too, with `packed_prefill`) as CUDA graphs per token bucket; a
        # failed capture is not retried with less (the caller falls back to the padded pass for good).
        self._packed_graphs = GraphCache(self.device, lambda: None)
        # Tokens per attention block: the default's, the most blocks a pass can make (a pass may take larger ones).
        self._extend_block = kernels.extend_block(self.local_heads, self.local_kv_heads)
        self.packed_replays = 0  # packed passes that ran as a captured graph
        self._packed_prefill_replays = 0
        largest = PACKED_BUCKETS[-1]
        with torch.inference_mode(False):  # a graph's inputs, refilled before each replay
            self._packed_inputs = torch.zeros(
                3 * largest + 2 * kernels.max_extend_blocks(largest, max_rows, self._extend_block),
                dtype=torch.long,
                device=self.device,
            )
        # The verdict graphs' inputs (`forward_rows_greedy`): the scored hidden states, then each position's draft
        # token and row; their graphs in a pool of their own.
        self._verdict_graphs = GraphCache(self.device, lambda: None)
        self.verdict_graphs = True  # off for good after a verdict graph failed to capture or run
        with torch.inference_mode(False):
            hidden = int(self.config.hidden_size)
            self._verdict_hidden = torch.zeros(largest, hidden, dtype=self.dtype, device=self.device)
            self._verdict_plan = torch.zeros(2 * largest, dtype=torch.long, device=self.device)
        # The engine may hand joining rows' first tokens over on the device (see ModelRunner.decode).
        self.device_join = ahead
        # Prefill as a packed pass (the verification's: a graph per token bucket, the block attention kernel) where
        # that kernel runs, else eagerly; STRATUS_PACKED_PREFILL=0 or 1 overrides (1 runs it on the CPU, with
        # torch's attention).
        self.packed_prefill = env_flag("STRATUS_PACKED_PREFILL", self.triton_attention) and world == 1
        # A step's decode rows and prefill chunks as one packed pass (`forward_mixed`): on by default where the packed
        # prefill runs on CUDA (one device); STRATUS_MIXED_STEP=0 turns it off, =1 on elsewhere too (the CPU, with
        # torch's attention). On an H200 at 64 streams the ~1B made 33,333 tokens/s mixed against 27,823 unmixed,
        # TTFT p95 2.5x one stream's p50 (docs/serving.md, "Mixed steps").
        mixed_default = self.packed_prefill and self.device.type == "cuda"
        self.mixed_step = env_flag("STRATUS_MIXED_STEP", mixed_default) and world == 1
        self.mixed_steps = 0  # mixed passes run
        self.mixed_replays = 0  # of those, as a captured packed graph

    def _fuse_weights(self, rank: int, world: int) -> list[_LayerWeights]:
        d = self.head_dim

        def shard_rows(w: torch.Tensor, per_rank: int) -> torch.Tensor:
            return w[rank * per_rank : (rank + 1) * per_rank]

        fused: list[_LayerWeights] = []
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
            fused.append(
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
        return fused

    def gemv_refusal(self) -> str | None:
        """Why the fused small-batch layer cannot run this model here, or None if it can."""
        if self.world_size > 1:
            return "tensor parallel (its all-reduces sit between the layer's kernels)"
        if any(b is not None for lw in self._lw for b in (lw.o_bias, lw.gate_up_bias, lw.down_bias)):
            return "biases past q|k|v's"
        if not gemv.supports(self.head_dim, self.local_heads, self.local_kv_heads):
            return f"no Triton, or heads of {self.head_dim} (a power of two of at least 16 is needed)"
        return None

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

        def prefill_qkv(
            h: torch.Tensor, delta: torch.Tensor, norm_w: torch.Tensor, eps: float, w_qkv: torch.Tensor,
            b_qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            return _qkv_rope(h, delta, norm_w, eps, w_qkv, b_qkv, cos, sin, n_q, n_kv, d)

        # The prefill's element-wise work too: an eager prefill of a small model is a thousand kernel
        # launches, which at 64 streams (one admission every other step) costs more than the decoding.
        # And the decode step's end: the final norm, head, argmax and its log-probability (a dozen small
        # kernels eagerly, a few compiled, in every step's graph).
        fns: list[Callable[..., Any]] = [attention_block, mlp_block, store_block, prefill_qkv, _mlp_in, _decode_out]
        self.compiled = compiled
        if compiled:
            # Automatic dynamic shapes, not dynamic=True: a size that changes between calls (tokens, rows, keys)
            # becomes symbolic, the model's own (hidden, heads, the weights') stay constants. With every size
            # symbolic the element-wise kernels ran at a third of the memory's speed: on an H200 a ~1B packed pass
            # of 544 tokens spent 0.83 ms in them against 0.28 (tests/bench/gpu_layer_parts.py).
            fns = [torch.compile(fn, dynamic=None, fullgraph=True) for fn in fns]
        self._attn_fn, self._mlp_fn, self._store_fn, self._prefill_qkv, self._prefill_mlp, self._decode_out = fns

    @property
    def prefill_replays(self) -> int:
        """Prefills that ran as a captured graph."""
        return self._packed_prefill_replays

    def degrade(self) -> str | None:
        """Drop the newest optimisation of the decode step after a failed capture; its name, or None if none is left.

        A kernel or compiler problem must not take serving down: the plain torch step is still correct.
        """
        if self.gemv_layer:
            self.gemv_layer = False
            self.gemv_batches.clear()  # the graphs that ran it are dropped with it
            return "the fused GEMV layer"
        if self.triton_attention:
            self.triton_attention = False
            self.cache.kernel_copies = False  # (Triton itself may be what failed)
            self.cache.stop_sharing()  # torch's attention reads only the rows
            return "Triton attention"
        if self.compiled:
            self._set_step_fns(False)
            return "torch.compile"
        return None

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(x) if self.parallel is not None else x

    def _forward(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
        logits_from: int = 0,
    ) -> torch.Tensor:
        if max(q_lens) == 1 and first_row == 0:  # a decode step of the batch's rows (logits_from is 0)
            logits = self.decoder.step(len(tokens), [t[0] for t in tokens]).logits
            return logits[:, None] if all_logits else logits
        out = self._extend(first_row, tokens, starts, q_lens, all_logits, logits_from)
        if self._beside_main is not None:  # made on the side stream, read on the main one: not reused before that
            out.record_stream(self._beside_main)
        return out

    def _decode(
        self,
        ids: list[int],
        logprobs: bool,
        join: Sequence[int] | torch.Tensor,
        hold: bool = False,
        then: Callable[[], None] | None = None,
    ) -> Decoded:
        return self.decoder.step(len(ids), ids, logprobs=logprobs, join=join, hold=hold, then=then)

    @torch.inference_mode()
    def forward_rows(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int]
    ) -> torch.Tensor:
        """`ModelRunner.forward_rows` with the tokens packed: no padding, no row in between, and no mask.

        Every new token is a query of its own at its position in its row; each layer writes all the new
        keys first, so one pass of the decode step's attention (the Triton kernel on CUDA, which reads
        each query's row from `rows`) is causal within the new tokens as well. Under tensor parallel, or
        without the kernel on CUDA (STRATUS_VERIFY_PACKED=0 too), the padded pass of the base class.
        """
        logits = self._packed_verify(rows, tokens, logits_from, self._scored_head)
        return super().forward_rows(rows, tokens, logits_from) if logits is None else logits

    def _packs_verify(self) -> bool:
        """Whether verification runs as the packed pass: not after one failed, nor under tensor parallel, nor on CUDA
        without the attention kernel (STRATUS_VERIFY_PACKED=0 turns it off)."""
        packed = self.packed_verify and env_flag("STRATUS_VERIFY_PACKED", True) and self.world_size == 1
        return packed and (self.device.type != "cuda" or self.triton_attention)

    def _packed_verify(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int],
        then: Callable[[torch.Tensor, torch.Tensor], _T], scored: int | None = None,
    ) -> _T | None:
        """The packed verification pass and `then(hidden, scored indices)` over it, counted as a pass; None where the
        packed pass does not run, or failed (a kernel that cannot run here: the padded pass verifies from now on, and
        is as correct). Bad rows raise ValueError, as does a `scored` count the rows do not score."""
        if not self._packs_verify():
            return None
        try:
            check_rows(rows, tokens, logits_from, self.max_rows)
            if scored is not None and sum(len(t) - f for t, f in zip(tokens, logits_from, strict=True)) != scored:
                raise ValueError(f"the verdicts' plan covers {scored} positions; the rows score a different count")
            out = then(*self._packed_hidden(rows, tokens, logits_from))
        except ValueError:
            raise
        except Exception as exc:
            log.warning("packed verification failed (%s: %s); verifying padded", type(exc).__name__, exc)
            self.packed_verify = False
            return None
        self.passes += 1
        self.positions += sum(len(t) for t in tokens)
        return out

    @torch.inference_mode()
    def forward_rows_greedy(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int], plan: np.ndarray
    ) -> tuple[torch.Tensor, int] | None:
        """`ModelRunner.forward_rows_greedy`: the packed pass, then the head and the greedy verdicts together, on CUDA
        as one graph per bucket of scored positions (`PACKED_BUCKETS`) behind the pass's: two dozen small kernels
        launched by the host per Verify group become one replay, and the head's matrix product sees a few shapes, not
        one per group size (on an H200 a new size cost the eager head 5-6 ms of host time, most likely cuBLAS's
        planning). None where the packed pass does not run (the caller then takes `forward_rows` and
        `greedy_verdicts`). A verdict graph that fails to capture or run turns them off for good; the group's verdicts
        are then computed eagerly from the same pass."""
        size = plan.shape[1]
        found = self._packed_verify(rows, tokens, logits_from, lambda hidden, scored: (hidden, scored), size)
        if found is None:
            return None
        hidden, scored = found
        verdict_rows = self.max_rows + 1  # the last one collects the bucket's padding positions
        with self.mark("verdicts"):
            bucket = self._verdict_bucket(size)
            if bucket:
                try:
                    return self._verdicts_graphed(hidden, scored, plan, bucket), verdict_rows
                except Exception as exc:  # the pass's hidden states are intact: judge them eagerly, from now on too
                    log.warning("verdict graphs failed (%s: %s); verdicts run eagerly", type(exc).__name__, exc)
                    self.verdict_graphs = False
            inputs = to_device(plan.reshape(-1), self.device)  # eagerly, exactly `size` positions
            return self._verdicts(hidden[scored], inputs[:size], inputs[size:], verdict_rows), verdict_rows

    def _verdicts_graphed(
        self, hidden: torch.Tensor, scored: torch.Tensor, plan: np.ndarray, bucket: int
    ) -> torch.Tensor:
        """The verdict graph of `bucket` positions replayed over `hidden[scored]` and `plan`, padded to the bucket (the
        padding in the spare verdict row); its static output, which the caller copies before another replay."""
        size = plan.shape[1]
        padded = np.empty((2, bucket), dtype=np.int64)
        padded[:, :size] = plan
        padded[0, size:] = -1
        padded[1, size:] = self.max_rows
        torch.index_select(hidden, 0, scored, out=self._verdict_hidden[:size])
        self._verdict_plan[: 2 * bucket].copy_(to_device(padded.reshape(-1), self.device))
        found = self._verdict_graphs.get(bucket, functools.partial(self._verdict_body, bucket))
        if found is None:
            raise RuntimeError(f"no room for another verdict graph ({len(self._verdict_graphs)} captured)")
        graph, out = found
        graph.replay()
        return out

    def _verdict_bucket(self, size: int) -> int:
        """The scored positions a verdict graph of `size` positions computes (the packed pass's buckets), or 0:
        eagerly."""
        return self._packed_bucket(size) if self.verdict_graphs else 0

    def _verdict_body(self, bucket: int) -> torch.Tensor:
        """What a verdict graph of `bucket` positions captures, over its static inputs."""
        plan = self._verdict_plan[: 2 * bucket]
        return self._verdicts(self._verdict_hidden[:bucket], plan[:bucket], plan[bucket:], self.max_rows + 1)

    def _verdicts(self, h: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor, rows: int) -> torch.Tensor:
        """The head over the scored hidden states `h`, then `greedy_verdicts`: [stops (rows), tokens (rows),
        log-probabilities (one a position)] as float64, one tensor for one copy to the host."""
        stop, token, logprobs = greedy_verdicts(self.head(h), targets, segments, rows)
        return torch.cat([stop.double(), token.double(), logprobs.double()])

    @torch.inference_mode()
    def forward_mixed(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], from_decode: int = 0
    ) -> torch.Tensor:
        """`ModelRunner.forward_mixed` as one packed pass: a decoding row's token is a query like a prompt's, so the
        weights are read once for the decode rows and the prefill chunks together (a CUDA graph per token bucket).
        `from_decode` tokens come from the decode step's input buffer, which holds the greedy choices of the step
        queued last. A pass that fails to run turns mixing off for good (`mixed_step`, which the engine reads to
        count mixed steps) and runs the rows apart: the base class's, `forward_rows` (the packed verification pass
        where that is on, else the padded one)."""
        logits_from = [len(t) - 1 for t in tokens]
        if from_decode and list(rows[:from_decode]) != list(range(from_decode)):
            raise ValueError(f"the decode step's choices are rows 0..{from_decode - 1}, the first rows of the pass")
        if not self.mixed_step:
            return self._mixed_apart(rows, tokens, from_decode)
        check_rows(rows, tokens, logits_from, self.max_rows)
        starts = [self.cache.lengths[r] for r in rows]
        replays = self.packed_replays
        device_ids = self.decoder.tokens[:from_decode] if from_decode else None
        try:
            logits = self._packed(rows, tokens, logits_from, prefill=True, device_ids=device_ids)
        except ValueError:
            raise
        except Exception as exc:  # a kernel or capture that failed: forward_rows computes the same
            log.warning(
                "mixed pass failed (%s: %s); running its rows through forward_rows (packed verification pass, else "
                "padded), unmixed from now on", type(exc).__name__, exc,
            )
            self.mixed_step = False
            for row, length in zip(rows, starts, strict=True):
                self.cache.set_length(row, length)
            return self._mixed_apart(rows, tokens, from_decode)
        self.mixed_steps += 1
        self.mixed_replays += self.packed_replays - replays
        self.passes += 1
        self.positions += sum(len(t) for t in tokens)
        return logits

    def _mixed_apart(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], from_decode: int) -> torch.Tensor:
        if from_decode:  # the padded pass takes host tokens: wait for the decode step's
            chosen = self.decoder.tokens[:from_decode].tolist()
            tokens = [[t] for t in chosen] + list(tokens[from_decode:])
        return super().forward_mixed(rows, tokens)

    def ahead_in_flight(self) -> bool:
        return self.decoder.in_flight

    @contextlib.contextmanager
    def prefill_beside(self, rows: Sequence[int], slots: Sequence[int]) -> Iterator[bool]:
        # Beside the step launched ahead: on the side stream, after all that was queued before that step
        # (`before_ahead`); only for rows the step does not compute and nothing queued since touched, reading pool
        # blocks nothing wrote since (KVCache.untouched). The main stream then waits for the side one, so the next
        # decode step (the joining rows' first) and every copy after it see the prefill.
        side = self._beside
        if side is None or not self.decoder.in_flight or not self.cache.untouched(rows, slots):
            yield False
            return
        main = torch.cuda.current_stream(self.device)
        side.wait_event(self.decoder.before_ahead)
        self._beside_main = main
        try:
            with torch.cuda.stream(side):
                yield True
        finally:
            self._beside_main = None
            main.wait_stream(side)

    @torch.inference_mode()
    def prime_decode(self, ids: Sequence[int] | torch.Tensor) -> None:
        self.decoder.prime(ids if isinstance(ids, torch.Tensor) else list(ids))

    def primed_tokens(self) -> list[int] | None:
        return self.decoder.primed_tokens()

    def _packed(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int], prefill: bool = False,
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One packed pass: `tokens[i]` appended to row `rows[i]`, the logits of those from `logits_from[i]` on
        (`device_ids`: the first tokens' ids, still being computed on the device; the mixed pass's)."""
        return self._scored_head(*self._packed_hidden(rows, tokens, logits_from, prefill, device_ids))

    def _scored_head(self, hidden: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """The head's logits of the scored positions of a packed pass's hidden states."""
        with self.mark("head"):
            return self.head(hidden[scored])

    def _packed_hidden(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int], prefill: bool = False,
        device_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_packed`'s pass without the head: the last hidden states and the indices of the scored ones in them."""
        with self.mark("plan"):
            return self._packed_plan(rows, tokens, logits_from, prefill, device_ids)

    def _packed_plan(
        self, rows: Sequence[int], tokens: Sequence[Sequence[int]], logits_from: Sequence[int], prefill: bool = False,
        device_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Per row (numpy, no Python loop over tokens): its row, tokens held, new tokens, first scored.
        n = len(rows)
        lengths = self.cache.lengths
        rows_a = np.array(rows, dtype=np.int64)
        starts = np.fromiter(map(lengths.__getitem__, rows), dtype=np.int64, count=n)
        lens = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
        ends = starts + lens
        kv_len = int(ends.max())
        self.cache.grow(kv_len)
        firsts = np.cumsum(lens) - lens  # each row's first token in the pack
        total = int(firsts[-1] + lens[-1])
        segment = np.repeat(np.arange(n, dtype=np.int64), lens)  # each token's row, 0..n-1
        index = np.arange(total, dtype=np.int64) - firsts[segment]  # within its row
        scored = np.flatnonzero(index >= np.array(logits_from, dtype=np.int64)[segment])
        bucket = self._packed_bucket(total)
        # A graph's bucket is filled with padding tokens past the rows' new ends, the roomiest rows first: slots no
        # key is read from until a real token overwrites them. (A mixed pass's row that finishes may end in the
        # cache's spare slots, with no room left.) Where they would not fit, eagerly.
        pad = bucket - total if bucket else 0
        pad_rows = pad_pos = np.zeros(0, dtype=np.int64)
        if pad:
            room = self.cache.capacity - ends
            counts = np.zeros(n, dtype=np.int64)
            left = pad
            for i in np.argsort(-room, kind="stable"):
                counts[i] = min(int(room[i]), left)
                left -= int(counts[i])
                if not left:
                    break
            if left:
                bucket = pad = 0
            else:
                pad_at = np.repeat(np.arange(n, dtype=np.int64), counts)
                pad_rows = rows_a[pad_at]
                pad_pos = ends[pad_at] + np.arange(pad, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        size = bucket or total
        # Token ids, each token's row and position.
        plan = np.zeros((3, size), dtype=np.int64)
        plan[0, :total] = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int64, count=total)
        plan[1, :total] = rows_a[segment]
        plan[2, :total] = starts[segment] + index
        if pad:
            plan[1, total:] = pad_rows
            plan[2, total:] = pad_pos
        # The attention kernel's blocks: each row's new tokens (padding is in none), padded to the graph's count.
        block = kernels.extend_block(self.local_heads, self.local_kv_heads, int(lens.max()))
        n_blocks = kernels.max_extend_blocks(bucket, self.max_rows, block) if bucket else 0
        blocks = kernels.extend_blocks(firsts, lens, block, n_blocks)
        n_blocks = blocks.shape[1]
        # Key splits only where a few tokens read many keys (a turn after a long cached prefix): on an H200 they
        # cut such a prefill step of 64 streams from 4.9 to 4.2 ms, but made 64-token prompts' steps slower
        # (2.3 to 2.9 ms), whose few keys keep no extra programs busy.
        splits = self._splits(size, kv_len, block)
        flat = to_device(np.concatenate([plan.reshape(-1), blocks.reshape(-1), scored]), self.device)
        if device_ids is not None:
            flat[: device_ids.numel()].copy_(device_ids)
        scored_d = flat[3 * size + 2 * n_blocks :]
        with self.mark("pass"):
            if bucket and self.cuda_graphs:
                graph, hidden = self._packed_graph(bucket, flat[: 3 * size + 2 * n_blocks], splits, block)
                graph.replay()
                self.packed_replays += 1
                self._packed_prefill_replays += prefill
            else:
                ids, rows_d, pos = flat[: 3 * size].view(3, size)
                blocks_d = flat[3 * size : 3 * size + 2 * n_blocks].view(2, n_blocks)
                hidden = self._packed_body(ids, rows_d, pos, blocks_d, kv_len + pad, splits, block)
        self.cache.set_row_lengths(list(rows), ends.tolist())
        return hidden, scored_d

    def _splits(self, tokens: int, keys: int, block: int) -> int:
        """Key splits of a packed pass of `tokens` tokens in attention blocks of `block`, whose longest row reads
        `keys` keys."""
        if not self.triton_attention or keys <= SPLIT_KEYS:
            return 1
        return kernels.extend_splits(tokens, self.local_heads, self.local_kv_heads, block)

    def _packed_body(
        self, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, blocks: torch.Tensor, kv_len: int,
        splits: int = 1, block: int = 0,
    ) -> torch.Tensor:
        """The packed pass over device buffers (what a packed graph captures): every token a query at `pos` in row
        `rows` (`blocks`: its attention's block table, in blocks of `block` tokens, 0: the default); returns the last
        hidden states [T, hidden] (the caller scores the ones it needs)."""
        h = F.embedding(ids, self._embed)
        cos, sin = self._cos[pos], self._sin[pos]
        bias = None
        if not self.triton_attention:  # the CPU's torch attention: each query against its row's keys up to its own
            bias = torch.where(self._kv_ar[:kv_len][None, :] <= pos[:, None], 0.0, -1e30)
        shared = self._shared_prefix()
        delta = torch.zeros_like(h)
        for lw, k_cache, v_cache, prefix in zip(self._lw, self.cache.keys, self.cache.values, shared, strict=True):
            h, q = self._store_fn(
                h, delta, lw.in_norm, lw.eps, lw.qkv, lw.qkv_bias, cos, sin, k_cache, v_cache, rows, pos
            )
            if bias is None:
                out = kernels.extend_attention(
                    q, k_cache, v_cache, pos, rows, blocks, self.scale, splits, block, shared=prefix
                )
            else:
                out = _decode_attention(q, k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len], bias, self.scale)
            h, delta = self._mlp_fn(
                h, F.linear(out, lw.o), lw.o_bias, lw.post_norm, lw.eps, lw.gate_up, lw.gate_up_bias, lw.down
            )
            if lw.down_bias is not None:
                delta = delta + lw.down_bias
        return h + delta

    def _packed_bucket(self, total: int) -> int:
        """The token count of the verification graph that runs `total` tokens, or 0: eagerly (no CUDA graphs,
        or more tokens than the largest bucket)."""
        if not (self.cuda_graphs and self.triton_attention and env_flag("STRATUS_VERIFY_GRAPHS", True)):
            return 0
        return next((b for b in PACKED_BUCKETS if b >= total), 0)

    def _packed_graph(
        self, bucket: int, plan: torch.Tensor, splits: int = 1, block: int = 0
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The packed graph of `bucket` tokens whose attention splits keys `splits` ways in blocks of `block` tokens
        (0: the default), its inputs now `plan` (ids, rows, positions [3 * bucket], then the attention's block
        table [2 * blocks])."""
        block = block or self._extend_block
        self._packed_inputs[: plan.numel()].copy_(plan)
        size, n_blocks = bucket, (plan.numel() - 3 * bucket) // 2
        ids, rows, pos = self._packed_inputs[: 3 * size].view(3, size)
        blocks = self._packed_inputs[3 * size : 3 * size + 2 * n_blocks].view(2, n_blocks)
        # As a decode graph (the warm-up runs write the same keys and values the replay then writes again).
        found = self._packed_graphs.get(
            (bucket, splits, block),
            lambda: self._packed_body(ids, rows, pos, blocks, self.cache.capacity, splits, block),
        )
        if found is None:
            raise RuntimeError(f"no room for another packed graph ({len(self._packed_graphs)} captured)")
        return found

    def _extend(
        self,
        first_row: int,
        tokens: Sequence[Sequence[int]],
        starts: list[int],
        q_lens: list[int],
        all_logits: bool,
        logits_from: int = 0,
    ) -> torch.Tensor:
        """Prefill, extend or verify (any number of new tokens per row) with the fused weights."""
        if self.packed_prefill and self.packed_verify and not all_logits:
            try:
                rows = range(first_row, first_row + len(tokens))
                return self._packed(rows, tokens, [q - 1 for q in q_lens], prefill=True)
            except Exception as exc:  # a kernel or capture that failed: the eager prefill below computes the same
                log.warning("packed prefill failed (%s: %s); prefilling eagerly", type(exc).__name__, exc)
                self.packed_prefill = False
        h = self.embed(self.padded_ids(tokens))
        h = self.extend_hidden(first_row, h, starts, q_lens)
        h = h[:, logits_from:] if all_logits else self.last_tokens(h, q_lens)
        return self.head(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._embed)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(h, self._final_norm, self._final_eps), self._lm_head).float()

    def extend_hidden(self, first_row: int, h: torch.Tensor, starts: list[int], q_lens: list[int]) -> torch.Tensor:
        batch, q_max = h.shape[0], h.shape[1]
        dev = self.device
        self.cache.fill(range(first_row, first_row + batch))  # torch's attention reads only the rows
        ends = [s + q for s, q in zip(starts, q_lens, strict=True)]
        k_len = max(ends)
        start_t = to_device(starts, dev)
        positions = start_t[:, None] + torch.arange(q_max, device=dev)[None, :]  # [B, Q]
        mask = torch.arange(k_len, device=dev)[None, None, None, :] <= positions[:, None, :, None]
        slots = new_token_slots(first_row, starts, q_lens, dev)
        # Padded queries may sit past the rotary table; their results are never used.
        table = positions if slots is None else positions.clamp(max=self._cos.shape[0] - 1)
        cos, sin = self._cos[table], self._sin[table]
        write_rows = torch.arange(first_row, first_row + batch, device=dev)[:, None].expand(batch, q_max)
        row_sl = slice(first_row, first_row + batch)
        delta = torch.zeros_like(h)
        for lw, k_cache, v_cache in zip(self._lw, self.cache.keys, self.cache.values, strict=True):
            h, q, k, v = self._prefill_qkv(h, delta, lw.in_norm, lw.eps, lw.qkv, lw.qkv_bias, cos, sin)
            if slots is None:
                k_cache[write_rows, :, positions] = k
                v_cache[write_rows, :, positions] = v
            else:
                b, q_idx, rows, pos = slots
                k_cache[rows, :, pos] = k[b, q_idx]
                v_cache[rows, :, pos] = v[b, q_idx]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k_cache[row_sl, :, :k_len],
                v_cache[row_sl, :, :k_len],
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.local_kv_heads != self.local_heads,
            )
            out = self._all_reduce(F.linear(out.transpose(1, 2).flatten(2), lw.o))
            h, act = self._prefill_mlp(h, out, lw.o_bias, lw.post_norm, lw.eps, lw.gate_up, lw.gate_up_bias)
            delta = self._all_reduce(F.linear(act, lw.down))
            if lw.down_bias is not None:
                delta = delta + lw.down_bias
        self.cache.set_lengths(first_row, ends)
        return h + delta

    def decode_body(self, tokens: torch.Tensor, batch: int, kv_len: int, cascade: bool = False) -> torch.Tensor:
        """One decode step of rows 0..batch-1 reading only device buffers (what a graph captures).

        Feeds `tokens[:batch]` at each row's length and leaves the step's argmax in `tokens[:batch]`
        (the next step's input, if the caller is greedy) and its log-probability in `greedy_logprobs`.
        `cascade`: the rows' shared prefix is read once for all of them (KVCache.share).
        """
        h = self.decode_rows(F.embedding(tokens[:batch], self._embed), 0, kv_len, cascade)
        logits: torch.Tensor
        logits, best, picked = self._decode_out(h, self._final_norm, self._final_eps, self._lm_head)
        tokens[:batch].copy_(best)
        # The greedy choice's log-probability, so a caller asking for it need not wait on the logits.
        self.greedy_logprobs[:batch].copy_(picked)
        return logits

    def decode_rows(self, h: torch.Tensor, first_row: int, kv_len: int, cascade: bool = False) -> torch.Tensor:
        """This runner's decoder layers over one new token of rows first_row.. (h [B, hidden], each row at its
        length in `cache.lengths_dev`), reading only device buffers; the residual out. The decode step runs
        it over rows 0..B-1, a pipeline stage over each micro-batch of rows (serve/pipeline.py). `cascade` (rows
        from 0, the Triton attention): each row reads its shared prefix's keys from the one copy all rows read."""
        cascade = cascade and self.cache.cascade and self.triton_attention and not first_row
        shared: list[kernels.SharedPrefix | None] = self._shared_prefix() if cascade else [None] * len(self._lw)
        lengths = self.cache.lengths_dev
        assert lengths is not None  # the fused path's cache keeps its lengths on the device
        batch = h.shape[0]
        pos, rows, local = lengths[:batch], self._rows_dev[:batch], self._rows_dev[:batch]
        if first_row:
            # Tensors of their own, not views at an offset: the compiled step functions see the same kinds of
            # inputs whichever rows they run (cache rows by absolute index; attention reads a view from first_row).
            pos, rows = lengths[first_row : first_row + batch].clone(), local + first_row
        # A graph of rows reading more than DECODE_SPLIT_KEYS keys (graphs.py picks kv_len) splits them.
        splits = kernels.decode_splits(batch, self.local_kv_heads) if kv_len > kernels.DECODE_SPLIT_KEYS else 1
        if cascade:
            splits = 1  # the rows' own keys past the prefix are few; the prefix kernel spreads the prefix's
        if self.gemv_layer and self.triton_attention and batch <= self.gemv_max_batch:
            return self._gemv_layers(h, first_row, pos, rows, splits, shared)
        cos, sin = self._cos[pos], self._sin[pos]
        # Row b sees keys 0..pos[b] (its cache plus the key written this step).
        bias = None if self.triton_attention else torch.where(self._kv_ar[:kv_len][None, :] <= pos[:, None], 0.0, -1e30)
        delta = torch.zeros_like(h)
        for lw, k_cache, v_cache, prefix in zip(self._lw, self.cache.keys, self.cache.values, shared, strict=True):
            k_rows, v_rows = (k_cache[first_row:], v_cache[first_row:]) if first_row else (k_cache, v_cache)
            if self.triton_attention:
                h, q = self._store_fn(
                    h, delta, lw.in_norm, lw.eps, lw.qkv, lw.qkv_bias, cos, sin, k_cache, v_cache, rows, pos
                )
                attn = kernels.decode_attention(q, k_rows, v_rows, pos, self.scale, splits=splits, shared=prefix)
                out = F.linear(attn, lw.o)
            else:
                h, out = self._attn_fn(
                    h, delta, lw.in_norm, lw.eps, lw.qkv, lw.qkv_bias, cos, sin, k_rows, v_rows, local, pos, bias,
                    lw.o,
                )
            h, delta = self._mlp_fn(
                h, self._all_reduce(out), lw.o_bias, lw.post_norm, lw.eps, lw.gate_up, lw.gate_up_bias, lw.down
            )
            delta = self._all_reduce(delta)
            if lw.down_bias is not None:
                delta = delta + lw.down_bias
        return h + delta

    def _shared_prefix(self) -> list[kernels.SharedPrefix | None]:
        """Each layer's shared prefix for the attention to read rows' first keys from (runner/cache.py: rows that
        loaded it do not hold it), or None where the cache keeps none (any more)."""
        return self._shared_layers if self.cache.cascade else [None] * len(self._lw)

    def _gemv_layers(
        self, h: torch.Tensor, first_row: int, pos: torch.Tensor, rows: torch.Tensor, splits: int,
        shared: list[kernels.SharedPrefix | None],
    ) -> torch.Tensor:
        """decode_rows' layers as the fused small-batch layer: norm + q|k|v + rotary + cache write, attention (its
        keys in `splits`, or a shared prefix's), o, norm + gate|up + SiLU * up, down (serve/gemv.py); the compiled
        step's arithmetic."""
        delta: torch.Tensor | None = None  # the first layer's residual has nothing to add
        for lw, k_cache, v_cache, prefix in zip(self._lw, self.cache.keys, self.cache.values, shared, strict=True):
            k_rows, v_rows = (k_cache[first_row:], v_cache[first_row:]) if first_row else (k_cache, v_cache)
            h, q = gemv.norm_qkv_rope(
                h, delta, lw.in_norm, lw.eps, lw.qkv, lw.qkv_bias, self._cos, self._sin, pos, rows, k_cache, v_cache,
                self.local_heads,
            )  # fmt: skip
            attn = gemv.gemv(
                kernels.decode_attention(q, k_rows, v_rows, pos, self.scale, splits=splits, shared=prefix), lw.o
            )
            h, act = gemv.norm_gate_up(h, attn, lw.post_norm, lw.eps, lw.gate_up)
            delta = gemv.gemv(act, lw.down)
        self.gemv_batches.add(h.shape[0])
        return h if delta is None else h + delta

    def _warmup(self, max_kv_len: int | None, batch_sizes: Sequence[int] | None) -> int:
        self.cache.warm_copies()
        graphs = self.decoder.warmup(max_kv_len, batch_sizes)
        if self.compiled:
            self._warm_prefill()
        return graphs + self._warm_packed()

    def _warm_packed(self) -> int:
        """Capture the packed graphs now, as the decode graphs are, so that no prefill or Verify round pays
        for a capture (the key-split ones only where a row can read enough keys). Every row is empty at
        warm-up: the captures write at position 0, which real tokens overwrite. A failure leaves them to be
        captured on first use."""
        if not (self._packs_verify() and self._packed_bucket(1)):  # (no bucket: no graphs, or not the kernel)
            return 0
        if any(self.cache.lengths):
            return 0
        try:
            heads = self.local_heads, self.local_kv_heads
            for bucket in PACKED_BUCKETS:
                for block in kernels.extend_block_sizes(*heads, bucket):
                    # No blocks: the attention kernel does nothing (it is compiled all the same).
                    blocks = kernels.max_extend_blocks(bucket, self.max_rows, block)
                    plan = torch.zeros(3 * bucket + 2 * blocks, dtype=torch.long, device=self.device)
                    plan[bucket : 2 * bucket] = torch.arange(bucket, device=self.device) % self.max_rows
                    for splits in {1, self._splits(bucket, self.cache.capacity, block)}:
                        self._packed_graph(bucket, plan, splits, block)
                if self._verdict_graphs.get(bucket, functools.partial(self._verdict_body, bucket)) is None:
                    raise RuntimeError(f"no room for the verdict graph of {bucket} positions")
            torch.cuda.synchronize(self.device)
        except Exception as exc:
            log.warning("packed graphs not captured ahead (%s: %s)", type(exc).__name__, exc)
            self._packed_graphs.graphs.clear()
            self._verdict_graphs.graphs.clear()
        return len(self._packed_graphs) + len(self._verdict_graphs)

    def _warm_prefill(self) -> None:
        """Compile the prefill's functions now for each shape class (sizes of one are specialised), so
        that no request waits for a compiler; fall back to eager prefill if that fails."""
        rows = min(3, self.max_rows)
        packed, self.packed_prefill = self.packed_prefill, False  # the eager prefill's (the packed one warms itself)
        try:
            for batch, q_len in ((1, 1), (1, 5), (rows, 1), (rows, 17)):
                batch = min(batch, rows)
                first = self.max_rows - batch  # rows above any decode batch: nothing is running yet anyway
                self._extend(first, [[0] * q_len] * batch, [0] * batch, [q_len] * batch, False)
        except Exception as exc:
            log.warning("compiled prefill failed (%s: %s); prefilling eagerly", type(exc).__name__, exc)
            self._prefill_qkv = _prefill_qkv_eager(self.local_heads, self.local_kv_heads, self.head_dim)
            self._prefill_mlp = _mlp_in
        finally:
            self.packed_prefill = packed
            for row in range(self.max_rows):
                self.cache.set_length(row, 0)
