"""`forward_rows_greedy`: the packed pass with the head and the greedy verdicts in one (a CUDA graph per bucket of
scored positions on the GPU) gives what `forward_rows` and `greedy_verdicts` give."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.serve.runner import ModelRunner
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.runner.fused import PACKED_BUCKETS, FusedRunner
from stratus_workers.serve.runner.modules import ModuleRunner
from stratus_workers.serve.speculative import greedy_verdicts

VOCAB = 64
MAX_LEN = 64


@pytest.fixture(scope="module")
def model() -> Any:
    return random_llama(dict(TINY), vocab_size=VOCAB, seed=11, init_std=0.3)


def plan_of(drafts: Sequence[Sequence[int]]) -> np.ndarray:
    """Per scored position the draft token it predicts (-1 at a row's last) and its row (sessions._greedy_plan)."""
    targets = [t for d in drafts for t in (*d, -1)]
    segments = [i for i, d in enumerate(drafts) for _ in range(len(d) + 1)]
    return np.array([targets, segments], dtype=np.int64)


def picked(found: tuple[torch.Tensor, int], n: int, size: int) -> list[Any]:
    values, width = found
    v = values.tolist()
    return v[:n] + v[width : width + n] + v[2 * width : 2 * width + size]


def reference(runner: ModelRunner, rows: list[int], tokens: list[list[int]], drafts: list[list[int]]) -> list[Any]:
    """forward_rows, then greedy_verdicts over its scores: the path a runner without forward_rows_greedy takes."""
    plan = torch.from_numpy(plan_of(drafts)).to(runner.device)
    logits = runner.forward_rows(rows, tokens, [len(t) - len(d) - 1 for t, d in zip(tokens, drafts, strict=True)])
    stop, token, logprobs = greedy_verdicts(logits, plan[0], plan[1], len(rows))
    return stop.tolist() + token.tolist() + logprobs.tolist()


def pair(model: Any) -> tuple[FusedRunner, FusedRunner]:
    """Two eager fused runners of three rows: one to break, one to compare with."""
    def one() -> FusedRunner:
        return FusedRunner(model, max_rows=3, max_len=MAX_LEN, cuda_graphs=False, compile=False)

    return one(), one()


# Two sessions in rows 0 and 2 with drafts of two tokens and one: their calls' tokens (context tail + draft).
DRAFTS = [[5, 6], [7]]
TOKENS = [[1, 2, *DRAFTS[0]], [3, *DRAFTS[1]]]


def rounds(seed: int, rows: int) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Three rounds of per-row (context tail, draft) of varied lengths, some drafts empty."""
    rng = random.Random(seed)
    out = []
    for r in range(3):
        tails = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 6) if r == 0 else 1)] for _ in range(rows)]
        drafts = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 5))] for _ in range(rows)]
        out.append((tails, drafts))
    return out


@pytest.mark.unit
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 4))
def test_the_verdicts_in_one_call_are_forward_rows_then_greedy_verdicts(model: Any, seed: int, rows: int) -> None:
    one = FusedRunner(model, max_rows=5, max_len=MAX_LEN, cuda_graphs=False, compile=False)
    two = FusedRunner(model, max_rows=5, max_len=MAX_LEN, cuda_graphs=False, compile=False)
    row_ids = sorted(random.Random(seed).sample(range(5), rows))
    with torch.inference_mode():
        for tails, drafts in rounds(seed, rows):
            before = [one.lengths[row] for row in row_ids]
            tokens = [t + d for t, d in zip(tails, drafts, strict=True)]
            starts = [len(t) - 1 for t in tails]
            plan = plan_of(drafts)
            want = reference(one, row_ids, tokens, drafts)
            found = two.forward_rows_greedy(row_ids, tokens, starts, plan)
            assert found is not None
            got = picked(found, rows, plan.shape[1])
            assert got[: 2 * rows] == want[: 2 * rows]  # where each row stops, and the token there
            assert got[2 * rows :] == pytest.approx(want[2 * rows :], abs=1e-5)
            assert one.lengths == two.lengths
            for i, row in enumerate(row_ids):  # the drafts dropped, the tails kept: the next round goes on from there
                one.truncate(row, before[i] + len(tails[i]))
                two.truncate(row, before[i] + len(tails[i]))


@pytest.mark.unit
def test_a_plan_that_does_not_cover_the_scored_positions_is_refused(model: Any) -> None:
    runner = FusedRunner(model, max_rows=3, max_len=MAX_LEN, cuda_graphs=False, compile=False)
    with pytest.raises(ValueError, match="plan covers 3 positions"):
        runner.forward_rows_greedy([0, 1], [[1, 2, 3], [4, 5]], [0, 1], plan_of([[2, 3], []])[:, :3])
    assert runner.lengths[:2] == [0, 0]  # refused before anything ran


@pytest.mark.unit
def test_a_verdict_graph_that_fails_leaves_the_verdicts_to_the_eager_path_for_good(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A capture or replay that fails (here: raises as a refused capture would) after the pass ran: the group still
    # gets its verdicts, computed eagerly from the same pass, and later groups do not try the graphs again.
    one, two = pair(model)
    tried: list[int] = []

    def refused(*args: Any) -> torch.Tensor:
        tried.append(args[-1])
        raise RuntimeError("capture refused")

    monkeypatch.setattr(two, "_verdict_bucket", lambda size: 16 if two.verdict_graphs else 0)
    monkeypatch.setattr(two, "_verdicts_graphed", refused)
    with torch.inference_mode():
        for _ in range(2):
            plan = plan_of(DRAFTS)
            want = reference(one, [0, 2], TOKENS, DRAFTS)
            found = two.forward_rows_greedy([0, 2], TOKENS, [1, 0], plan)
            assert found is not None
            got = picked(found, 2, plan.shape[1])
            assert got[:4] == want[:4] and got[4:] == pytest.approx(want[4:], abs=1e-5)
    assert tried == [16] and not two.verdict_graphs


@pytest.mark.unit
def test_a_packed_pass_that_fails_turns_packing_off_and_the_padded_pass_verifies(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel that cannot run here: forward_rows_greedy answers None with no pass counted (the caller takes
    # forward_rows and greedy_verdicts), and from then on forward_rows takes the padded pass, scoring as the model.
    runner, packed = pair(model)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(runner, "_packed_hidden", broken)
    with torch.inference_mode():
        assert runner.forward_rows_greedy([0, 2], TOKENS, [1, 0], plan_of(DRAFTS)) is None
        assert not runner.packed_verify and runner.passes == 0 and runner.lengths == [0, 0, 0]
        got = runner.forward_rows([0, 2], TOKENS, [1, 0])
        want = packed.forward_rows([0, 2], TOKENS, [1, 0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert runner.passes == 1 and runner.lengths == packed.lengths


@pytest.mark.unit
def test_a_runner_without_the_combined_path_runs_nothing(model: Any) -> None:
    runner = ModuleRunner(model, max_rows=3, max_len=MAX_LEN)
    assert runner.forward_rows_greedy([0], [[1, 2]], [0], plan_of([[2]])) is None
    assert runner.lengths == [0, 0, 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_verdict_graphs_give_the_eager_verdicts() -> None:
    """Captured per bucket of scored positions, padded past the real ones (a bucket filled exactly, one padded,
    one past the largest bucket: eagerly), the verdicts equal those of a runner without graphs."""
    model = random_llama(dict(TINY), vocab_size=512, seed=5, init_std=0.2).to("cuda", torch.float32)
    rows = 32
    graphs = build_runner(model, max_rows=rows, max_len=256)
    assert isinstance(graphs, FusedRunner) and graphs.cuda_graphs
    graphs.warmup()
    eager = FusedRunner(model, max_rows=rows, max_len=256, cuda_graphs=False, compile=False)
    rng = random.Random(3)
    contexts = [[rng.randrange(512) for _ in range(40)] for _ in range(rows)]
    with torch.inference_mode():
        for runner in (graphs, eager):
            runner.forward_rows(list(range(rows)), contexts, [39] * rows)
        for draft_len, n in ((PACKED_BUCKETS[3] // 4 - 1, 4), (6, 5), (PACKED_BUCKETS[-1] // rows, rows)):
            drafts = [[rng.randrange(512) for _ in range(draft_len)] for _ in range(n)]
            tokens = [[rng.randrange(512), *d] for d in drafts]
            plan = plan_of(drafts)
            size = plan.shape[1]
            found = [r.forward_rows_greedy(list(range(n)), tokens, [0] * n, plan) for r in (graphs, eager)]
            assert found[0] is not None and found[1] is not None
            got, want = picked(found[0], n, size), picked(found[1], n, size)
            assert got[: 2 * n] == want[: 2 * n], (size, got[: 2 * n], want[: 2 * n])
            assert got[2 * n :] == pytest.approx(want[2 * n :], abs=1e-3)
            for runner in (graphs, eager):
                for row in range(n):
                    runner.truncate(row, 40)
    assert len(graphs._verdict_graphs) == len(PACKED_BUCKETS)  # captured at warm-up, none since
