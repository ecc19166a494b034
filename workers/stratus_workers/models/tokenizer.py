"""Loads a model source's tokenizer alone, without its weights (the router counts and drafts tokens with it).

Importing this module loads no torch; transformers' AutoTokenizer may load it when a tokenizer is
actually read (see docs/cooperation.md).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from stratus_workers.models.files import (
    ModelLoadError,
    bundled_gguf,
    bundled_model_dir,
    cache_dir,
    ensure_dir,
    file_lock,
    local_dir,
    parse_model_source,
    read_artifact_manifest,
    require_hub,
)
from stratus_workers.models.source import SourceKind


def load_tokenizer(source: str) -> Any:
    """Load only the tokenizer of `source` (cheap: no weights)."""
    from transformers import AutoTokenizer

    parsed = parse_model_source(source)
    if parsed.kind is SourceKind.HF:
        try:  # the local HF cache first: works offline when the model was fetched before
            return AutoTokenizer.from_pretrained(parsed.ref, local_files_only=True)
        except OSError:
            require_hub(parsed.ref)
            return AutoTokenizer.from_pretrained(parsed.ref)
    if parsed.kind is SourceKind.BUNDLED:
        converted = bundled_model_dir(parsed.ref)
        if not (converted / "config.json").is_file():
            return bundled_tokenizer(parsed.ref)  # no need to convert the weights just to count tokens
        path = converted
    else:
        path = local_dir(parsed)
    if read_artifact_manifest(path) is not None and not (path / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"artifact {path} carries no tokenizer")
    return AutoTokenizer.from_pretrained(path)


def bundled_tokenizer(name: str) -> Any:
    """A bundled model's tokenizer alone, read from the GGUF once and cached as a directory."""
    from transformers import AutoTokenizer

    target = cache_dir() / "tokenizers" / name
    if (target / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    gguf = bundled_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with file_lock(cache_dir() / "locks" / f"{name}-tokenizer.lock"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=ensure_dir(target.parent)))
        tokenizer.save_pretrained(tmp)
        if not target.exists():
            tmp.rename(target)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
