"""Training text written by the full model itself: sampled continuations of varied prompts, cached in chunks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.compress.spec import TrainingText
from stratus_workers.compress.training import autocast
from stratus_workers.protocol.requests import render_prompt

log = logging.getLogger(__name__)

# Prompts are topics x tasks, sent as chat requests (an instruct model is distilled on the answers it gives),
# plus plain-text openings sent as raw prompts (the same model continuing prose); `prompt_ids` renders both
# as the model server does. None of them is one of the evaluation's agreement prompts (tests check), so
# agreement stays a held-out measure.
TOPICS: tuple[str, ...] = (
    "volcanoes", "the French Revolution", "black holes", "bread baking", "chess openings", "honey bees",
    "the immune system", "jazz music", "solar panels", "the stock exchange", "ancient Egypt", "rain forests",
    "electric guitars", "the printing press", "coral reefs", "marathon training", "supply chains", "glaciers",
    "public libraries", "quantum computers", "the Silk Road", "vaccines", "tax returns", "wind turbines",
    "origami", "the human brain", "submarines", "coffee farming", "medieval castles", "earthquakes",
    "job interviews", "recycling plastic", "the Olympic Games", "spiders", "bicycle repair", "satellites",
    "the water cycle", "renting an apartment", "photography", "the Roman Senate", "desert plants",
    "password security", "sourdough starters", "whales", "city planning", "the piano", "fungi",
    "first aid", "the moon landing", "board games", "airport security", "climate models", "tea ceremonies",
    "database indexes", "the Great Wall of China", "penguins", "learning to swim", "inflation", "comets",
    "knitting", "the periodic table", "hiking safety", "film editing", "democracy", "bridges",
    "garden composting", "operating systems", "the Amazon river", "sleep", "wolves", "poetry",
    "budgeting", "electric cars", "mountain weather", "the Renaissance", "dinosaurs", "friendship",
    "open source software", "tides", "music theory", "vegetable soup", "the internet", "lightning",
    "team sports", "railways", "antibiotics", "museums", "the Arctic", "time zones", "social media",
)
TASKS: tuple[str, ...] = (
    "Explain {topic} to a ten-year-old.",
    "Write a short story that involves {topic}.",
    "List five surprising facts about {topic}.",
    "What are the main arguments for and against {topic}?",
    "Give me step-by-step advice related to {topic}.",
    "Write a short poem about {topic}.",
    "Summarise the history of {topic} in a paragraph.",
    "What questions would an expert ask about {topic}?",
    "Write an email to a friend telling them about {topic}.",
    "Compare {topic} with something from everyday life.",
    "What are common misconceptions about {topic}?",
    "Describe a day in the life of someone who works with {topic}.",
)
OPENINGS: tuple[str, ...] = (
    "Here is a short article about {topic}.\n\n",
    "Chapter 1: {topic}\n\n",
    "Notes from a lecture on {topic}:\n",
    "Q: What should everyone know about {topic}?\nA:",
)
CHUNK_DIR = "teacher-text"


def prompt_texts() -> list[tuple[str, bool]]:
    """Every prompt as (text, sent as a chat?), in a fixed order."""
    chats = [(task.format(topic=t), True) for t in TOPICS for task in TASKS]
    plain = [(opening.format(topic=t), False) for t in TOPICS for opening in OPENINGS]
    return chats + plain


def prompt_ids(tokenizer: Any) -> list[list[int]]:
    """Every prompt's token ids, in `prompt_texts` order: those the model server gives the same request.

    A chat prompt is a chat of one user message, an opening a raw prompt, both rendered by the function the
    server and the router render requests with, so the student is distilled on the ids it will be asked with
    (the model's chat template, or the server's `role: content` text for a model without one; BOS where
    the tokenizer adds it to raw text).
    """
    return [render_prompt(tokenizer, _request(text, chat)) for text, chat in prompt_texts()]


def _request(text: str, chat: bool) -> pb.GenerateRequest:
    if chat:
        return pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=text)]))
    return pb.GenerateRequest(prompt=text)


def fingerprint(spec: TrainingText, source: str, seed: int, prompts: list[list[int]]) -> str:
    """Identifies one generated text: a Job with the same settings reuses it, another writes its own.

    `prompts` is `prompt_ids(tokenizer)`: the ids the teacher continues, so a change to a prompt's wording
    or to how prompts are rendered (a release that changes either) is another text, not a stale cache hit.
    """
    # The number of sequences is left out: chunk i is the same text whatever the total, so a Job asking for more
    # reuses the chunks already written and adds the rest.
    settings = spec.model_dump(exclude={"corpus_share", "generated_sequences"})
    rendered = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    text = json.dumps({"text": settings, "source": source, "seed": seed, "prompts": rendered}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save(path: Path, tensor: torch.Tensor) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(tensor, tmp)
    os.replace(tmp, path)  # a Job killed mid-write leaves no torn chunk behind


def _load(path: Path) -> torch.Tensor | None:
    try:
        chunk = torch.load(path, weights_only=True)
    except Exception as exc:  # a torn file fails in many ways inside the unpickler; all mean 'not usable'
        log.warning("ignoring an unreadable generated-text chunk", extra={"path": str(path), "error": str(exc)})
        return None
    return chunk if isinstance(chunk, torch.Tensor) and chunk.dtype == torch.int32 else None


@torch.no_grad()
def _generate_chunk(
    teacher: Any, tokenizer: Any, prompts: list[list[int]], spec: TrainingText, device: torch.device
) -> tuple[torch.Tensor, int]:
    """One batch of sampled sequences, each cut after its first end-of-sequence token, packed end to end."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every row continues from its last prompt token
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    new_tokens = max(1, spec.generated_length - width)
    with autocast(device):
        out = teacher.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=True,
            temperature=spec.generation_temperature,
            top_p=spec.generation_top_p,
            top_k=0,
            pad_token_id=pad,
            eos_token_id=eos,
        )
    out = out.cpu()
    pieces = []
    new_count = 0
    for row, prompt in enumerate(prompts):
        continuation = out[row, width:].tolist()
        if eos is not None and eos in continuation:
            continuation = continuation[: continuation.index(eos) + 1]
        new_count += len(continuation)
        pieces.append(torch.tensor(prompt + continuation, dtype=torch.int32))
    return torch.cat(pieces), new_count


