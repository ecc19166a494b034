"""The pieces distillation and recovery share: device choice, LR schedule, KD loss, mixed batches."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from stratus_workers.compress.corpus import load_slices
from stratus_workers.compress.training import (
    FINAL_LR_FRACTION,
    DeviceUnavailable,
    TrainingBatches,
    describe_device,
    kd_loss,
    learning_rate,
    resolve_device,
)
from stratus_workers.models.loader import load_model

pytestmark = pytest.mark.unit


def test_device_auto_falls_back_to_the_cpu_and_cuda_says_why_it_cannot() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        assert describe_device(resolve_device("cuda")).startswith("cuda (")
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceUnavailable, match=r"nvidia\.com/gpu"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")
    assert describe_device(torch.device("cpu")) == "cpu"


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    peak = 1e-3
    lrs = [learning_rate(s, 100, peak, warmup=10, schedule="cosine") for s in range(100)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert lrs[10] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(peak * FINAL_LR_FRACTION)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # monotone after warm-up
    assert [learning_rate(s, 50, peak, warmup=0, schedule="constant") for s in (0, 25, 49)] == [peak] * 3
    assert learning_rate(0, 1, peak, warmup=0, schedule="cosine") == pytest.approx(peak)


def test_kd_loss_is_zero_for_the_teacher_itself_and_scales_with_t_squared() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=gen)
    student = torch.randn(2, 5, 11, generator=gen)
    assert float(kd_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # Against a direct computation: mean over tokens of sum_v p_t (log p_t - log p_s), at T = 1.
    p_t = torch.softmax(teacher, -1)
    direct = (p_t * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1).mean()
    assert float(kd_loss(student, teacher, 1.0)) == pytest.approx(float(direct), rel=1e-5)
    assert float(kd_loss(student.bfloat16(), teacher.bfloat16(), 1.0)) == pytest.approx(float(direct), rel=2e-2)
    t = 3.0
    scaled = (torch.softmax(teacher / t, -1) * (torch.log_softmax(teacher / t, -1)
                                                 - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert float(kd_loss(student, teacher, t)) == pytest.approx(float(scaled), rel=1e-5)
    assert math.isfinite(float(kd_loss(student, teacher, 0.5)))


def test_batches_are_pure_functions_of_seed_and_step_and_mix_by_share(tiny_model_dir: Path) -> None:
    slices = load_slices(load_model(str(tiny_model_dir), dtype="float32", device="cpu").tokenizer)
    # A recognisable generated stream: ids the corpus does not use at this scale.
    generated = torch.arange(40_000, 40_000 + 5_000, dtype=torch.int32)
    data = TrainingBatches(slices, generated, corpus_share=0.25)
    a = data.batch(7, 8, 64, seed=3)
    assert torch.equal(a, data.batch(7, 8, 64, seed=3)) and a.dtype == torch.int64 and a.shape == (8, 64)
    assert not torch.equal(a, data.batch(8, 8, 64, seed=3))
    assert not torch.equal(a, data.batch(7, 8, 64, seed=4))
    from_generated = (a >= 40_000).all(dim=1)
    assert int(from_generated.sum()) == 6 and not bool(from_generated[:2].any())
    for row in a[2:]:  # windows of the stream: consecutive ids
        assert torch.equal(row - row[0], torch.arange(64))
    assert torch.equal(TrainingBatches(slices).batch(7, 8, 64, 3), slices.train_batch(7, 8, 64, 3))
    assert torch.equal(TrainingBatches(slices, generated, 1.0).batch(7, 4, 64, 3), slices.train_batch(7, 4, 64, 3))
    with pytest.raises(ValueError, match="generatedSequences"):
        TrainingBatches(slices, generated[:10], 0.5).check(64, field="compression.distillation.sequenceLength")
