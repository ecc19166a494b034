"""Teacher-written training text: varied prompts kept apart from evaluation, chunks cached for a restarted Job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.compress import evaluate
from stratus_workers.compress.spec import TrainingText
from stratus_workers.compress.teacher_text import CHUNK_DIR, fingerprint, generate_text, prompt_ids, prompt_texts
from stratus_workers.models.loader import load_model
from stratus_workers.protocol.requests import prompt_text
from stratus_workers.serve.prompts import PromptEncoder

pytestmark = pytest.mark.unit


def test_prompts_are_varied_and_none_is_an_evaluation_prompt() -> None:
    prompts = prompt_texts()
    texts = [t for t, _ in prompts]
    assert len(set(texts)) == len(texts) >= 1000
    assert any(chat for _, chat in prompts) and not all(chat for _, chat in prompts)
    lowered = [t.lower() for t in texts]
    for held_out in evaluate.PROMPTS:  # agreement is measured on these: training must not see them
        assert not any(held_out.lower() in t for t in lowered), held_out


@pytest.mark.parametrize("kind", ["instruct", "base", "llama"])
def test_prompts_are_the_ids_the_model_server_gives_the_same_request(tokenizers: dict[str, Any], kind: str) -> None:
    """The student learns on what it will be asked: a chat prompt is a chat request of one user message, an
    opening a raw prompt, each tokenized as the model server's frontend tokenizes that request."""
    tokenizer = tokenizers[kind]
    frontend = PromptEncoder(tokenizer)
    served = []
    for text, chat in prompt_texts():
        message = pb.ChatMessage(role="user", content=text)
        request = pb.GenerateRequest(chat=pb.ChatInput(messages=[message])) if chat else pb.GenerateRequest(prompt=text)
        served.append(frontend.encode(*prompt_text(tokenizer, request)))
    assert prompt_ids(tokenizer) == served
    # What that means, written out for one prompt of each kind.
    chats = [p for (_, chat), p in zip(prompt_texts(), prompt_ids(tokenizer), strict=True) if chat]
    plain = [p for (_, chat), p in zip(prompt_texts(), prompt_ids(tokenizer), strict=True) if not chat]
    assert prompt_texts()[0] == ("Explain volcanoes to a ten-year-old.", True)
    chat_text = tokenizer.decode(chats[0])
    if kind == "base":  # the server's plain rendering of a chat, for a model without a template
        assert chat_text == "user: Explain volcanoes to a ten-year-old.\nassistant:"
    else:
        assert chat_text.endswith("<|im_start|>user\nExplain volcanoes to a ten-year-old.<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert (plain[0][0] == tokenizer.bos_token_id) == (kind == "llama")


def test_generated_text_is_cached_per_chunk_and_reused(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    spec = TrainingText(generated_sequences=5, generated_length=40, generation_batch_size=2)
    cpu = torch.device("cpu")
    stream, figures = generate_text(loaded.model, loaded.tokenizer, spec, work_dir=tmp_path, source="tiny", seed=0,
                                    device=cpu)
    assert stream.dtype == torch.int32 and figures["chunks"] == 3 and figures["chunks_reused"] == 0
    # 5 sequences, each a prompt plus at most generatedLength - prompt tokens (cut at end-of-sequence).
    assert 5 * 2 < stream.numel() <= 5 * 40 and figures["tokens"] == stream.numel()
    prompts = prompt_ids(loaded.tokenizer)
    cues = [p[-(spec.generated_length - 1) :] for p in prompts]
    assert any(stream[: len(cue)].tolist() == cue for cue in cues)  # the teacher continues the rendered prompts
    folder = tmp_path / CHUNK_DIR / fingerprint(spec, "tiny", 0, prompts)
    chunks = sorted(folder.glob("chunk-*.pt"))
    assert len(chunks) == 3
    again, figures = generate_text(loaded.model, loaded.tokenizer, spec, work_dir=tmp_path, source="tiny", seed=0,
                                   device=cpu)
    assert figures["chunks_reused"] == 3 and torch.equal(again, stream)
    # A Job killed while writing chunk 2 left chunks 0 and 1: only chunk 2 is written again, the same way.
    chunks[2].unlink()
    resumed, figures = generate_text(loaded.model, loaded.tokenizer, spec, work_dir=tmp_path, source="tiny", seed=0,
                                     device=cpu)
    assert figures["chunks_reused"] == 2 and torch.equal(resumed, stream)
    # A torn chunk is written again rather than trusted.
    chunks[1].write_bytes(b"torn")
    _, figures = generate_text(loaded.model, loaded.tokenizer, spec, work_dir=tmp_path, source="tiny", seed=0,
                               device=cpu)
    assert figures["chunks_reused"] == 2
    # Asking for more sequences keeps the whole chunks and writes the rest (the short last chunk included).
    more, figures = generate_text(loaded.model, loaded.tokenizer, spec.model_copy(update={"generated_sequences": 6}),
                                  work_dir=tmp_path, source="tiny", seed=0, device=cpu)
    assert figures["chunks_reused"] == 2 and figures["chunks"] == 3
    whole = sum(int(torch.load(c, weights_only=True).numel()) for c in chunks[:2])
    assert torch.equal(more[:whole], stream[:whole]) and (folder / "chunk-000002-2.pt").is_file()
    # Other settings are another text; the corpus share only mixes batches and does not change it.
    key = fingerprint(spec, "tiny", 0, prompts)
    assert fingerprint(spec.model_copy(update={"generation_temperature": 0.7}), "tiny", 0, prompts) != key
    assert fingerprint(spec.model_copy(update={"corpus_share": 0.9}), "tiny", 0, prompts) == key
    # So is a prompt rendered otherwise (reworded, or another tokenizer or rendering), with as many prompts.
    reworded = [*prompts[:-1], prompts[-1][:-1]]
    assert fingerprint(spec, "tiny", 0, reworded) != key
