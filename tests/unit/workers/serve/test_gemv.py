"""The fused small-batch decode layer's Triton kernels, run by Triton's interpreter against the torch step's code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stratus_workers.serve import gemv
from stratus_workers.serve.runner.fused import _mlp_in, _qkv_rope

pytestmark = pytest.mark.unit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def residual_tol(dtype: torch.dtype) -> float:
    """The residual add is one rounding in torch and in the kernel: exact, except that Triton's interpreter
    truncates float32 to bfloat16 where the GPU (and torch) round to nearest."""
    return 0.0 if DEVICE == "cuda" or dtype == torch.float32 else 1e-2


# bfloat16 outputs: a unit or two in the last place from the summation order on the GPU; the interpreter's truncations
# (residual_tol) move a near-cancelling sum further.
BF16_TOL = 2e-2 if DEVICE == "cuda" else 8e-2


@pytest.fixture(scope="module")
def interp(triton_ready: None) -> ModuleType:
    """The kernels, run by Triton's interpreter where there is no GPU (tests/conftest.py sets it up)."""
    return gemv


def rotary_tables(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's tables: [length, D], each half the same angles."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(length).float()[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def qkv_case(
    seed: int, batch: int, hidden: int, n_q: int, n_kv: int, head_dim: int, bias: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    n = (n_q + 2 * n_kv) * head_dim
    cos, sin = rotary_tables(40, head_dim)
    return dict(
        h=rand(batch, hidden), delta=rand(batch, hidden), norm_w=rand(hidden, scale=0.5) + 1,
        w=rand(n, hidden, scale=hidden**-0.5), b=rand(n), cos=cos.to(dtype), sin=sin.to(dtype),
        k_cache=rand(batch + 2, n_kv, 40, head_dim), v_cache=rand(batch + 2, n_kv, 40, head_dim),
        # Rows out of order (queries name their cache rows), positions anywhere in the cache.
        rows=torch.randperm(batch + 2, generator=gen)[:batch], pos=torch.randint(0, 40, (batch,), generator=gen),
    )  # fmt: skip


def check_qkv(
    case: dict[str, torch.Tensor], n_q: int, bias: bool, delta: bool, atol: float, blocks: gemv.Blocks | None = None
) -> None:
    c = {k: v.to(DEVICE) for k, v in case.items()}
    n_kv, head_dim = c["k_cache"].shape[1], c["k_cache"].shape[3]
    k_want, v_want = c["k_cache"].clone(), c["v_cache"].clone()
    d = c["delta"] if delta else torch.zeros_like(c["h"])
    h_want, q_want, k, v = _qkv_rope(
        c["h"], d, c["norm_w"], EPS, c["w"], c["b"] if bias else None, c["cos"][c["pos"]], c["sin"][c["pos"]],
        n_q, n_kv, head_dim,
    )  # fmt: skip
    k_want[c["rows"], :, c["pos"]] = k
    v_want[c["rows"], :, c["pos"]] = v
    h_got, q_got = gemv.norm_qkv_rope(
        c["h"], c["delta"] if delta else None, c["norm_w"], EPS, c["w"], c["b"] if bias else None, c["cos"], c["sin"],
        c["pos"], c["rows"], c["k_cache"], c["v_cache"], n_q, blocks,
    )  # fmt: skip
    tol = residual_tol(h_got.dtype)
    torch.testing.assert_close(h_got, h_want, atol=tol, rtol=tol)
    torch.testing.assert_close(q_got, q_want, atol=atol, rtol=atol)
    # Every cache entry: the new keys and values where they belong, everything else untouched.
    torch.testing.assert_close(c["k_cache"], k_want, atol=atol, rtol=atol)
    torch.testing.assert_close(c["v_cache"], v_want, atol=atol, rtol=atol)


def test_qkv_kernel_at_smollm2_135m_shape(interp: ModuleType) -> None:
    # hidden 576 (no power of two: masked loads), 9 query heads over 3 kv heads of 64, 3 rows (padded to 4).
    case = qkv_case(3, 3, 576, 9, 3, 64, False, torch.float32)
    check_qkv(case, 9, bias=False, delta=True, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 4),
    hidden=st.sampled_from([32, 48, 64, 100]),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    head_dim=st.sampled_from([16, 32]),
    bias=st.booleans(),
    delta=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_qkv_kernel_is_norm_projection_rotary_and_cache_write(
    interp: ModuleType, batch: int, hidden: int, heads: tuple[int, int], head_dim: int, bias: bool, delta: bool,
    seed: int,
) -> None:
    n_q, n_kv = heads
    check_qkv(qkv_case(seed, batch, hidden, n_q, n_kv, head_dim, bias, torch.float32), n_q, bias, delta, atol=1e-5)


def test_qkv_kernel_in_bfloat16_rounds_as_the_torch_step(interp: ModuleType) -> None:
    # The model dtype's roundings (residual, norm, projection, each rotary product) where torch's eager step has them:
    # only the projection's summation order differs, so at most a unit in the last place or two.
    case = qkv_case(7, 2, 576, 3, 1, 64, True, torch.bfloat16)
    check_qkv(case, 3, bias=True, delta=True, atol=BF16_TOL)


def mlp_case(seed: int, batch: int, hidden: int, inter: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    return dict(
        h=rand(batch, hidden), attn=rand(batch, hidden), norm_w=rand(hidden, scale=0.5) + 1,
        w=rand(2 * inter, hidden, scale=hidden**-0.5),
    )  # fmt: skip


def check_gate_up(case: dict[str, torch.Tensor], atol: float, blocks: gemv.Blocks | None = None) -> None:
    c = {k: v.to(DEVICE) for k, v in case.items()}
    h_want, act_want = _mlp_in(c["h"], c["attn"], None, c["norm_w"], EPS, c["w"], None)
    h_got, act_got = gemv.norm_gate_up(c["h"], c["attn"], c["norm_w"], EPS, c["w"], blocks)
    tol = residual_tol(h_got.dtype)
    torch.testing.assert_close(h_got, h_want, atol=tol, rtol=tol)
    torch.testing.assert_close(act_got, act_want, atol=atol, rtol=atol)


@pytest.mark.parametrize("batch", [1, 4])
def test_gate_up_kernel_at_smollm2_135m_hidden(interp: ModuleType, batch: int) -> None:
    # hidden 576 (masked columns); 202 rows of each half (a program's last rows masked), not 1536 (the interpreter
    # is slow).
    check_gate_up(mlp_case(batch, batch, 576, 202, torch.float32), atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 4),
    hidden=st.sampled_from([32, 64, 100]),
    inter=st.sampled_from([16, 24, 64, 100]),
    seed=st.integers(0, 2**16),
)
def test_gate_up_kernel_is_norm_projection_and_silu_times_up(
    interp: ModuleType, batch: int, hidden: int, inter: int, seed: int
) -> None:
    check_gate_up(mlp_case(seed, batch, hidden, inter, torch.float32), atol=1e-5)


def test_gate_up_kernel_in_bfloat16(interp: ModuleType) -> None:
    check_gate_up(mlp_case(3, 3, 576, 96, torch.bfloat16), atol=BF16_TOL)


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 8),
    n_out=st.sampled_from([8, 20, 64, 576]),
    k_in=st.sampled_from([16, 64, 100, 576]),
    seed=st.integers(0, 2**16),
)
def test_gemv_is_a_linear_without_bias(interp: ModuleType, batch: int, n_out: int, k_in: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(batch, k_in, generator=gen).to(DEVICE), torch.randn(n_out, k_in, generator=gen).to(DEVICE)
    torch.testing.assert_close(gemv.gemv(x, w), F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_every_launch_shape_the_sweep_may_pick_computes_the_same(interp: ModuleType) -> None:
    # The benchmark sweeps block sizes (tests/bench/gpu_gemv.py); each must compute the same, masks included.
    case, mlp = qkv_case(5, 2, 100, 2, 1, 32, False, torch.float32), mlp_case(5, 2, 100, 24, torch.float32)
    x, w = torch.randn(2, 100).to(DEVICE), torch.randn(20, 100).to(DEVICE)
    for n in (2, 4, 8, 16):
        for k in (32, 64, 128):
            blocks = gemv.Blocks(n, k, 4)
            fresh = {name: t.clone() for name, t in case.items()}
            check_qkv(fresh, 2, bias=False, delta=True, atol=1e-5, blocks=blocks)
            check_gate_up(mlp, atol=1e-5, blocks=blocks)
            torch.testing.assert_close(gemv.gemv(x, w, blocks), F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_block_rule() -> None:
    # The ~1B config: 8 weight rows a program (4 of each half) for the paired kernels, q|k|v 1,024 columns a step,
    # gate|up 512 in 2 warps; the plain GEMV 2 rows, 1,024 columns, 2 warps (whole H200 decode steps' best).
    assert gemv.blocks_for("qkv", 6144, 2048, 1, 64) == gemv.Blocks(4, 1024, 4)
    assert gemv.blocks_for("gate_up", 8192, 2048, 1) == gemv.Blocks(4, 512, 2)
    assert gemv.blocks_for("plain", 2048, 8192, 1) == gemv.Blocks(2, 1024, 2)
    assert gemv.blocks_for("plain", 2048, 2048, 1) == gemv.Blocks(2, 1024, 2)
    # The 135M config's small products: fewer rows a program, so that enough programs run; inputs of 576 and 1,536
    # in steps of 1,024; the warps of the narrower step (a small tile: fewer).
    assert gemv.blocks_for("qkv", 960, 576, 1, 64) == gemv.Blocks(2, 1024, 2)
    assert gemv.blocks_for("gate_up", 1536, 576, 1) == gemv.Blocks(4, 1024, 4)
    assert gemv.blocks_for("plain", 576, 1536, 1) == gemv.Blocks(2, 1024, 4)
    assert gemv.blocks_for("plain", 576, 576, 1) == gemv.Blocks(2, 1024, 1)
    assert gemv.blocks_for("plain", 576, 576, 8) == gemv.Blocks(2, 512, 1)  # the tile's bound at 8 rows
    # More rows: a smaller step, so the product tile stays within TILE_LIMIT.
    assert gemv.blocks_for("plain", 2048, 8192, 4) == gemv.Blocks(2, 1024, 2)
    assert gemv.blocks_for("plain", 2048, 8192, 8) == gemv.Blocks(2, 512, 2)
    assert gemv.blocks_for("qkv", 6144, 2048, 8, 64) == gemv.Blocks(4, 128, 4)
    assert gemv.blocks_for("qkv", 6144, 2048, 1, 16) == gemv.Blocks(4, 1024, 4)
    assert gemv.blocks_for("qkv", 6144, 2048, 1, 4) == gemv.Blocks(2, 1024, 4)  # a head of 4: 2 rows a half
    for batch in range(1, gemv.MAX_BATCH + 1):
        for kind in ("qkv", "gate_up", "plain"):
            for n_out, k_in in ((960, 576), (2048, 2048), (2048, 8192)):
                b = gemv.blocks_for(kind, n_out if kind != "gate_up" else 4 * n_out, k_in, batch, 64)
                assert gemv._pow2_at_least(batch) * b.n * (1 if kind == "plain" else 2) * b.k <= gemv.TILE_LIMIT


def test_bad_input_is_refused_with_the_reason(interp: ModuleType) -> None:
    with pytest.raises(ValueError, match="1 to 8 rows"):
        gemv.gemv(torch.zeros(9, 16), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="contiguous weights"):
        gemv.gemv(torch.zeros(1, 16), torch.zeros(16, 8).t())
    case = qkv_case(1, 1, 32, 2, 2, 16, False, torch.float32)
    with pytest.raises(ValueError, match="do not divide a head"):
        check_qkv(case, 2, bias=False, delta=True, atol=0, blocks=gemv.Blocks(16, 32, 4))


def test_every_launch_shape_of_the_rule_compiles_for_hopper() -> None:
    # The interpreter checks neither branch typing nor layouts: Triton's compiler itself (no GPU needed) builds the
    # kernels for sm_90 at the 1b and 135M shapes, batches 1 to 8, specialised as its JIT would.
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[3] / "support" / "triton_aot.py"
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 40 kernels for sm_90" in done.stdout
