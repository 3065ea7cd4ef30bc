"""What kind of layer a module is, and whether a name is a LoRA target: the predicates that
building, quantizing, validating and counting share (a leaf: it imports nothing of the package,
and torch and transformers only when called)."""

from __future__ import annotations

import re
from typing import Any


def is_linear(module: Any) -> bool:
    """A Linear (any subclass) or GPT-2's Conv1D: what peft's ``all-linear`` adapts, what
    transformers' quantizing loaders replace, and what the closed-form counts adapt."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def is_adaptable(module: Any) -> bool:
    """A layer peft can put LoRA on by name: a Linear, a Conv1D or an Embedding."""
    from torch import nn

    return is_linear(module) or isinstance(module, nn.Embedding)


def all_linear_names(model: Any) -> list[str]:
    """The layers peft's ``all-linear`` adapts: every linear layer but the output layer."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if is_linear(module) and module is not output]


def name_matches(name: str, targets: Any) -> bool:
    """peft's rule for a module's full name, here and in the closed-form counts (``measure.params``):
    a string is a regular expression that must match all of it; a list entry is the name itself or
    its last dotted parts (``q_proj`` is ``model.layers.0.self_attn.q_proj``, ``proj`` is not)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def layer_shape(module: Any) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear, a Conv1D or an Embedding (LoRA's A is r x fan_in)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.nx, module.nf
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def rank_of(name: str, lora: Any) -> int:
    """The rank of one layer: ``rank_pattern`` keys match the name's tail, else ``r``."""
    for pattern, rank in (lora.rank_pattern or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return rank
    return lora.r
