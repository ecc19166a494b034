"""Where a packed pass's layer spends device time outside its matrix products (CUDA; a diagnosis, not a benchmark).

`python tests/bench/gpu_layer_parts.py [1b|135m] --tokens 544` times, as CUDA graphs of every layer's worth, the
fused runner's compiled blocks of a packed pass (`store_block`: add, norm, q|k|v, rotary, cache write;
`mlp_block`: add, norm, gate|up, SiLU * up, down) beside their matrix products alone, so the difference is the
element-wise work; then the same blocks compiled under other inductor settings, to see whether the element-wise
kernels are at the memory's speed. Random-init weights, bfloat16.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from stratus_workers.models.tiny import SMOLLM2_1B, SMOLLM2_135M
from stratus_workers.serve.runner.fused import _mlp_in, _qkv_rope

ARCHS = {"1b": SMOLLM2_1B, "135m": SMOLLM2_135M}


def graph_ms(fn: Callable[[], Any], layers: int, reps: int = 50) -> float:
    """Device ms of `fn` run `layers` times in one CUDA graph (median of `reps` replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", nargs="?", default="1b", choices=sorted(ARCHS))
    parser.add_argument("--tokens", type=int, default=544)
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args()
    cfg = ARCHS[args.arch]
    dev, dt = torch.device("cuda"), torch.bfloat16
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    n_q, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = hidden // n_q
    t = args.tokens
    torch.manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt) * 0.02

    w_qkv, w_o = w((n_q + 2 * n_kv) * d, hidden), w(hidden, n_q * d)
    w_gu, w_down = w(2 * inter, hidden), w(hidden, inter)
    norm = torch.ones(hidden, device=dev, dtype=dt)
    h, delta = torch.randn(t, hidden, device=dev, dtype=dt), torch.randn(t, hidden, device=dev, dtype=dt)
    attn = torch.randn(t, n_q * d, device=dev, dtype=dt)
    act = torch.randn(t, inter, device=dev, dtype=dt)
    cache_len = 640
    k_cache = torch.zeros(args.rows, n_kv, cache_len, d, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    rows = torch.arange(t, device=dev) % args.rows
    pos = 320 + torch.arange(t, device=dev) // args.rows
    cos, sin = torch.randn(t, d, device=dev, dtype=dt), torch.randn(t, d, device=dev, dtype=dt)

    def store_block(h: Any, delta: Any, norm_w: Any, eps: float, w_qkv: Any, b_qkv: Any, cos: Any, sin: Any,
                    k_cache: Any, v_cache: Any, rows: Any, pos: Any) -> Any:  # fmt: skip
        h, q, k, v = _qkv_rope(h, delta, norm_w, eps, w_qkv, b_qkv, cos, sin, n_q, n_kv, d)
        k_cache[rows, :, pos] = k
        v_cache[rows, :, pos] = v
        return h, q

    def mlp_block(h: Any, attn: Any, b_o: Any, norm_w: Any, eps: float, w_gate_up: Any, b_gate_up: Any,
                  w_down: Any) -> Any:  # fmt: skip
        h, a = _mlp_in(h, attn, b_o, norm_w, eps, w_gate_up, b_gate_up)
        return h, F.linear(a, w_down)

    with torch.inference_mode():
        q_ms = graph_ms(lambda: F.linear(h, w_qkv), layers)
        o_ms = graph_ms(lambda: F.linear(attn, w_o), layers)
        gu_ms = graph_ms(lambda: F.linear(h, w_gu), layers)
        dn_ms = graph_ms(lambda: F.linear(act, w_down), layers)
        print(f"{args.arch}, {t} tokens, {layers} layers, ms a pass (all layers):")
        print(f"  q|k|v {q_ms:.3f}  o {o_ms:.3f}  gate|up {gu_ms:.3f}  down {dn_ms:.3f}  (matrix products alone)")
        silu = torch.compile(lambda gu: F.silu(gu[:, :inter]) * gu[:, inter:], dynamic=True, fullgraph=True)
        gu_out = F.linear(h, w_gu)
        gate, up = gu_out[:, :inter], gu_out[:, inter:]
        # An eager add of the same halves reads and writes the same bytes: the memory's pace for this kernel.
        print(f"  SiLU * up alone (compiled): {graph_ms(lambda: silu(gu_out), layers):.3f}; gate + up (eager, the "
              f"same bytes): {graph_ms(lambda: torch.add(gate, up), layers):.3f}")  # fmt: skip
        small = 64  # an earlier call of another token count: what a served runner sees before its packed passes

        def store_args(n: int) -> tuple[Any, ...]:
            return (h[:n], delta[:n], norm, 1e-5, w_qkv, None, cos[:n], sin[:n], k_cache, v_cache, rows[:n], pos[:n])

        def mlp_args(n: int) -> tuple[Any, ...]:
            return (h[:n], attn[:n], None, norm, 1e-5, w_gu, None, w_down)

        for name, dynamic, settings in [
            ("as served (dynamic=True)", True, {}),
            ("static shapes", False, {}),
            ("automatic (64 tokens first)", None, {}),
            ("tokens marked dynamic", "mark", {}),
            ("coordinate-descent tuning", True, {"coordinate_descent_tuning": True}),
        ]:
            torch._dynamo.reset()
            import torch._inductor.config as icfg

            saved = {k: getattr(icfg, k) for k in settings}
            for k, v in settings.items():
                setattr(icfg, k, v)
            try:
                mode = False if dynamic == "mark" else dynamic  # marked dims are dynamic; nothing else is
                s = torch.compile(store_block, dynamic=mode, fullgraph=True)
                m = torch.compile(mlp_block, dynamic=mode, fullgraph=True)
                began = time.perf_counter()
                for n in ([small, t] if dynamic is None else [t]):
                    sa, ma = store_args(n), mlp_args(n)
                    if dynamic == "mark":
                        for x in (*sa[:2], *sa[6:8], *sa[10:], *ma[:2]):
                            torch._dynamo.mark_dynamic(x, 0)
                    s(*sa)
                    m(*ma)
                torch.cuda.synchronize()
                compiled_s = time.perf_counter() - began
                s_ms = graph_ms(lambda: s(*store_args(t)), layers)  # noqa: B023
                m_ms = graph_ms(lambda: m(*mlp_args(t)), layers)  # noqa: B023
            finally:
                for k, v in saved.items():
                    setattr(icfg, k, v)
            print(f"  {name:28s} store_block {s_ms:.3f} (+{s_ms - q_ms:.3f} past q|k|v)  "
                  f"mlp_block {m_ms:.3f} (+{m_ms - gu_ms - dn_ms:.3f} past its products); compiled in "
                  f"{compiled_s:.1f} s")  # fmt: skip

if __name__ == "__main__":
    main()
