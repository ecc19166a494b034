"""Pipeline stages: how layers and rows are split, and that a forward in stage parts computes what the whole does."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from stratus_workers.models.tiny import TINY, random_llama
from stratus_workers.serve.pipeline import PipelineContext, decode_groups, keep_stage, split_rows, stage_layers
from stratus_workers.serve.runner.build import build_runner
from stratus_workers.serve.server import ServerSettings, engine_mode, stage_argv
from stratus_workers.settings import parse_config

pytestmark = pytest.mark.unit


def test_layers_split_into_contiguous_stages_earlier_ones_taking_the_rest() -> None:
    assert stage_layers(16, 2) == [range(0, 8), range(8, 16)]
    assert stage_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert stage_layers(2, 1) == [range(0, 2)]
    with pytest.raises(ValueError, match="3 pipeline stages need at least 3 decoder layers; the model has 2"):
        stage_layers(2, 3)


def test_rows_split_into_micro_batches() -> None:
    assert split_rows(64, 2) == [(0, 32), (32, 64)]
    assert split_rows(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert split_rows(1, 2) == [(0, 1)]  # never an empty micro-batch
    assert split_rows(5, 0) == [(0, 5)]


def test_ranks_of_stages_of_tensor_parallel_groups() -> None:
    """Two stages of two ranks: rank = stage * 2 + tp_rank; activations go to the same place in the next
    stage's group; the last stage's first rank (rank 2) sends the logits to rank 0, which alone leads."""
    ranks = [PipelineContext(stage=r // 2, stages=2, microbatches=2, tp_rank=r % 2, tensor_parallel=2)
             for r in range(4)]
    assert [c.rank for c in ranks] == [0, 1, 2, 3] and all(c.world_size == 4 for c in ranks)
    assert [c.peer(1) for c in ranks[:2]] == [2, 3] and [c.peer(0) for c in ranks[2:]] == [0, 1]
    assert [c.sends_logits for c in ranks] == [False, False, True, False]
    assert {c.logits_rank for c in ranks} == {2}
    assert [c.leader for c in ranks] == [True, False, False, False]
    assert [c.first for c in ranks] == [True, True, False, False]


def test_decode_micro_batches_are_bucket_sized_and_padded_within_the_cache() -> None:
    """(start, end, padded): full buckets, then a last one padded past the batch, never past max_rows."""
    assert decode_groups(64, 2, 68) == [(0, 32, 32), (32, 64, 32)]
    assert decode_groups(7, 2, 68) == [(0, 4, 4), (4, 7, 4)]
    assert decode_groups(1, 2, 68) == [(0, 1, 1)]
    assert decode_groups(5, 3, 68) == [(0, 2, 2), (2, 4, 2), (4, 5, 2)]
    assert decode_groups(5, 2, 6) == [(0, 4, 4), (4, 5, 2)]  # the padding stops at the cache's last row
    assert decode_groups(9, 1, 68) == [(0, 9, 16)]


@pytest.mark.parametrize("fast", [False, True])
def test_stage_parts_compute_what_the_whole_model_does(fast: bool) -> None:
    """Stage 0 embeds and runs its layers, stage 1 runs the rest and the head: the same logits as one runner,
    for rows at different lengths (a padded prefill) and then a decode step, on either runner path."""
    model = random_llama(dict(TINY, num_hidden_layers=5), vocab_size=300, seed=3)
    stages: list[Any] = []
    for rank in range(2):
        part = copy.deepcopy(model)
        assert keep_stage(part, rank, 2) == (range(0, 3) if rank == 0 else range(3, 5))
        stages.append(build_runner(part, max_rows=4, max_len=64, fast=fast))
    whole = build_runner(model, max_rows=4, max_len=64, fast=fast)
    prompts = [[5, 9, 11, 200, 7], [3, 4], [250, 1, 2]]

    def piped(first_row: int, tokens: list[list[int]]) -> torch.Tensor:
        q_lens = [len(t) for t in tokens]
        starts = stages[0].cache.lengths[first_row : first_row + len(tokens)]
        with torch.inference_mode():
            for stage in stages:
                stage.cache.grow(max(s + q for s, q in zip(starts, q_lens, strict=True)))
            h = stages[0].embed(stages[0].padded_ids(tokens))
            h = stages[0].extend_hidden(first_row, h, starts, q_lens)
            h = stages[1].extend_hidden(first_row, h, starts, q_lens)
            return stages[1].head(stages[1].last_tokens(h, q_lens))

    with torch.inference_mode():
        expected = whole.forward(1, prompts)
    got = piped(1, prompts)
    torch.testing.assert_close(got, expected)
    assert stages[0].lengths == stages[1].lengths == whole.lengths == [0, 5, 2, 3]
    next_ids = [[int(t)] for t in expected.argmax(-1)]
    with torch.inference_mode():
        expected = whole.forward(1, next_ids)
    torch.testing.assert_close(piped(1, next_ids), expected)


def test_settings_refuse_what_pipeline_parallel_cannot_do_and_pick_the_engine_process() -> None:
    ServerSettings(model="m", tensor_parallel=2, pipeline_parallel=2).validate()  # stages of two ranks each
    with pytest.raises(ValueError, match="runs the engine in a process of its own"):
        ServerSettings(model="m", pipeline_parallel=2, engine="thread").validate()
    with pytest.raises(ValueError, match="pipeline_microbatches"):
        ServerSettings(model="m", pipeline_parallel=2, pipeline_microbatches=-1).validate()
    assert engine_mode(ServerSettings(model="m", pipeline_parallel=2, device="cpu")) == "process"
    assert engine_mode(ServerSettings(model="m", device="cpu")) == "thread"


def test_a_stage_command_line_carries_what_a_stage_needs() -> None:
    config = ServerSettings(model="/models/x", name="x", dtype="bfloat16", device="cuda", threads=2,
                           pipeline_parallel=3, pipeline_microbatches=4, tensor_parallel=2, log_level="debug",
                           log_format="text")
    again = parse_config(ServerSettings, list(stage_argv(config)))
    for name in ("model", "name", "dtype", "device", "threads", "pipeline_parallel", "pipeline_microbatches",
                 "tensor_parallel", "log_level", "log_format"):
        assert getattr(again, name) == getattr(config, name), name
