"""Which launch settings make the attention kernels fastest on this GPU (CUDA; a tuning sweep, not a benchmark).

`python tests/bench/gpu_attention_sweep.py` times `extend_attention` (the packed pass: verification rows of a
16-token draft, and first-round rows of prompt + draft) and `decode_attention` (a decode step) at the served
shapes of the ~1B and 135M configurations, for every `Launch` (keys per iteration, warps, pipeline stages) in the
grid, as CUDA graphs of one launch per layer, and prints each shape's times beside the current default's with the
largest difference of outputs from it. Random bfloat16 caches. With `--splits 4,8,16,32,64` it times the extend
pass's key splits instead, for a chat turn after a long cached prefix (`SPLIT_SHAPES`). With `--cached-turn` it
times the pass a cached chat turn runs as served: one row's 32 new tokens after a 2,992-token prefix read from the
shared copy (cascade), its block table exact and padded to what a 32-token graph holds (`max_extend_blocks`). With
`--shared-sweep` it sweeps what the shared-prefix workload runs most: that pass's blocks, key splits and launches, and
a 64-row cascade decode step's attention (prefix tile lines, prefix chunks, launches), against the defaults. With
`--cascade` it times a cascade decode step's attention (64 and 16 rows) in one launch, as served, against two (the
prefix's, then the rows' own keys) and against the one launch with other settings.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gpu_layer_parts import ARCHS, graph_ms

from stratus_workers.serve import kernels
from stratus_workers.serve.kernels import Launch


def tensors(arch: str, rows: int, queries: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bfloat16 queries [queries, Hq, D] and a key and value cache [rows, Hkv, length, D] of `arch`'s heads."""
    cfg = ARCHS[arch]
    n_q, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // n_q
    k = torch.randn(rows, n_kv, length, d, device="cuda", dtype=torch.bfloat16)
    return torch.randn(queries, n_q, d, device="cuda", dtype=torch.bfloat16), k, torch.randn_like(k)


def extend_pass(arch: str, rows: int, new: int, context: int) -> Callable[..., torch.Tensor]:
    """A packed pass of `rows` rows of `new` tokens after `context` cached ones each: `run(**options)` runs its
    attention with `extend_attention`'s `options` (launch, splits)."""
    q, k, v = tensors(arch, rows, rows * new, context + new + 64)
    (_, n_q, d), n_kv, dev = q.shape, k.shape[1], q.device
    pos = torch.arange(context, context + new, device=dev).repeat(rows)
    row_of = torch.arange(rows, device=dev).repeat_interleave(new)
    block = kernels.extend_block(n_q, n_kv, new)
    table = kernels.extend_blocks(np.arange(rows) * new, np.full(rows, new), block)
    blocks = torch.from_numpy(table).to(dev)
    scale = d**-0.5

    def run(**options: Any) -> torch.Tensor:
        return kernels.extend_attention(q, k, v, pos, row_of, blocks, scale, block=block, **options)

    run.default_splits = kernels.extend_splits(rows * new, n_q, n_kv, block)  # type: ignore[attr-defined]
    return run


def extend_case(arch: str, rows: int, new: int, context: int) -> tuple[str, int, Callable[[Launch], torch.Tensor]]:
    """A packed pass of `rows` rows of `new` tokens after `context` cached ones each."""
    run = extend_pass(arch, rows, new, context)
    return (f"extend {arch} {rows}x{new} after {context}", ARCHS[arch]["num_hidden_layers"],
            lambda launch: run(launch=launch))


def decode_case(arch: str, rows: int, context: int) -> tuple[str, int, Callable[[Launch], torch.Tensor]]:
    """A decode step of `rows` rows at position `context`."""
    q, k, v = tensors(arch, rows, rows, context + 64)
    d, n_kv = q.shape[2], k.shape[1]
    pos = torch.full((rows,), context, device=q.device)
    splits = kernels.decode_splits(rows, n_kv) if context + 1 > kernels.DECODE_SPLIT_KEYS else 1

    def run(launch: Launch) -> torch.Tensor:
        return kernels.decode_attention(q, k, v, pos, d**-0.5, splits=splits, launch=launch)

    return f"decode {arch} {rows} rows at {context} (splits {splits})", ARCHS[arch]["num_hidden_layers"], run


