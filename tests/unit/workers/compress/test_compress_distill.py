"""Distillation: the student starts as a copy of chosen teacher layers and resumes from its checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from stratus_workers.compress.corpus import load_slices
from stratus_workers.compress.distill import CHECKPOINT, build_student, distill, student_layer_indices
from stratus_workers.compress.spec import Distillation
from stratus_workers.models.loader import load_model

pytestmark = pytest.mark.unit


def test_layer_choice_keeps_first_and_last() -> None:
    half = student_layer_indices(30, 15)
    assert len(half) == 15 and half[0] == 0 and half[-1] == 29
    assert {b - a for a, b in itertools.pairwise(half)} <= {2, 3}  # evenly spread
    assert student_layer_indices(2, 1) == [1]
    assert student_layer_indices(4, 2) == [0, 3]


def test_student_starts_as_the_teachers_layers(tiny_model_dir: Path) -> None:
    teacher = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    student, keep = build_student(teacher, 1)
    assert keep == [1]
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert student.model.layers[0].self_attn.layer_idx == 0  # renumbered, so the KV cache indexes it right
    ids = torch.tensor([[1, 2, 3, 4]])
    assert student(input_ids=ids).logits.shape == teacher(input_ids=ids).logits.shape


def test_interrupted_distillation_resumes_to_the_same_student(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    slices = load_slices(loaded.tokenizer)
    settings = {"student_layers": 1, "batch_size": 2, "sequence_length": 32, "learning_rate": 1e-3,
                "checkpoint_every": 2}
    straight, figures = distill(loaded.model, Distillation(steps=4, **settings), slices, work_dir=tmp_path / "a",
                                source="tiny", seed=0)
    assert figures["resumed_from_step"] == 0
    # A Job killed after step 2 left its checkpoint; the rerun continues from there.
    distill(loaded.model, Distillation(steps=2, **settings), slices, work_dir=tmp_path / "b", source="tiny", seed=0)
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    resumed, figures = distill(loaded.model, Distillation(steps=4, **settings), slices, work_dir=tmp_path / "b",
                               source="tiny", seed=0)
    assert figures["resumed_from_step"] == 2
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # Another recipe does not pick up that checkpoint.
    _, figures = distill(loaded.model, Distillation(steps=2, temperature=4.0, **settings), slices,
                         work_dir=tmp_path / "b", source="tiny", seed=0)
    assert figures["resumed_from_step"] == 0
