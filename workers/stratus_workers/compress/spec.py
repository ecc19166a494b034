"""The compression Job's contract: its input (recipe, evaluation, gate), its summary and its exit codes.

These types are the single source for the `compression`, `evaluation` and `gate` fields of an
`LLMDeployment` edge variant: the operator's spec model embeds them and the CRD schema is
generated from them. `CompressionSummary` and `ExitCode` are what the Job reports back; the worker
writes them and the operator reads them with the same types. Nothing here imports torch.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from stratus_workers.runtimes import RUNTIME_LLAMACPP, RUNTIME_TORCH, GGUFType, Runtime
from stratus_workers.spec_model import SpecModel


class Quantization(SpecModel):
    """Weight quantization, applied last."""

    method: Literal["int8-weight", "int4-weight", "int8-dynamic", "gguf"] = Field(
        description="int8-weight: per-channel int8 weights; int4-weight: group-wise int4 weights; "
        "int8-dynamic: int8 weights and dynamically quantized activations (CPU speed); "
        "gguf: a GGUF file quantized by llama.cpp to ggufType, served by llama.cpp."
    )
    gguf_type: GGUFType = Field(
        "q8_0",
        description="llama.cpp weight type for method gguf (q8_0, q4_0, q4_k_m, ...; other methods ignore it); "
        "K-quants fall back to a similar type for tensors whose rows are not a multiple of 256.",
    )
    group_size: Literal[32, 64, 128] = Field(
        64,
        description="Group size for int4-weight; must divide every linear's input dimension "
        "(SmolLM2's 576 takes 32 or 64, not 128).",
    )
    embedding_bits: Literal[8, 4] = Field(
        8,
        description="Bits for the token embedding and the tied LM head: 8 (int8 per row, any method) or 4 "
        "(group-wise like the linears; int4-weight only).",
    )

    @model_validator(mode="after")
    def _int4_embedding_needs_int4(self) -> Quantization:
        if self.embedding_bits == 4 and self.method != "int4-weight":
            raise ValueError(f"embeddingBits: 4 needs method int4-weight, not {self.method}")
        return self


Schedule = Literal["constant", "cosine"]
SCHEDULE_HELP = "Learning rate over the run: constant, or cosine from the peak down to a tenth of it at the last step."


class TrainingText(SpecModel):
    """What distillation and pruning recovery train on: the corpus' training slice, text the full model writes, or both.

    Generated text is the usual way to distil without a dataset: the full model's sampled continuations of
    varied prompts, so the student learns the teacher where the teacher itself goes.
    """

    generated_sequences: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="Sequences the full model writes to train on (0: the corpus' training slice alone); cached in "
        "the work directory, so a restarted Job does not write them again.",
    )
    generated_length: int = Field(256, ge=16, le=2048, description="Tokens per generated sequence, prompt included.")
    generation_batch_size: int = Field(
        64, ge=1, le=65536, description="Sequences generated together (thousands on a GPU, tens on a CPU)."
    )
    generation_temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature of the teacher.")
    generation_top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens "
                                    "holding this probability mass.")
    corpus_share: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Fraction of each training batch taken from the corpus' training slice when generated text "
        "exists (the rest is generated text).",
    )


class Pruning(SpecModel):
    """Weight pruning of the linear layers, applied after distillation."""

    method: Literal["magnitude", "wanda"] = Field(description="magnitude, or Wanda (|W|·‖X‖, calibrated on text).")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="Fraction of weights set to zero (unstructured).")
    pattern: Literal["unstructured", "2:4"] = Field("unstructured", description="2:4 keeps 2 of every 4 weights.")
    calibration_samples: int = Field(32, ge=1, le=4096, description="Calibration sequences for Wanda.")
    recovery_steps: int = Field(0, ge=0, le=100000, description="Fine-tuning steps after pruning (0: none).")
    recovery_learning_rate: float = Field(5e-5, gt=0.0, le=1.0, description="Learning rate of the recovery fine-tune.")
    recovery_batch_size: int = Field(4, ge=1, le=1024, description="Sequences per recovery step.")
    recovery_sequence_length: int = Field(128, ge=8, le=1024, description="Tokens per recovery sequence.")
    recovery_temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Softmax temperature of the recovery's KL to the dense model."
    )
    recovery_schedule: Schedule = Field("cosine", description=SCHEDULE_HELP)
    recovery_warmup_steps: int = Field(0, ge=0, le=100000, description="Steps of linear learning-rate warm-up.")

    @model_validator(mode="after")
    def _two_four_is_half(self) -> Pruning:
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"sparsity: the 2:4 pattern prunes exactly 0.5, got {self.sparsity}")
        return self


class Distillation(SpecModel):
    """Knowledge distillation into a shallower student initialised from the teacher's layers."""

    student_layers: int = Field(ge=1, le=512, description="Decoder layers in the student.")
    steps: int = Field(200, ge=0, le=1000000, description="Training steps.")
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="Softmax temperature for the KL term.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the KL term; 1-alpha weighs cross-entropy.")
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    batch_size: int = Field(4, ge=1, le=1024)
    sequence_length: int = Field(256, ge=8, le=1024, description="Tokens per training sequence.")
    checkpoint_every: int = Field(
        25, ge=1, le=1000000, description="Steps between checkpoints; a restarted Job resumes from the last."
    )
    layer_selection: Literal["even", "importance"] = Field(
        "importance",
        description="Which teacher layers the student starts from: even (evenly spaced, first and last kept) or "
        "importance (the layers that change their input most on calibration text, first and last kept).",
    )
    hidden_weight: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="Weight of hidden-state matching: each student layer's output against the output of the "
        "teacher layer it was copied from (mean squared error over the teacher's mean square); 0: logits only.",
    )
    schedule: Schedule = Field("cosine", description=SCHEDULE_HELP)
    warmup_steps: int = Field(0, ge=0, le=1000000, description="Steps of linear learning-rate warm-up.")