# (model, rows, new tokens a row, cached tokens a row): verification of 16-token drafts, the first round's prompt +
# draft, a prefill chunk after a cached prefix.
EXTEND_SHAPES = [
    ("1b", 32, 17, 320), ("1b", 32, 17, 560), ("1b", 32, 80, 0), ("1b", 1, 512, 512),
    ("135m", 32, 17, 320), ("135m", 32, 80, 0), ("135m", 1, 512, 512),
]
# (model, rows, cached tokens a row): one stream, a few, 64 at short and long contexts (1,100: split keys).
DECODE_SHAPES = [
    ("1b", 1, 64), ("1b", 1, 1000), ("135m", 1, 64), ("135m", 1, 320), ("1b", 8, 320), ("135m", 8, 320),
    ("1b", 64, 128), ("1b", 64, 320), ("1b", 1, 320), ("135m", 64, 128), ("135m", 64, 320), ("135m", 64, 1100),
]
BEFORE = kernels.BASE_LAUNCH  # every attention kernel's launch until this sweep (session 14)
CANDIDATES = [Launch(64, 2, 3), Launch(32, 2, 2), Launch(32, 4, 1), Launch(128, 4, 2)]


def sweep(name: str, layers: int, run: Callable[[Launch], torch.Tensor], grid: list[Launch], default: Launch) -> None:
    """Print the fastest launches of one case, and the candidates', against `default`."""
    reference = run(default).float()
    base = graph_ms(lambda: run(default), layers) / layers * 1000
    results: dict[Launch, tuple[float, float]] = {}
    for launch in dict.fromkeys([*grid, *CANDIDATES]):
        try:
            diff = (run(launch).float() - reference).abs().max().item()
            results[launch] = (graph_ms(lambda launch=launch: run(launch), layers) / layers * 1000, diff)
        except Exception as error:  # a tile the compiler refuses (shared memory) is a result too
            print(f"  {name}: {launch} failed: {type(error).__name__}: {str(error)[:120]}")
    print(f"{name}: default {base:.1f} µs a layer")
    best = sorted(results, key=lambda launch: results[launch][0])[:5]
    for launch in [*best, *(c for c in CANDIDATES if c not in best and c in results)]:
        us, diff = results[launch]
        mark = " (candidate)" if launch in CANDIDATES else ""
        print(
            f"  block_n {launch.block_n:3d} warps {launch.warps} stages {launch.stages}: {us:6.1f} µs "
            f"({us / base:.2f}x), max diff {diff:.2e}{mark}"
        )


# (model, rows, new tokens a row, cached tokens a row): a chat turn after a long cached prefix, the shapes whose key
# splits (`kernels.extend_splits`) `--splits` sweeps.
SPLIT_SHAPES = [
    ("135m", 1, 32, 1000), ("135m", 1, 32, 3000), ("135m", 4, 32, 3000), ("1b", 1, 32, 3000), ("1b", 4, 32, 3000),
]


def sweep_splits(arch: str, rows: int, new: int, context: int, counts: list[int]) -> None:
    """Print the extend attention's µs a layer at each key split count for one shape (its default marked *), with
    the largest difference of its output from one split's."""
    run = extend_pass(arch, rows, new, context)
    layers = ARCHS[arch]["num_hidden_layers"]
    reference = run(splits=1).float()
    cells = []
    for splits in counts:
        diff = (run(splits=splits).float() - reference).abs().max().item()
        us = graph_ms(lambda splits=splits: run(splits=splits), layers) / layers * 1000
        mark = "*" if splits == run.default_splits else ""  # type: ignore[attr-defined]
        cells.append(f"{splits}{mark}: {us:.1f} µs (diff {diff:.1e})")
    print(f"extend {arch} {rows}x{new} after {context}: " + ", ".join(cells), flush=True)


