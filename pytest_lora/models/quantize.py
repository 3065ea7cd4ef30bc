"""Quantizing a built model in place, in any format of ``formats``, so that peft treats it as
quantized.

Each Linear (and GPT-2's Conv1D) is replaced, one at a time, by the layer its format makes from
the weight where it already lies; then the format marks the model the way transformers' loader
would (peft reads those flags, not the layers). Nothing goes through disk and no layer is
quantized twice.

The layers that transformers leaves unquantized stay unquantized here too: the output embedding,
the module of the last parameter, tied weights and the model's ``_keep_in_fp32_modules``
(T5's ``wo``).
"""

from __future__ import annotations

import copy

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..specs import QuantSpec
from . import formats
from .layers import is_linear


def quantize_model(model: nn.Module, quant: QuantSpec) -> nn.Module:
    """Replace every quantizable Linear of ``model`` by its quantized layer, in place.

    One layer at a time, holding only names: each full-precision weight is freed as soon as its
    layer is replaced (a list of the modules would keep every bf16 Linear alive until the end,
    about 15 GB more at the peak of the Llama-3.1-8B shape's build).
    """
    found = formats.of(quant)
    for name in quantizable_names(model):
        model.set_submodule(name, quantized_linear(model.get_submodule(name), quant, found))
    found.mark_model(model, quant)
    found.after_build(model)
    return model


def quantizable_names(model: nn.Module) -> list[str]:
    """Names of the layers a quantized base stores quantized, as transformers' loaders choose
    them: the linear layers not kept in full precision and not quantized already."""
    keep = modules_kept_unquantized(model)
    return [name for name, module in model.named_modules()
            if name not in keep and is_linear(module) and formats.layer_format(module) is None]


def modules_kept_unquantized(model: nn.Module) -> set[str]:
    """Names of the Linear modules that transformers' quantizing loaders leave in full precision."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    last_parameter = next(reversed(list(model.named_parameters())))[0].rsplit(".", 1)[0]
    patterns = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    tied = _tied_parameter_names(model)
    kept = set()
    for name, module in model.named_modules():
        if module is output or name == last_parameter or f"{name}.weight" in tied:
            kept.add(name)
        elif any(name == pattern or name.endswith("." + pattern) for pattern in patterns):
            kept.add(name)
    return kept


def _tied_parameter_names(model: nn.Module) -> set[str]:
    """Every name under which a parameter shared with another name is reachable."""
    by_id: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(parameter), []).append(name)
    return {name for names in by_id.values() if len(names) > 1 for name in names}


def quantized_linear(module: nn.Module, quant: QuantSpec, found: formats.Format | None = None) -> nn.Module:
    """The quantized layer computing what ``module`` computed, from its weight in (out, in)."""
    weight = module.weight.data
    if isinstance(module, Conv1D):  # Conv1D stores (in, out); quantized layers want (out, in)
        weight = weight.t()
    bias = module.bias.data if module.bias is not None else None
    layer = (found or formats.of(quant)).quantize_layer(weight.contiguous(), bias, quant)
    layer.source_cls = type(module)
    layer.requires_grad_(False)
    return layer


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy that shares nothing with ``model``: each format repairs the references its
    layers keep into the original (bitsandbytes' 4-bit weights name their layer)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        found = formats.layer_format(module)
        if found is not None:
            found.fix_copy(module)
    return clone
