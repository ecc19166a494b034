"""Distillation: the student starts as a copy of chosen teacher layers and resumes from its checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from stratus_workers.compress.corpus import load_slices
from stratus_workers.compress.distill import (
    CHECKPOINT,
    build_student,
    distill,
    important_layer_indices,
    layer_importance,
    student_layer_indices,
)
from stratus_workers.compress.spec import Distillation
from stratus_workers.compress.training import TrainingBatches
from stratus_workers.models.loader import load_model

pytestmark = pytest.mark.unit


class Killed(Exception):
    """Stands for the Job's pod being killed mid-run."""


class DiesAtStep(TrainingBatches):
    """Real batches until `step`, then the process 'dies' (raises), as a killed Job would stop there."""

    def __init__(self, corpus: object, step: int) -> None:
        super().__init__(corpus)  # type: ignore[arg-type]
        object.__setattr__(self, "die_at", step)

    def batch(self, step: int, batch_size: int, length: int, seed: int) -> torch.Tensor:
        if step == self.die_at:  # type: ignore[attr-defined]
            raise Killed(step)
        return super().batch(step, batch_size, length, seed)


def test_layer_choice_keeps_first_and_last() -> None:
    half = student_layer_indices(30, 15)
    assert len(half) == 15 and half[0] == 0 and half[-1] == 29
    assert {b - a for a, b in itertools.pairwise(half)} <= {2, 3}  # evenly spread
    assert student_layer_indices(2, 1) == [1]
    assert student_layer_indices(4, 2) == [0, 3]


def test_importance_keeps_first_last_and_the_layers_that_change_most() -> None:
    importance = [0.5, 0.01, 0.3, 0.02, 0.2, 0.03, 0.4]
    assert important_layer_indices(importance, 4) == [0, 2, 4, 6]
    assert important_layer_indices(importance, 3) == [0, 2, 6]
    assert important_layer_indices(importance, 1) == [6]
    # Ties go to the earlier layer, so the choice never depends on sort stability.
    assert important_layer_indices([1.0, 0.1, 0.1, 0.1, 1.0], 3) == [0, 1, 4]


def test_layer_importance_measures_each_layer_on_text(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    calibration = load_slices(loaded.tokenizer).sequences("calibration", 2, 32, field="test")
    importance = layer_importance(loaded.model, calibration)
    assert len(importance) == 2 and all(0.0 < v < 2.0 for v in importance)
    # A layer whose output equals its input (zeroed output projections) changes nothing: importance 0.
    with torch.no_grad():
        loaded.model.model.layers[1].self_attn.o_proj.weight.zero_()
        loaded.model.model.layers[1].mlp.down_proj.weight.zero_()
    assert layer_importance(loaded.model, calibration)[1] == pytest.approx(0.0, abs=1e-6)


def test_student_starts_as_the_teachers_layers(tiny_model_dir: Path) -> None:
    teacher = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    student, keep = build_student(teacher, 1)
    assert keep == [1]
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert student.model.layers[0].self_attn.layer_idx == 0  # renumbered, so the KV cache indexes it right
    ids = torch.tensor([[1, 2, 3, 4]])
    assert student(input_ids=ids).logits.shape == teacher(input_ids=ids).logits.shape
    student, keep = build_student(teacher, 1, [0])
    assert keep == [0] and torch.equal(student.model.layers[0].mlp.up_proj.weight,
                                       teacher.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="distinct teacher layers"):
        build_student(teacher, 1, [2])


def test_killed_distillation_resumes_to_the_same_student(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    slices = load_slices(loaded.tokenizer)
    data = TrainingBatches(slices)
    # Cosine with warm-up: the learning rate of every step depends on the total, so a resume must follow it.
    spec = Distillation(student_layers=1, batch_size=2, sequence_length=32, learning_rate=1e-3, checkpoint_every=2,
                        steps=5, warmup_steps=2, schedule="cosine")
    straight, figures = distill(loaded.model, spec, data, work_dir=tmp_path / "a", source="tiny", seed=0)
    assert figures["resumed_from_step"] == 0 and figures["training_tokens"] == 5 * 2 * 32
    with pytest.raises(Killed):
        distill(loaded.model, spec, DiesAtStep(slices, 3), work_dir=tmp_path / "b", source="tiny", seed=0)
    assert (tmp_path / "b" / CHECKPOINT).is_file()  # written after step 2
    resumed, figures = distill(loaded.model, spec, data, work_dir=tmp_path / "b", source="tiny", seed=0)
    assert figures["resumed_from_step"] == 2
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # Another recipe, or other training text, does not pick up that checkpoint.
    _, figures = distill(loaded.model, spec.model_copy(update={"temperature": 4.0}), data, work_dir=tmp_path / "b",
                         source="tiny", seed=0)
    assert figures["resumed_from_step"] == 0
    _, figures = distill(loaded.model, spec, data, work_dir=tmp_path / "b", source="tiny", seed=0,
                         data_key="generated")
    assert figures["resumed_from_step"] == 0


def test_hidden_state_matching_trains_and_leaves_no_hooks(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    data = TrainingBatches(load_slices(loaded.tokenizer))
    spec = Distillation(student_layers=1, batch_size=2, sequence_length=32, learning_rate=1e-3, steps=3,
                        alpha=1.0, hidden_weight=1.0)
    student, figures = distill(loaded.model, spec, data, work_dir=tmp_path, source="tiny", seed=0)
    assert figures["first_loss"] != figures["last_loss"]
    assert all(not layer._forward_hooks for layer in loaded.model.model.layers)
    assert all(not layer._forward_hooks for layer in student.model.layers)
