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

from ..specs import RESIDUAL_INITS, LoraSpec, ModelSpec, shown
from .layers import all_linear_names, is_adaptable, is_linear, name_matches

CACHE_PREFIX = "pytest_lora/architecture-2/"  # -2: with the Linear layers' sides and peft's default targets

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
    """What the checks need of a model: (name, adaptable?) for every module, whether peft has
    default target modules for its ``model_type`` (and which), and (name, smaller side, adapted by
    ``all-linear``?) for every linear layer: the most directions a residual init can take from it."""

    modules: tuple[tuple[str, bool], ...]
    peft_defaults: bool
    linear_sides: tuple[tuple[str, int, bool], ...] = ()
    default_targets: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"modules": [list(module) for module in self.modules], "peft_defaults": self.peft_defaults,
                "linear_sides": [list(side) for side in self.linear_sides], "default_targets": list(self.default_targets)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Architecture:
        return cls(tuple((str(name), bool(ok)) for name, ok in data["modules"]), bool(data["peft_defaults"]),
                   tuple((str(name), int(side), bool(all_linear)) for name, side, all_linear in data["linear_sides"]),
                   tuple(str(name) for name in data["default_targets"]))

    def adapted_sides(self, lora: LoraSpec) -> list[tuple[str, int]]:
        """(name, smaller side) of each linear layer ``lora`` adapts, by peft's matching rules."""
        if lora.targets == "all-linear":
            return [(name, side) for name, side, all_linear in self.linear_sides if all_linear]
        targets = self.default_targets if lora.targets == "default" else lora.targets
        return [(name, side) for name, side, _ in self.linear_sides if name_matches(name, tuple(targets))]


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
    all_linear = set(all_linear_names(meta))
    sides = tuple((name, min(module.weight.shape), name in all_linear) for name, module in meta.named_modules() if is_linear(module))
    model_type = model.config_dict()["model_type"]
    return Architecture(modules, model_type in defaults, sides, tuple(defaults.get(model_type, ())))


def problems(model: ModelSpec, lora: LoraSpec, arch: Architecture, inits: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with applying ``lora`` to ``model`` (whose ``architecture`` is ``arch``), from
    each of the quality suite's ``inits``, as sentences; empty when nothing is."""
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
    return found + rank_problems(model, lora, arch, inits)


def rank_problems(model: ModelSpec, lora: LoraSpec, arch: Architecture, inits: tuple[str, ...]) -> list[str]:
    """PiSSA, OLoRA and LoftQ factor each adapted weight into ``r`` directions: a layer with fewer
    (a grouped-query model's k and v projections are narrow) would get a smaller adapter than the
    config's, which no base of that config loads. Said before the run, naming the layer."""
    residual = [init for init in inits if init in RESIDUAL_INITS]
    narrow = [(name, side) for name, side in arch.adapted_sides(lora) if side < lora.r]
    if not residual or not narrow:
        return []
    name, side = min(narrow, key=lambda layer: layer[1])
    return [f"init {residual[0]} at rank {lora.r}: {name} of {model.id} has {side} on its smaller side, and this init takes "
            f"rank directions from every adapted layer; allowed: a rank of at most {side} for targets {lora.targets_id}, or "
            "init default or gaussian"]
