"""Measures a variant against the full model: held-out perplexity, CPU tokens/s at batch 1, greedy agreement.

Every figure is taken through the serving runner of the variant's engine (torch or llama.cpp) with the
same calls, sequences and prompts, so the quality gate compares variants of either engine like with like.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.protocol.requests import render_prompt
from stratus_workers.serve.runner import ModelRunner
from stratus_workers.serve.runner.build import build_runner

# A fixed, general-purpose prompt set (not from the corpus) for agreement and speed.
PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The best way to learn a new language is",
    "In computer science, a hash table is",
    "Once upon a time, in a small village,",
    "The main causes of climate change are",
    "To make a cup of tea, you first",
    "The theory of relativity states that",
    "A healthy breakfast usually includes",
    "The Pacific Ocean is the largest",
    "Photosynthesis is the process by which",
    "My favourite book is about",
    "The most important rule of driving is",
    "Python is a programming language that",
    "The moon orbits the Earth because",
    "A good manager should always",
    "The history of the Roman Empire began",
    "To stay healthy, doctors recommend",
    "The recipe calls for two cups of",
    "Machine learning models are trained by",
    "The train to London leaves at",
    "Dogs are popular pets because",
    "The stock market fell sharply after",
    "An email to a colleague should be",
    "The human heart has four chambers:",
    "On weekends, many families like to",
    "The first step in solving an equation is",
    "Mount Everest is located in",
    "A haiku is a short poem that",
    "Electric cars are becoming popular because",
    "The library opens every morning at",
    "Birds migrate south in winter to",
)


def runner_for(model: Any, *, rows: int, max_len: int) -> ModelRunner:
    """The serving runner for a loaded model (llama.cpp's for a GGUF artifact), on as many threads as torch.

    Every figure goes through it, so a variant is measured through the code that will serve it, and every
    variant, whatever its engine, through the same calls.
    """
    return build_runner(model, max_rows=rows, max_len=max_len, threads=torch.get_num_threads())


@torch.no_grad()
def perplexity(runner: ModelRunner, sequences: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over all predicted tokens of `sequences`."""
    total_nll = 0.0
    total_tokens = 0
    for start in tqdm(range(0, sequences.shape[0], batch_size), desc="perplexity", disable=None):
        batch = sequences[start : start + batch_size]
        for row in range(batch.shape[0]):
            runner.reset(row)
        logits = runner.forward(0, batch.tolist(), all_logits=True).float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    for row in range(min(batch_size, sequences.shape[0])):
        runner.reset(row)
    return math.exp(total_nll / total_tokens)


def prompt_ids(tokenizer: Any, count: int) -> list[list[int]]:
    """The first `count` fixed prompts' ids (PROMPTS, cycled), each as the model server renders it sent as a
    raw prompt (BOS first where the tokenizer adds it to raw text), so a variant is judged on the ids it
    will be served with."""
    return [render_prompt(tokenizer, pb.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)])) for i in range(count)]


@torch.no_grad()
def greedy_continuations(model: Any, tokenizer: Any, prompts: int, tokens: int) -> list[torch.Tensor]:
    """The model's greedy continuation (exactly `tokens` tokens, EOS not stopping it) of each fixed prompt."""
    outs = []
    for prompt in tqdm(prompt_ids(tokenizer, prompts), desc="reference continuations", disable=None):
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        outs.append(out[0])
    return outs


@torch.no_grad()
def agreement(runner: ModelRunner, references: list[torch.Tensor], tokens: int) -> float:
    """Teacher-forced greedy agreement: the fraction of the full model's greedy tokens that the variant,
    given the same prefix, also ranks first. Unlike comparing two free-running generations it does not
    punish every token after a first difference, and it is what a speculative verifier accepts."""
    if not references:
        return 1.0
    hits = 0
    total = 0
    for ref in references:
        runner.reset(0)
        logits = runner.forward(0, [ref.tolist()], all_logits=True)[0]
        predicted = logits[-tokens - 1 : -1].argmax(dim=-1)
        hits += int((predicted == ref[-tokens:]).sum())
        total += tokens
    runner.reset(0)
    return hits / total


@torch.no_grad()
def _decode_seconds(
    runner: ModelRunner, prompt: list[int], tokens: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Batch-1 greedy generation of `tokens` tokens (a prefill, then one step per further token)."""
    runner.reset(0)
    started = clock()
    logits = runner.forward(0, [prompt])
    for _ in range(tokens - 1):
        logits = runner.forward(0, [[int(torch.argmax(logits[0]))]])
    int(torch.argmax(logits[0]))
    seconds = clock() - started
    runner.reset(0)
    return seconds


def tokens_per_second(
    runners: dict[str, ModelRunner],
    tokenizer: Any,
    tokens: int,
    rounds: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Batch-1 greedy generation speed of each runner, measured in interleaved rounds (best round kept) so
    that load from other processes on a shared CPU hits every model alike.

    `clock` is wall-clock time by default; `time.thread_time` with one torch thread counts only the time the
    measuring thread ran (what a dedicated core would take), which other work on the machine cannot inflate.
    """
    prompt = prompt_ids(tokenizer, 1)[0]
    for runner in runners.values():
        _decode_seconds(runner, prompt, min(8, tokens), clock)  # warm-up: allocator, kernel selection, repacking
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(_decode_seconds(runner, prompt, tokens, clock))
    return {name: tokens / min(ts) for name, ts in times.items()} | {
        f"{name}_median": tokens / statistics.median(ts) for name, ts in times.items()
    }