def generate_text(
    teacher: Any, tokenizer: Any, spec: TrainingText, *, work_dir: Path, source: str, seed: int, device: torch.device
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The teacher's packed training text (one int32 stream) and figures; chunks already on disk are reused."""
    encoded = prompt_ids(tokenizer)
    folder = work_dir / CHUNK_DIR / fingerprint(spec, source, seed, encoded)
    folder.mkdir(parents=True, exist_ok=True)
    encoded = [p[-(spec.generated_length - 1) :] for p in encoded]  # at least one token is generated; the cue kept
    order = list(range(len(encoded)))
    n_chunks = -(-spec.generated_sequences // spec.generation_batch_size)
    chunks: list[torch.Tensor] = []
    reused = 0
    new_tokens = 0
    started = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    for index in tqdm(range(n_chunks), desc="teacher text", disable=None):
        rows = min(spec.generation_batch_size, spec.generated_sequences - index * spec.generation_batch_size)
        path = folder / f"chunk-{index:06d}-{rows}.pt"  # a short last chunk is not a whole one of a longer run
        chunk = _load(path) if path.is_file() else None
        if chunk is not None:
            chunks.append(chunk)
            reused += 1
            continue
        # Each chunk's prompts and sampling noise depend only on (seed, chunk), so a resumed Job writes the
        # chunks it lacks as an uninterrupted one would have (up to GPU non-determinism).
        rng = random.Random(seed * 1_000_003 + index)
        prompts = [encoded[rng.choice(order)] for _ in range(rows)]
        torch.manual_seed(seed * 1_000_003 + index)
        chunk, count = _generate_chunk(teacher, tokenizer, prompts, spec, device)
        new_tokens += count
        _save(path, chunk)
        chunks.append(chunk)
        log.info("generated text chunk", extra={"chunk": index + 1, "chunks": n_chunks, "tokens": int(chunk.numel()),
                                                "seconds": round(time.perf_counter() - started, 1)})
    teacher.train(was_training)
    stream = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int32)
    seconds = time.perf_counter() - started
    figures = {
        "sequences": spec.generated_sequences,
        "tokens": int(stream.numel()),
        "chunks_reused": reused,
        "chunks": n_chunks,
        "seconds": round(seconds, 1),
        "generated_tokens_per_second": round(new_tokens / seconds) if new_tokens and seconds > 0 else None,
        "prompts": len(encoded),
    }
    return stream, figures