class CompressionRecipe(SpecModel):
    """Any of distillation, pruning and quantization, applied in that order."""

    distillation: Distillation | None = None
    pruning: Pruning | None = None
    quantization: Quantization | None = None
    training_text: TrainingText = Field(
        default_factory=TrainingText, description="What distillation and pruning recovery train on."
    )

    @property
    def summary(self) -> str:
        """A short description such as 'distill:15L+prune:wanda-0.5+quantize:int8-weight'."""
        parts = []
        if self.distillation:
            parts.append(f"distill:{self.distillation.student_layers}L")
        if self.pruning:
            amount = self.pruning.pattern if self.pruning.pattern == "2:4" else self.pruning.sparsity
            parts.append(f"prune:{self.pruning.method}-{amount}")
        if self.quantization:
            q = self.quantization
            parts.append(f"quantize:gguf-{q.gguf_type}" if q.method == "gguf" else f"quantize:{q.method}")
        return "+".join(parts) or "none"

    @property
    def runtime(self) -> Runtime:
        """The engine that serves the result: llama.cpp for a GGUF file, torch for everything else."""
        if self.quantization and self.quantization.method == "gguf":
            return RUNTIME_LLAMACPP
        return RUNTIME_TORCH


class Evaluation(SpecModel):
    """How the variant is measured."""

    perplexity_samples: int = Field(32, ge=1, le=100000, description="Held-out sequences for perplexity.")
    sequence_length: int = Field(256, ge=8, le=1024, description="Tokens per perplexity sequence.")
    speed_tokens: int = Field(64, ge=1, le=4096, description="Tokens generated to measure CPU tokens/s.")
    agreement_prompts: int = Field(16, ge=0, le=10000, description="Prompts for greedy agreement with the full model.")
    agreement_tokens: int = Field(32, ge=1, le=4096)