def shared_prefix(n_kv: int, prefix: int, d: int, rows: int) -> kernels.SharedPrefix:
    """Random bfloat16 keys and values of a `prefix`-token shared prefix that each of `rows` rows reads all of."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    keys = torch.randn(n_kv, prefix, d, device=dev, dtype=dt)
    return kernels.SharedPrefix(
        keys, torch.randn_like(keys), torch.full((rows,), prefix, device=dev, dtype=torch.int64),
        torch.tensor([prefix], device=dev, dtype=torch.int64),
    )


class CachedTurn:
    """One row's `new` tokens after `prefix` keys of the shared copy (`SharedPrefix`): the pass a cached chat turn
    runs as served, in a runner of `max_rows` rows."""

    def __init__(self, arch: str, prefix: int = 2992, new: int = 32, max_rows: int = 64) -> None:
        cfg = ARCHS[arch]
        self.n_q, self.n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = cfg["hidden_size"] // self.n_q
        self.layers = cfg["num_hidden_layers"]
        self.prefix, self.new, self.max_rows = prefix, new, max_rows
        dev, dt = torch.device("cuda"), torch.bfloat16
        self.q = torch.randn(new, self.n_q, self.d, device=dev, dtype=dt)
        self.k = torch.randn(max_rows, self.n_kv, prefix + new + 64, self.d, device=dev, dtype=dt)
        self.v = torch.randn_like(self.k)
        self.shared = shared_prefix(self.n_kv, prefix, self.d, max_rows)
        self.pos = torch.arange(prefix, prefix + new, device=dev)
        self.rows = torch.zeros(new, device=dev, dtype=torch.int64)
        self.block = kernels.extend_block(self.n_q, self.n_kv, new)
        self.splits = kernels.extend_splits(new, self.n_q, self.n_kv, self.block)

    def attention(self, block: int, splits: int, launch: Launch | None = None, padded: bool = True
                  ) -> tuple[int, Callable[[], torch.Tensor]]:
        """The pass's attention in blocks of `block` tokens and `splits` key splits, its block table padded as a
        graph of `new` tokens pads it (or exact): the table's blocks, and a call that runs it."""
        size = kernels.max_extend_blocks(self.new, self.max_rows, block) if padded else 0
        table = kernels.extend_blocks(np.zeros(1, np.int64), np.full(1, self.new), block, size)
        blocks = torch.from_numpy(table).to(self.q.device)
        return table.shape[1], lambda: kernels.extend_attention(
            self.q, self.k, self.v, self.pos, self.rows, blocks, self.d**-0.5, splits, block, launch=launch,
            shared=self.shared,
        )


def cached_turn(arch: str) -> None:
    """Print the extend attention's µs a layer for a cached turn (`CachedTurn`) at its default blocks and splits:
    its block table exact, and padded as a graph of its tokens pads it."""
    turn = CachedTurn(arch)
    cells, reference = [], None
    for name, padded in (("exact", False), ("padded", True)):
        n_blocks, run = turn.attention(turn.block, turn.splits, padded=padded)
        out = run().float()
        reference = out if reference is None else reference
        us = graph_ms(run, turn.layers) / turn.layers * 1000
        cells.append(f"{name} ({n_blocks} blocks) {us:.1f} µs (diff {(out - reference).abs().max().item():.1e})")
    print(f"cached turn {arch} 1x{turn.new} after {turn.prefix} shared, splits {turn.splits}: " + ", ".join(cells),
          flush=True)


def cached_turn_sweep(arch: str) -> None:
    """A cached turn's attention (`CachedTurn`, its block table padded as served): µs a layer at the default block
    size, key splits and launch, then with one of them changed at a time."""
    turn = CachedTurn(arch)
    default = (turn.block, turn.splits, None)
    variants: list[tuple[int, int, Launch | None]] = [default]
    variants += [(turn.block, s, None) for s in (4, 8, 32, 64) if s != turn.splits]
    variants += [(16, s, None) for s in (kernels.extend_splits(turn.new, turn.n_q, turn.n_kv, 16), 32)]
    variants += [(turn.block, turn.splits, launch) for launch in SHARED_LAUNCHES]
    _coordinate_sweep(f"cached turn {arch} 1x{turn.new} after {turn.prefix} shared (block, splits, launch)", variants,
                      lambda variant: turn.attention(*variant)[1], turn.layers)


