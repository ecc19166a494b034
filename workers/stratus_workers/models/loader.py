"""Loads a causal LM and its tokenizer from any model source, caching the bundled GGUF as safetensors."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stratus_workers.models.artifact import load_artifact

# The torch-free parts live in files.py and tokenizer.py; `as` re-exports them for existing callers.
from stratus_workers.models.files import ARTIFACT_FORMAT as ARTIFACT_FORMAT
from stratus_workers.models.files import ModelLoadError as ModelLoadError
from stratus_workers.models.files import bundled_gguf as bundled_gguf
from stratus_workers.models.files import bundled_model_dir, file_lock, local_dir, parse_model_source, require_hub
from stratus_workers.models.files import cache_dir as cache_dir
from stratus_workers.models.files import read_artifact_manifest as read_artifact_manifest
from stratus_workers.models.gguf_artifact import GGUFModel, is_gguf_artifact, load_gguf_artifact
from stratus_workers.models.source import ModelSource, SourceKind
from stratus_workers.models.tokenizer import bundled_tokenizer as bundled_tokenizer
from stratus_workers.models.tokenizer import load_tokenizer as load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def materialize_bundled(name: str) -> Path:
    """Convert the bundled GGUF to a safetensors model directory once and return its path."""
    target = bundled_model_dir(name)
    if (target / "config.json").is_file():
        return target
    with file_lock(cache_dir() / "locks" / f"{name}.lock"):
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


def local_model_dir(source: ModelSource) -> Path:
    """The directory to load `source` from, converting or checking as needed."""
    if source.kind is SourceKind.BUNDLED:
        return materialize_bundled(source.ref)
    return local_dir(source)


def _from_hf(ref: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # the local HF cache first: works offline when the model was fetched before
        return (
            AutoTokenizer.from_pretrained(ref, local_files_only=True),
            AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, local_files_only=True),
        )
    except OSError:
        pass
    require_hub(ref)
    return AutoTokenizer.from_pretrained(ref), AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)


def load_model(source: str, *, dtype: str = "auto", device: str = "auto", name: str | None = None) -> LoadedModel:
    """Load `source` for inference (eval mode, no grad) on `device` in `dtype`."""
    parsed = parse_model_source(source)
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
    key = (str(parse_model_source(source)), str(resolve_dtype(dtype, dev)), str(dev))
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
        return load_artifact(path, dtype=dtype, device=device)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"compressed artifact {path} could not be loaded: {exc}; rerun its compression job"
        ) from exc
