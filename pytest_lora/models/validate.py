"""Checks of the matrix that need a model's architecture, run before any test.

peft only complains when *no* target matches; a typo in one of two names (``v_prj``) silently
trains half the adapter. Here every named target must match a module that LoRA can adapt
(Linear, Conv1D, Embedding) in every model of the matrix, using the meta device (no memory).
"""

from __future__ import annotations

import functools

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..matrix import LoraSpec, ModelSpec
from . import build

ADAPTABLE = (nn.Linear, Conv1D, nn.Embedding)


@functools.lru_cache(maxsize=None)
def module_names(model: ModelSpec) -> tuple[tuple[str, bool], ...]:
    """(name, adaptable?) for every module of the model's architecture."""
    meta = build.build_meta(model.config_dict())
    return tuple((name, isinstance(module, ADAPTABLE)) for name, module in meta.named_modules() if name)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def problems(model: ModelSpec, lora: LoraSpec) -> list[str]:
    """What is wrong with applying ``lora`` to ``model``, as sentences; empty when nothing is."""
    found = []
    names = module_names(model)
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, ok in names if ok})
    if lora.targets == "default":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = model.config_dict()["model_type"]
        if model_type not in defaults:
            found.append(f"targets 'default': peft has no default targets for {model.id} (model_type {model_type!r}); name them, e.g. {','.join(adaptable[:3])}")
    elif isinstance(lora.targets, tuple):
        for target in lora.targets:
            if not any(ok and _matches(name, target) for name, ok in names):
                found.append(f"target {target!r} matches no Linear, Conv1D or Embedding of {model.id}; its modules end in: {', '.join(adaptable)}")
    for module in lora.modules_to_save:
        if not any(_matches(name, module) for name, _ in names):
            found.append(f"modules_to_save {module!r} matches no module of {model.id}")
    return found
