"""Decode-ahead: a step computed on the last step's argmax is used only when the caller sends exactly those tokens."""

from __future__ import annotations

import pytest
import torch

from stratus_workers.serve import kernels
from stratus_workers.serve.runner.fused import FusedRunner
from stratus_workers.serve.runner.graphs import MIN_KV_BUCKET, key_buckets

pytestmark = pytest.mark.unit


def test_decoding_one_step_ahead_matches_reference(model: torch.nn.Module, reference) -> None:
    # On CUDA the runner starts step t+1 on step t's argmax before the caller has sampled; the
    # guess must be used only when the caller really sends those tokens to the same rows.
    runner = FusedRunner(model, max_rows=4, max_len=64, cuda_graphs=False, compile=False)
    decoder = runner.decoder
    decoder.decode_ahead = True
    seqs = [[5, 6, 7], [3, 4], [100, 101, 102, 103]]
    logits = runner.forward(0, seqs)
    for step in range(8):
        greedy = logits.argmax(dim=-1).tolist()
        # Greedy steps use the guess; step 3 sends other tokens; at step 5 a request leaves first (its
        # row takes the last one: the guess follows the row).
        new = [[(t + 1) % 512] for t in greedy] if step == 3 else [[t] for t in greedy]
        if step == 5:
            runner.move(2, 1)
            runner.reset(2)
            seqs = [seqs[0], seqs[2]]
            new = new[::2]
        logits = runner.forward(0, new)
        if step == 3:
            assert decoder._ahead_pause  # a wrong guess pauses guessing (sampling requests)...
            decoder._ahead_pause = 0  # ...here resumed at once, so that step 5 meets a guess
        seqs = [s + n for s, n in zip(seqs, new, strict=True)]
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(logits[row], reference(ids)[0], atol=1e-4, rtol=1e-4)
    assert decoder.ahead_hits == 5  # steps 1, 2, 5, 6 and 7
    assert runner.cache.lengths_dev is not None
    assert runner.cache.lengths_dev.tolist()[:2] == runner.lengths[:2] == [len(s) for s in seqs]


def test_decode_ahead_is_off_by_default_without_cuda_graphs(model: torch.nn.Module, monkeypatch) -> None:
    monkeypatch.delenv("STRATUS_DECODE_AHEAD", raising=False)
    assert not FusedRunner(model, max_rows=2, max_len=16, cuda_graphs=False, compile=False).decoder.decode_ahead
    monkeypatch.setenv("STRATUS_DECODE_AHEAD", "1")
    assert FusedRunner(model, max_rows=2, max_len=16, cuda_graphs=False, compile=False).decoder.decode_ahead


def test_buckets_cover_the_batch_and_the_keys(model: torch.nn.Module) -> None:
    runner = FusedRunner(model, max_rows=6, max_len=300, cuda_graphs=False, compile=False)
    buckets = runner.decoder.buckets
    assert buckets(3, 10) == (4, MIN_KV_BUCKET)
    assert buckets(5, 65) == (6, 2 * MIN_KV_BUCKET)  # past the last bucket that fits: max_rows
    assert buckets(1, 290) == (1, runner.capacity)  # never past the cache


def test_with_the_attention_kernel_a_batch_has_a_graph_for_short_keys_and_one_that_splits_long_ones(
    model: torch.nn.Module,
) -> None:
    # The kernel reads each row's length itself, so one graph serves every length; a second splits the keys of
    # long rows over more programs, where (row, kv head) programs are few.
    runner = FusedRunner(model, max_rows=64, max_len=2000, cuda_graphs=False, compile=False)
    runner.triton_attention = True
    buckets, short = runner.decoder.buckets, kernels.DECODE_SPLIT_KEYS
    assert kernels.decode_splits(1, runner.local_kv_heads) > 1
    assert buckets(1, 10) == buckets(1, short) == (1, short)
    assert buckets(1, short + 1) == buckets(1, 1999) == (1, runner.cache.capacity)
    few = runner.local_kv_heads * 64 * 2 > kernels.DECODE_PROGRAMS  # 64 rows: programs enough, no split graph
    assert buckets(64, 10) == ((64, runner.cache.capacity) if few else (64, short))


