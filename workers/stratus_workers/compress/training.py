"""What distillation and pruning recovery share: device, mixed precision, LR schedule, KD loss, batches."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from stratus_workers.compress.corpus import BLOCK_TOKENS, CorpusSlices
from stratus_workers.compress.spec import Schedule

log = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cpu", "cuda"]
# The cosine schedule ends at this fraction of the peak learning rate rather than at zero.
FINAL_LR_FRACTION = 0.1


class DeviceUnavailable(RuntimeError):
    """--device cuda on a machine where torch sees no CUDA device."""


def resolve_device(choice: str) -> torch.device:
    """auto: CUDA when torch sees a GPU, else the CPU; cuda: a GPU or DeviceUnavailable."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice not in ("auto", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {choice!r}")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cuda":
        raise DeviceUnavailable(
            "--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); check the pod's "
            "nvidia.com/gpu limit and the node's driver, or run with --device auto to train on the CPU"
        )
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """'cpu', or 'cuda (NVIDIA H200)': the summary's and the manifest's name for where the Job computed."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (fp32 master weights and optimizer state); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer(params: list[torch.Tensor], lr: float, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel is one launch per step instead of several per parameter: worth it on a GPU.
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")


def learning_rate(step: int, total: int, peak: float, *, warmup: int, schedule: Schedule) -> float:
    """The learning rate of 0-based `step`: linear warm-up over `warmup` steps, then constant or cosine."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return peak * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher_T ‖ student_T), averaged over tokens, in fp32 whatever the logits' dtype.

    T² keeps the soft targets' gradient scale independent of T (Hinton et al.).
    """
    vocab = student_logits.shape[-1]
    student = torch.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


@dataclass(frozen=True)
class TrainingBatches:
    """Training batches drawn from the corpus' training slice and, when there is any, the teacher's text.

    A batch is a pure function of (seed, step): a resumed run sees exactly the data an uninterrupted one does.
    """

    corpus: CorpusSlices
    generated: torch.Tensor | None = None  # one int32 stream of the teacher's packed sequences
    corpus_share: float = 1.0

    def corpus_rows(self, batch_size: int) -> int:
        if self.generated is None:
            return batch_size
        return min(batch_size, round(batch_size * self.corpus_share))

    def check(self, length: int, *, field: str) -> None:
        """ValueError naming `field` when sequences of `length` tokens cannot be cut from the sources."""
        if length > BLOCK_TOKENS:
            raise ValueError(f"{field}: {length} tokens is longer than a corpus block ({BLOCK_TOKENS} tokens)")
        if self.generated is not None and self.generated.numel() < length + 1:
            raise ValueError(
                f"{field}: {length} tokens is longer than the generated text ({self.generated.numel()} tokens); "
                "raise compression.trainingText.generatedSequences"
            )

    def batch(self, step: int, batch_size: int, length: int, seed: int) -> torch.Tensor:
        n_corpus = self.corpus_rows(batch_size)
        rows = [self.corpus.train_batch(step, n_corpus, length, seed)] if n_corpus else []
        n_generated = batch_size - n_corpus
        if n_generated and self.generated is not None:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_777_777)
            starts = torch.randint(0, self.generated.numel() - length + 1, (n_generated,), generator=gen)
            rows.append(torch.stack([self.generated[s : s + length] for s in starts.tolist()]).to(torch.int64))
        return torch.cat(rows)


@contextlib.contextmanager
def progress_log(stage: str, total: int, start: int, tokens_per_step: int) -> Iterator[Any]:
    """A callback `report(step, **figures)` that logs one structured line every ~5% of the run (and the last)."""
    every = max(1, total // 20)
    started = time.perf_counter()

    def report(step: int, **figures: float) -> None:
        done = step + 1
        if done % every and done != total:
            return
        elapsed = time.perf_counter() - started
        rate = (done - start) * tokens_per_step / elapsed if elapsed > 0 else 0.0
        log.info(
            "training progress",
            extra={"stage": stage, "step": done, "steps": total, "tokens_per_second": round(rate),
                   "seconds": round(elapsed, 1), **{k: round(v, 6) for k, v in figures.items()}},
        )

    yield report
