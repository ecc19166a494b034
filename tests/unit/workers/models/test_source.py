"""Model sources parse into typed sources; bad ones fail fast with a message saying what to use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stratus_workers.models import ModelLoadError, SourceKind, load_model, parse_source

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "kind", "ref"),
    [
        ("bundled://smollm2-135m-instruct", SourceKind.BUNDLED, "smollm2-135m-instruct"),
        ("/models/x", SourceKind.LOCAL, "/models/x"),
        ("file:///models/x", SourceKind.LOCAL, "/models/x"),
        ("hf://HuggingFaceTB/SmolLM2-135M", SourceKind.HF, "HuggingFaceTB/SmolLM2-135M"),
        ("pvc://models/smol", SourceKind.PVC, "models/smol"),
    ],
)
def test_parse(text: str, kind: SourceKind, ref: str) -> None:
    source = parse_source(text)
    assert (source.kind, source.ref) == (kind, ref)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("ftp://x", "unknown model source scheme"),
        ("bundled://llama-70b", "unknown bundled model"),
        ("hf://", "names nothing"),
    ],
)
def test_parse_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_source(text)


def test_hf_without_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub is not reachable"):
        load_model("hf://no-such-org/no-such-model", device="cpu")


def test_missing_and_non_model_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "absent"), device="cpu")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"), device="cpu")


def test_local_directory_loads(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert loaded.parameters > 0 and loaded.name == tiny_model_dir.name
    assert loaded.tokenizer.chat_template