class QualityGate(SpecModel):
    """Limits a variant must meet to be deployed; unset limits are not checked."""

    max_perplexity_increase: float | None = Field(
        None, ge=0.0, description="Largest allowed relative perplexity increase (0.05 = +5%)."
    )
    min_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="Smallest greedy agreement with the full model."
    )
    max_size_ratio: float | None = Field(None, gt=0.0, description="Largest allowed size relative to the fp32 model.")


class CompressionJobSpec(SpecModel):
    """Everything one compression Job needs: the JSON given to `python -m stratus_workers.compress --spec`."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="The edge variant's name (a DNS label).",
    )
    model_source: str = Field(min_length=1, description="Where the full model comes from (bundled://, a path, ...).")
    compression: CompressionRecipe = Field(default_factory=CompressionRecipe)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    gate: QualityGate = Field(default_factory=QualityGate)
    seed: int = Field(0, ge=0)


class ExitCode(enum.IntEnum):
    """How `python -m stratus_workers.compress` exits; the Job's podFailurePolicy is written from these."""

    OK = 0
    # A crash (an exception, an OOM kill reads as 137): worth a retry with the Job's back-off.
    FAILED = 1
    # A verdict, not a flake: the spec or the model is unusable; running it again cannot help.
    BAD_INPUT = 2
    # A verdict: the variant did not pass its quality gate.
    REJECTED = 3


# The exit codes that end a Job at once instead of being retried.
VERDICT_EXIT_CODES: tuple[ExitCode, ...] = (ExitCode.BAD_INPUT, ExitCode.REJECTED)

CompressionStatus = Literal["accepted", "rejected", "failed"]


class CompressionSummary(SpecModel):
    """The Job's one-line JSON report: last on stdout and its termination message; the operator parses it.

    A failed run carries only name, status and reasons; a finished one every figure of its evaluation.
    """

    # An operator older than its workers image reads figures it does not know: skipped, not fatal.
    model_config = ConfigDict(extra="ignore")

    name: str = Field(description="The edge variant (empty when the spec could not be read).")
    status: CompressionStatus
    reasons: list[str] = Field(default_factory=list, description="Why the gate rejected it or the run failed.")
    recipe: str | None = Field(None, description="The recipe summary, e.g. quantize:int8-weight.")
    artifact: str | None = Field(None, description="The artifact directory the Job wrote.")
    # "bytes" on the wire, as in the artifact manifest's figures.
    size_bytes: int | None = Field(None, alias="bytes", ge=0, description="Weight bytes of the artifact.")
    size_ratio: float | None = Field(None, description="Size relative to the fp32 model.")
    perplexity: float | None = None
    full_perplexity: float | None = None
    perplexity_increase: float | None = Field(None, description="Relative to the full model (0.05 = +5%).")
    tokens_per_second: float | None = None
    full_tokens_per_second: float | None = None
    agreement: float | None = Field(None, description="Greedy agreement with the full model.")
    sparsity: float | None = Field(None, description="Measured sparsity, for pruned variants.")
    kv_bytes_per_token: int | None = Field(
        None, ge=0, description="KV-cache bytes per token as its engine stores them (sizes a llama.cpp server)."
    )
    seconds: float | None = Field(None, description="Wall time of the whole run.")
    device: str | None = Field(None, description="Where the Job trained and calibrated, e.g. 'cuda (NVIDIA H200)'.")
    speed_device: str | None = Field(
        None,
        description="Where tokensPerSecond was measured: the CPU (the edge's kind of device), wherever the Job ran.",
    )
    training_tokens: int | None = Field(
        None, ge=0, description="Tokens the distillation and recovery steps trained on (generated and corpus)."
    )

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def to_json(self) -> str:
        """The one line the worker prints: camelCase keys, unset figures left out."""
        return self.model_dump_json(by_alias=True, exclude_none=True)
