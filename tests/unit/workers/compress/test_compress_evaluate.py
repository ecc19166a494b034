"""The quality gate's measures: the prompts it judges a variant on, and the clock tokens/s is read on."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.compress import evaluate, job
from stratus_workers.compress.spec import CompressionJobSpec
from stratus_workers.models.loader import load_model
from stratus_workers.protocol.requests import prompt_text
from stratus_workers.serve.prompts import PromptEncoder

pytestmark = pytest.mark.unit

def test_tokens_per_second_reads_the_given_clock(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    runner = evaluate.runner_for(loaded.model, rows=1, max_len=64)
    ticks = itertools.count()
    # Each decode reads the clock twice (start, end): a clock that advances 1 s per read makes every decode 1 s.
    speed = evaluate.tokens_per_second({"v": runner}, loaded.tokenizer, 8, rounds=2, clock=lambda: float(next(ticks)))
    assert speed["v"] == speed["v_median"] == 8.0
    assert next(ticks) == 2 * (1 + 2)  # the warm-up and two rounds, each timed on that clock

@pytest.mark.parametrize("kind", ["instruct", "base", "llama"])
def test_agreement_continues_the_ids_the_model_server_gives_the_prompts(
    tiny_model_dir: Path, tokenizers: dict[str, Any], kind: str
) -> None:
    """A variant is judged on the ids it will be served with: each reference continues its prompt as the model
    server's frontend tokenizes that prompt sent as a raw request (BOS first where the tokenizer adds it)."""
    tokenizer = tokenizers[kind]
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    references = evaluate.greedy_continuations(loaded.model, tokenizer, 3, 4)
    frontend = PromptEncoder(tokenizer)
    assert len(references) == 3
    for text, reference in zip(evaluate.PROMPTS, references, strict=False):
        served = frontend.encode(*prompt_text(tokenizer, pb.GenerateRequest(prompt=text)))
        assert reference[:-4].tolist() == served
        assert (served[0] == tokenizer.bos_token_id) == (kind == "llama")
    if kind != "llama":  # SmolLM2's, with or without a template: every prompt's ids are those the gate used before
        before = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in evaluate.PROMPTS]
        assert evaluate.prompt_ids(tokenizer, len(evaluate.PROMPTS)) == before
    # The variant's runner is fed those very ids: the full model agrees with itself on every token.
    runner = evaluate.runner_for(loaded.model, rows=1, max_len=max(len(r) for r in references) + 1)
    assert evaluate.agreement(runner, references, 4) == 1.0

def test_full_model_baseline_is_cached_per_prompt_rendering(
    make_spec: Callable[..., CompressionJobSpec], tokenizers: dict[str, Any]
) -> None:
    """The cached references are ids: a tokenizer that renders the prompts otherwise (BOS added) gets its own,
    one that renders them alike (a raw prompt does not use the chat template) shares them."""
    spec = make_spec({"quantization": {"method": "int8-weight"}})
    keys = {kind: job._baseline_key(spec, tokenizer) for kind, tokenizer in tokenizers.items()}
    assert keys["instruct"] == keys["base"] != keys["llama"]