class CascadeStep:
    """A cascade decode step's attention inputs: `batch` rows of the `arch` model's shapes, each `own` keys of its
    own after the shared `prefix` (random bfloat16)."""

    def __init__(self, arch: str, prefix: int, own: int, batch: int) -> None:
        cfg = ARCHS[arch]
        self.n_q, self.n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.layers = cfg["num_hidden_layers"]
        d = self.d = cfg["hidden_size"] // self.n_q
        dev, dt = torch.device("cuda"), torch.bfloat16
        self.q = torch.randn(batch, self.n_q, d, device=dev, dtype=dt)
        self.k = torch.randn(batch, self.n_kv, prefix + own + 64, d, device=dev, dtype=dt)
        self.v = torch.randn_like(self.k)
        self.shared = shared_prefix(self.n_kv, prefix, d, batch)
        self.pos = torch.full((batch,), prefix + own - 1, device=dev, dtype=torch.int64)
        self.name = f"cascade decode {arch} {batch} rows, {own} own keys after {prefix} shared"

    def attention(self, **options: Any) -> torch.Tensor:
        return kernels.decode_attention(self.q, self.k, self.v, self.pos, self.d**-0.5, shared=self.shared, **options)


def cascade_sweep(arch: str, prefix: int = 2992, own: int = 64, batch: int = 64) -> None:
    """A cascade decode step's attention (`batch` rows, each `own` keys of its own after the shared `prefix`): µs a
    layer at the default prefix tile (lines), chunk count and launch, then with one changed at a time; and the same
    rows reading all their keys from their own rows (no cascade), for scale."""
    step = CascadeStep(arch, prefix, own, batch)
    q, k, v, pos, layers = step.q, step.k, step.v, step.pos, step.layers
    splits = kernels.decode_splits(batch, step.n_kv)
    plain = graph_ms(lambda: kernels.decode_attention(q, k, v, pos, step.d**-0.5, splits=splits), layers)
    print(f"decode {arch} {batch} rows at {prefix + own}, no cascade (splits {splits}): {plain / layers * 1000:.1f} µs "
          "a layer", flush=True)
    saved = (kernels.CASCADE_LINES, kernels.MAX_CASCADE_CHUNKS, kernels.CASCADE_PROGRAMS, kernels.extend_launch)
    default = (saved[0], kernels.cascade_shape(batch, step.n_q, step.n_kv)[2], None)
    variants: list[tuple[int, int, Launch | None]] = [default]
    variants += [(default[0], c, None) for c in (4, 8, 32, 64) if c != default[1]]
    variants += [(lines, default[1], None) for lines in (32, 64) if lines != default[0]]
    variants += [(default[0], default[1], launch) for launch in SHARED_LAUNCHES]

    def run(variant: tuple[int, int, Launch | None]) -> Callable[[], torch.Tensor]:
        def attend() -> torch.Tensor:
            lines, chunks, launch = variant
            kernels.CASCADE_LINES, kernels.MAX_CASCADE_CHUNKS, kernels.CASCADE_PROGRAMS = lines, chunks, 1 << 20
            setattr(kernels, "extend_launch", saved[3] if launch is None else (lambda _lines: launch))  # noqa: B010
            try:
                return step.attention()
            finally:
                kernels.CASCADE_LINES, kernels.MAX_CASCADE_CHUNKS, kernels.CASCADE_PROGRAMS = saved[:3]
                setattr(kernels, "extend_launch", saved[3])  # noqa: B010

        return attend

    _coordinate_sweep(f"{step.name} (lines, chunks, launch)", variants, run, layers)


