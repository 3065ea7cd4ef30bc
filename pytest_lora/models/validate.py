"""Checks of the matrix that need a model's architecture, run before any test.

peft only complains when *no* target matches; a typo in one of two names (``v_prj``) silently
trains half the adapter. Here every named target must match a module that LoRA can adapt
(Linear, Conv1D, Embedding) in every model of the matrix, using the meta device (no memory).

Building the architecture needs transformers (seconds to import), so what the checks read of it
(module names, and whether peft has default targets for it) is kept in pytest's cache, keyed by
the config and the library versions: listing the bench's tests (``--co``) stays fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from ..specs import LoraSpec, ModelSpec, shown
from .layers import is_adaptable, name_matches

CACHE_PREFIX = "pytest_lora/architecture/"

# The sizes of a model's tensors and layer counts, under the names the shipped families use: each
# must be a whole number >= 1. transformers checks some of them (types, heads dividing the hidden
# size) and lets the rest through: a negative hidden size fails deep in torch as "negative
# dimension", and zero layers builds a model with nothing for LoRA to adapt.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "head_dim", "d_model", "d_ff", "d_kv", "num_layers",
               "num_decoder_layers", "num_heads", "n_embd", "n_layer", "n_head", "n_positions", "n_ctx", "n_inner",
               "ffn_dim", "word_embed_proj_dim", "encoder_layers", "decoder_layers", "encoder_attention_heads",
               "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim")


class ConfigProblem(ValueError):
    """A model's config.json holds a field our checks refuse: the message names each field."""


def size_problems(config: dict[str, Any]) -> list[str]:
    """The size fields of ``config`` that are not whole numbers >= 1, as sentences (``null`` is
    allowed: transformers fills it in, as for GPT-2's ``n_inner``)."""
    found = []
    for name in SIZE_FIELDS:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            found.append(f"{name}: {json.dumps(value)[:40]} is not a size")
    return found


@dataclass(frozen=True)
class Architecture:
    """What the checks need of a model: (name, adaptable?) for every module, and whether peft
    has default target modules for its ``model_type``."""

    modules: tuple[tuple[str, bool], ...]
    peft_defaults: bool

    def as_json(self) -> dict[str, Any]:
        return {"modules": [list(module) for module in self.modules], "peft_defaults": self.peft_defaults}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Architecture:
        return cls(tuple((str(name), bool(ok)) for name, ok in data["modules"]), bool(data["peft_defaults"]))


def architecture(model: ModelSpec, cache: Any = None) -> Architecture:
    """The model's ``Architecture``, from pytest's cache (``config.cache``) when it holds it."""
    key = cache_key(model)
    stored = cache.get(key, None) if cache is not None else None
    if stored is not None:
        return Architecture.from_json(stored)
    found = inspect_architecture(model)
    if cache is not None:
        cache.set(key, found.as_json())
    return found


def is_cached(model: ModelSpec, cache: Any) -> bool:
    """Whether the checks of ``model`` can run without building it."""
    return cache is not None and cache.get(cache_key(model), None) is not None


def cache_key(model: ModelSpec) -> str:
    """The config and the versions of the libraries that decide module names and peft's defaults."""
    text = json.dumps([model.config_dict(), _library_versions()], sort_keys=True)
    return CACHE_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=None)
def _library_versions() -> list[str]:
    return [metadata.version(name) for name in ("transformers", "peft")]


@functools.lru_cache(maxsize=None)
def inspect_architecture(model: ModelSpec) -> Architecture:
    """Build the model on the meta device and read its modules."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    from . import build

    found = size_problems(model.config_dict())
    if found:
        raise ConfigProblem("; ".join(found) + "; allowed: a whole number >= 1")
    meta = build.build_meta(model.config_dict())
    modules = tuple((name, is_adaptable(module)) for name, module in meta.named_modules() if name)
    return Architecture(modules, model.config_dict()["model_type"] in defaults)


def problems(model: ModelSpec, lora: LoraSpec, arch: Architecture) -> list[str]:
    """What is wrong with applying ``lora`` to ``model`` (whose ``architecture`` is ``arch``), as
    sentences; empty when nothing is."""
    found = []
    names = arch.modules
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, ok in names if ok})
    if lora.targets == "default" and not arch.peft_defaults:
        model_type = model.config_dict()["model_type"]
        found.append(f"targets 'default': peft has no default targets for {model.id} (model_type {model_type!r}); name them, e.g. {','.join(adaptable[:3])}")
    elif isinstance(lora.targets, tuple):
        for target in lora.targets:
            if not any(ok and name_matches(name, (target,)) for name, ok in names):
                found.append(f"target {shown(target)} matches no Linear, Conv1D or Embedding of {model.id}; its modules end in: {', '.join(adaptable)}")
    for module in lora.modules_to_save:
        if not any(name_matches(name, (module,)) for name, _ in names):
            found.append(f"modules_to_save {shown(module)} matches no module of {model.id}")
    return found
