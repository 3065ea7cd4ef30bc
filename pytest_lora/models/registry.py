"""The model registry: published ``config.json`` files of real models, shipped with the plugin.

No machine here reaches a model hub, so the registry carries the architecture facts of each
model (its config.json as published, no weights). A model built from one has the real shapes,
parameter counts, memory and speed, with random weights. Every registry model also has a tiny
variant, ``<name>-tiny``: the same architecture and structure (gated MLP, grouped-query ratio,
tied or untied embeddings, Conv1D or Linear) at small dimensions, for the CPU.

``published_params`` is the parameter count of the published checkpoint (the Hugging Face Hub's
safetensors metadata, which counts tied tensors once); ``tests/test_registry.py`` checks that the
shipped configs reproduce it.

This module must stay import-light: it runs while pytest parses options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tiny

CONFIG_DIR = Path(__file__).with_name("configs")
TINY_SUFFIX = "-tiny"


@dataclass(frozen=True)
class RegistryModel:
    """A shipped published model: where its config came from and how many parameters it has."""

    name: str
    hub_id: str
    published_params: int


MODELS: dict[str, RegistryModel] = {
    model.name: model
    for model in (
        RegistryModel("flan-t5-xxl", "google/flan-t5-xxl", 11_135_332_352),
        RegistryModel("flan-t5-base", "google/flan-t5-base", 247_577_856),
        RegistryModel("mt0-large", "bigscience/mt0-large", 1_229_581_312),
        RegistryModel("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 1_235_814_400),
        RegistryModel("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 8_030_261_248),
        RegistryModel("llama-2-7b", "meta-llama/Llama-2-7b-hf", 6_738_415_616),
        RegistryModel("llama-2-70b", "meta-llama/Llama-2-70b-hf", 68_976_648_192),
        RegistryModel("mistral-7b", "mistralai/Mistral-7B-v0.1", 7_241_732_096),
        RegistryModel("qwen2.5-7b", "Qwen/Qwen2.5-7B", 7_615_616_512),
        RegistryModel("qwen2.5-3b", "Qwen/Qwen2.5-3B", 3_085_938_688),
        RegistryModel("gpt2-medium", "openai-community/gpt2-medium", 354_823_168),
        RegistryModel("roberta-base", "FacebookAI/roberta-base", 124_697_433),
        RegistryModel("opt-125m", "facebook/opt-125m", 125_239_296),
        RegistryModel("opt-6.7b", "facebook/opt-6.7b", 6_658_473_984),
        RegistryModel("bloom-176b", "bigscience/bloom", 176_247_271_424),
    )
}


def names() -> list[str]:
    """Every registry name: the real models, then their tiny variants."""
    return list(MODELS) + [name + TINY_SUFFIX for name in MODELS]


def is_known(name: str) -> bool:
    return name in MODELS or (name.endswith(TINY_SUFFIX) and name[: -len(TINY_SUFFIX)] in MODELS)


def config_path(name: str) -> Path:
    """The shipped config.json of a registry model (the real one for a tiny variant)."""
    return CONFIG_DIR / f"{name.removesuffix(TINY_SUFFIX)}.json"


def has_weights(directory: Path) -> bool:
    """Whether a directory holds a checkpoint (weights), not just a config.json."""
    patterns = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
    return any(any(directory.glob(pattern)) for pattern in patterns)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: Path | str) -> bool:
    """Whether a checkpoint directory holds a tokenizer: a model that can read text."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_config_dict(source: str | Path) -> dict[str, Any]:
    """A registry name, a config.json path or a directory holding one, as a plain dict.

    Raises ``ValueError`` for a file that is not a JSON object with a ``model_type``.
    """
    if isinstance(source, str) and is_known(source):
        config = _read_json(config_path(source))
        return tiny.shrink(config) if source.endswith(TINY_SUFFIX) else config
    path = Path(source)
    return _read_json(path / "config.json" if path.is_dir() else path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"{path} has no 'model_type'")
    return data