def test_rows_join_the_step_launched_ahead_and_a_changed_row_voids_it(model: torch.nn.Module, reference) -> None:
    runner = FusedRunner(model, max_rows=4, max_len=64, cuda_graphs=False, compile=False)
    decoder = runner.decoder
    decoder.decode_ahead = True
    seqs = [[5, 6, 7], [3, 4]]
    logits = runner.forward(0, seqs)
    tokens = logits.argmax(dim=-1).tolist()
    for step in range(6):
        join: list[int] = []
        if step == 1:  # a prompt prefilled into row 2 while the step launched ahead runs; it joins next step
            prompt = [9, 8, 7, 6]
            first = runner.forward(2, [prompt])
            torch.testing.assert_close(first[0], reference(prompt)[0], atol=1e-4, rtol=1e-4)
            join = [int(first[0].argmax())]
        if step == 3:  # a roll-back of row 1 (speculative verification does this): the guess is void
            runner.truncate(1, len(seqs[1]) - 1)
            seqs[1] = seqs[1][:-1]
        hits = decoder.ahead_hits
        decoded = runner.decode(tokens, join=join)
        assert decoder.ahead_hits == hits + (step not in (0, 3))
        seqs = [s + [t] for s, t in zip(seqs, tokens, strict=True)]
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(decoded.logits[row], reference(ids)[0], atol=1e-4, rtol=1e-4)
        tokens = list(decoded.greedy)
        if join:
            seqs.append(list(prompt))
            tokens = [*tokens, *join]


@pytest.mark.parametrize(
    ("capacity", "limit", "expected"),
    [
        (64, None, [64]),
        (300, None, [64, 128, 256, 300]),
        (512, 100, [64, 128]),
        (1024, 1024, [64, 128, 256, 512, 1024]),
        (48, None, [48]),
    ],
)
def test_key_buckets_double_from_the_minimum_and_stop_at_the_capacity(
    capacity: int, limit: int | None, expected: list[int]
) -> None:
    """Decode and prefill graphs are captured at these key lengths: every length up to the limit has a bucket."""
    assert MIN_KV_BUCKET == 64
    buckets = key_buckets(capacity, limit)
    assert buckets == expected
    assert buckets[-1] >= min(limit or capacity, capacity)


def test_a_mixed_pass_takes_the_step_in_flight_and_primes_the_next(model: torch.nn.Module, reference) -> None:
    # The engine's mixed step with decode-ahead: the step launched ahead is taken without launching another
    # (hold), the mixed pass runs behind it fed its argmax on the device (then), and the step after the pass is
    # launched from the pass's argmax on the device (prime); a primed step fed other tokens than the caller's is
    # recomputed, not used.
    runner = FusedRunner(model, max_rows=4, max_len=64, cuda_graphs=False, compile=False)
    runner.mixed_step = True
    decoder = runner.decoder
    decoder.decode_ahead = True
    seqs = [[5, 6, 7], [3, 4]]
    with torch.inference_mode():
        logits = runner.forward(0, seqs)
        first = [[t] for t in logits.argmax(dim=-1).tolist()]
        nxt = runner.decode([t[0] for t in first]).greedy  # launches the next step ahead, fed these
        seqs = [s + t + [n] for s, t, n in zip(seqs, first, nxt, strict=True)]
        assert decoder.in_flight
        prompt = [9, 10, 11, 12]
        mixed: list[torch.Tensor] = []

        def launch() -> None:
            mixed.append(runner.forward_mixed([0, 1, 2], [[0], [0], prompt], from_decode=2))
            decoder.prime(mixed[0].argmax(dim=-1))  # rows 0 and 1 decode, row 2 joins

        step = runner.decode(nxt, hold=True, then=launch)
        assert decoder.ahead_hits == 1 and mixed and decoder.primed == 1 and decoder.in_flight
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(step.logits[row], reference(ids)[0], atol=1e-4, rtol=1e-4)
        # The pass was fed the step's choices on the device: its logits are those after them.
        seqs = [s + [t] for s, t in zip(seqs, step.greedy, strict=True)]
        seqs.append(prompt)
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(mixed[0][row], reference(ids)[0], atol=1e-4, rtol=1e-4)
        assert runner.lengths[:3] == [len(s) for s in seqs]
        chosen = mixed[0].argmax(dim=-1).tolist()
        primed = runner.decode(chosen, hold=True)  # the primed step, fed exactly these; none launched behind it
        assert decoder.ahead_hits == 2 and runner.mixed_steps == 1 and not decoder.in_flight
        seqs = [s + [t] for s, t in zip(seqs, chosen, strict=True)]
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(primed.logits[row], reference(ids)[0], atol=1e-4, rtol=1e-4)
        # A primed step the caller feeds other tokens is run again on them (and guessing pauses a while).
        decoder.prime([(t + 1) % 512 for t in primed.greedy])
        assert decoder.primed == 2 and decoder.in_flight
        other = [(t + 2) % 512 for t in primed.greedy]
        again = runner.decode(other)
        assert decoder.ahead_hits == 2 and decoder._ahead_pause > 0
        seqs = [s + [t] for s, t in zip(seqs, other, strict=True)]
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(again.logits[row], reference(ids)[0], atol=1e-4, rtol=1e-4)
