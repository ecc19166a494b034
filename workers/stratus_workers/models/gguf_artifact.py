"""GGUF edge artifacts: the weight formats llama.cpp serves, and the handle the loader gives the server for one.

A GGUF artifact is a compressed-artifact directory (manifest.json, config.json, the Hugging Face
tokenizer) whose weights are one `model.gguf` file instead of `model.safetensors`. The Hugging Face
tokenizer stays the one source of token ids: the server renders and encodes prompts with it and hands
llama.cpp token ids only, so an edge on llama.cpp and a cloud on torch agree on every id (which
speculative decoding needs). Nothing here imports llama_cpp; only the runner that serves the file does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratus_workers.runtimes import RUNTIME_LLAMACPP, Runtime

GGUF_FILE = "model.gguf"


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF artifact as the loader hands it to a server: the file, the model's config, its figures.

    It stands where a torch model stands in `LoadedModel`; the server sees `runtime` and gives it to
    the llama.cpp runner instead of the torch one.
    """

    path: Path
    config: Any  # transformers.PretrainedConfig from the artifact's config.json
    generation_config: Any  # transformers.GenerationConfig, or None when the artifact has none
    stored_values: int  # weights in the file (elements of every tensor)
    weights_bytes: int  # bytes of tensor data in the file (the "size" of the variant)
    file_type: str  # the dominant weight type, e.g. "q8_0"
    runtime: Runtime = RUNTIME_LLAMACPP


def read_gguf(path: Path) -> tuple[int, int, str]:
    """(elements, tensor bytes, dominant weight type) of a GGUF file, read from its header and tensor table."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    elements = 0
    tensor_bytes = 0
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        elements += int(tensor.n_elements)
        tensor_bytes += int(tensor.n_bytes)
        name = tensor.tensor_type.name.lower()
        by_type[name] = by_type.get(name, 0) + int(tensor.n_elements)
    dominant = max(by_type, key=lambda k: by_type[k]) if by_type else ""
    return elements, tensor_bytes, dominant


def is_gguf_artifact(directory: Path, manifest: dict[str, Any]) -> bool:
    return manifest.get("runtime") == RUNTIME_LLAMACPP or (directory / GGUF_FILE).is_file()


def load_gguf_artifact(directory: Path) -> tuple[GGUFModel, Any]:
    """The GGUF artifact in `directory` as a GGUFModel plus its Hugging Face tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from stratus_workers.models.files import ModelLoadError

    for required in ("config.json", GGUF_FILE, "tokenizer_config.json"):
        if not (directory / required).is_file():
            raise ModelLoadError(
                f"GGUF artifact {directory} is incomplete: {required} is missing; rerun its compression job"
            )
    path = directory / GGUF_FILE
    try:
        elements, tensor_bytes, file_type = read_gguf(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"GGUF artifact {path} is corrupt ({exc}); rerun its compression job") from exc
    config = AutoConfig.from_pretrained(directory)
    try:
        generation = GenerationConfig.from_pretrained(directory)
    except OSError:
        generation = None
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return GGUFModel(path, config, generation, elements, tensor_bytes, file_type), tokenizer