def cascade_fused(arch: str, prefix: int = 2992, own: int = 64, batch: int = 64) -> None:
    """A cascade decode step's attention as served (`batch` rows, `own` keys each after the shared `prefix`): the
    prefix's programs and the rows' own in one launch (the default), against two launches (`fused=False`), and the
    one launch with each of SHARED_LAUNCHES; µs a layer, as a graph of the model's layers."""
    step = CascadeStep(arch, prefix, own, batch)
    variants: list[tuple[bool, Launch | None]] = [(True, None), (False, None)]
    variants += [(True, launch) for launch in SHARED_LAUNCHES]

    def run(variant: tuple[bool, Launch | None]) -> Callable[[], torch.Tensor]:
        fused, launch = variant
        return lambda: step.attention(fused=fused, launch=launch)

    _coordinate_sweep(f"{step.name} (fused, launch)", variants, run, step.layers)


# The launches the shared-prefix sweep tries besides each kernel's default (None).
SHARED_LAUNCHES = [Launch(64, 4, 3), Launch(64, 8, 3), Launch(128, 8, 2), Launch(32, 8, 3)]


def _coordinate_sweep(name: str, variants: list[Any], make: Callable[[Any], Callable[[], torch.Tensor]],
                      layers: int) -> None:
    """Time each variant (the first is the default) as a graph of `layers` launches; print each as it is measured,
    against the default, with the largest difference of its output from the default's."""
    print(name, flush=True)
    reference, base = None, 0.0
    for variant in variants:
        try:
            run = make(variant)
            out = run().float()
            reference = out if reference is None else reference
            us = graph_ms(run, layers) / layers * 1000
            base = base or us
            diff = (out - reference).abs().max().item()
            print(f"  {variant}: {us:6.1f} µs a layer ({us / base:.2f}x), max diff {diff:.2e}", flush=True)
        except Exception as error:  # a tile the compiler refuses is a result too
            print(f"  {variant}: {type(error).__name__}: {str(error)[:100]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--splits", help="sweep the extend pass's key splits instead (e.g. 4,8,16,32,64) at SPLIT_SHAPES"
    )
    parser.add_argument("--block-n", default="32,64,128")
    parser.add_argument("--warps", default="2,4")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument(
        "--match", default="", help="only the cases whose name contains one of these (comma-separated: 'decode')"
    )
    parser.add_argument("--cached-turn", action="store_true", help="time a cached chat turn's pass as served instead")
    parser.add_argument("--cascade", action="store_true", help="time a cascade decode step's attention, one launch "
                        "against two")
    parser.add_argument(
        "--shared-sweep", default="", help="sweep the shared-prefix workload's attention shapes: 135m,1b"
    )
    args = parser.parse_args()
    if args.shared_sweep:
        for arch in args.shared_sweep.split(","):
            cascade_sweep(arch)
            cached_turn_sweep(arch)
        return
    if args.cascade:
        for arch in ("135m", "1b"):
            for batch in (64, 16):
                cascade_fused(arch, batch=batch)
        return
    if args.cached_turn:
        for arch in ("135m", "1b"):
            cached_turn(arch)
        return
    if args.splits:
        counts = [int(n) for n in args.splits.split(",")]
        for shape in SPLIT_SHAPES:
            if any(part in f"extend {shape[0]}" for part in args.match.split(",")):
                sweep_splits(*shape, counts)
        return
    grid = [
        Launch(int(n), int(w), int(s))
        for n, w, s in itertools.product(args.block_n.split(","), args.warps.split(","), args.stages.split(","))
    ]
    cases = [extend_case(*shape) for shape in EXTEND_SHAPES] + [decode_case(*shape) for shape in DECODE_SHAPES]
    print(f"{torch.cuda.get_device_name()}; each case against {BEFORE}, the launch before the sweep")
    for name, layers, run in cases:
        if any(part in name for part in args.match.split(",")):
            sweep(name, layers, run, grid, BEFORE)


if __name__ == "__main__":
    main()
