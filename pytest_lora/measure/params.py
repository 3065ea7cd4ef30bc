"""Trainable and total parameters of a LoRA model, three ways.

1. ``count_parameters(model, lora)``: peft's own ``get_nb_trainable_parameters`` on the model built
   on the meta device: the numbers ``print_trainable_parameters`` shows for the published model,
   in seconds and with no memory even for 176B parameters.
2. ``closed_form(base, lora)``: from the base's module shapes alone, without peft. LoRA adds
   A (r x in) and B (out x r) to every adapted layer: r x (in + out) parameters (LoRA paper §4;
   §5.1 writes it 2 x L x d_model x r for square matrices). DoRA adds a magnitude vector of
   ``out`` per layer; ``bias="all"`` trains every parameter named ``bias`` (not T5's
   ``relative_attention_bias.weight``, an embedding), ``"lora_only"`` the biases of adapted
   layers; ``modules_to_save`` trains a full copy of each named module.
3. ``count_model(model)``: a plain walk over a built (possibly quantized) model's parameters.

Quantized layers store fewer elements than weights: bitsandbytes packs two 4-bit weights per byte
(a ``Params4bit`` reports half its weights as ``numel``; peft unpacks them, peft #1020, #1594) and
so does HQQ's ``W_q`` (which peft does not unpack). ``count_model`` asks each layer's format.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Any, Mapping

import peft
import torch
import transformers
from torch import nn

from ..quiet import library_warnings_silenced
from ..models import build, formats, layout, registry
from ..models.layers import all_linear_names, is_adaptable, layer_shape, name_matches, rank_of  # noqa: F401  (layer_shape, rank_of: read here too)


@dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameter counts (ints); ``pct`` is trainable as a percentage of total."""

    trainable: int
    total: int

    @property
    def pct(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.pct:.4f}"


ModelLike = str | PathLike | Mapping[str, Any] | transformers.PretrainedConfig
LoraLike = peft.LoraConfig | Mapping[str, Any]


def count_parameters(model: ModelLike, lora: LoraLike) -> ParamCount:
    """Trainable and total parameters of ``model`` with the LoRA adapter ``lora``, as peft counts them.

    ``model``: a registry name (``"flan-t5-xxl"``), a path to a config.json or a checkpoint
    directory, a config dict or a ``transformers.PretrainedConfig``. ``lora``: a ``peft.LoraConfig``
    or a dict of its arguments. Counting runs on the meta device: no weights, no memory. The counts
    do not depend on quantization (a quantized base counts the same; see the module docstring).
    """
    config_dict = config_dict_of(model)
    lora_config = lora_config_of(lora, config_dict)
    with torch.device("meta"), library_warnings_silenced():
        peft_model = peft.get_peft_model(build.build_meta(config_dict), lora_config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    return ParamCount(trainable, total)


def config_dict_of(model: ModelLike) -> dict[str, Any]:
    """Any accepted model description as a config dict."""
    if isinstance(model, transformers.PretrainedConfig):
        config_dict = model.to_dict()
        config_dict.setdefault("architectures", model.architectures)
        return config_dict
    if isinstance(model, Mapping):
        return dict(model)
    return registry.load_config_dict(model if isinstance(model, str) and registry.is_known(model) else str(model))


def lora_config_of(lora: LoraLike, config_dict: dict[str, Any]) -> peft.LoraConfig:
    """A ``peft.LoraConfig``, with the task type of the model's head when the caller gave none."""
    if isinstance(lora, peft.LoraConfig):
        return lora
    kwargs = dict(lora)
    kwargs.setdefault("task_type", build.task_type(config_dict))
    return peft.LoraConfig(**kwargs)


def count_model(model: nn.Module) -> ParamCount:
    """Count a built model's parameters directly: each tensor once, each quantized layer as the
    number of weights its format stores (``Format.weights_in``: packing undone, and HQQ's bias,
    which it keeps as a plain tensor)."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        found = formats.layer_format(module)
        total += found.weights_in(module) if found is not None else sum(p.numel() for p in own)  # own: tied ones once
        trainable += sum(p.numel() for p in own if p.requires_grad)
    return ParamCount(trainable, total)


# --------------------------------------------------------------------------- closed form


ClosedFormUnsupported = layout.Unmodelled
"""The LoRA config uses an option the closed form does not model."""


def closed_form(base: nn.Module, lora: peft.LoraConfig, model_type: str | None = None) -> ParamCount:
    """The counts a LoRA config must give on ``base`` (an unadapted model), from shapes alone.

    ``base`` may be any ``nn.Module``; ``model_type`` is needed only for peft's default targets
    of a module that has no transformers config.
    """
    layout.refuse_unmodelled(lora)
    adapted = adapted_layers(base, lora, model_type)
    added = adapter_weights(base, lora, model_type)
    saved = _modules_to_save_weights(base, lora)
    base_count = count_model(base).total
    return ParamCount(added + saved + _trainable_biases(base, lora, adapted), base_count + added + saved)


def adapter_weights(base: nn.Module, lora: peft.LoraConfig, model_type: str | None = None) -> int:
    """The weights the adapter itself adds: r (fan_in + fan_out) per adapted layer, and DoRA's
    magnitude (fan_out). What each resident adapter holds, beside the base."""
    adapted = adapted_layers(base, lora, model_type)
    added = sum(rank_of(name, lora) * (fan_in + fan_out) for name, (fan_in, fan_out) in adapted.items())
    if lora.use_dora:
        added += sum(fan_out for _, fan_out in adapted.values())
    return added


def trainable_tensor_count(base: nn.Module, lora: peft.LoraConfig, model_type: str | None = None) -> int:
    """How many trainable tensors the LoRA config creates or unfreezes (optimizers keep state per tensor)."""
    return len(trainable_tensor_sizes(base, lora, model_type))


def trainable_tensor_sizes(base: nn.Module, lora: peft.LoraConfig, model_type: str | None = None) -> list[int]:
    """The elements of each trainable tensor the LoRA config creates or unfreezes: A (r x fan_in),
    B (fan_out x r) and DoRA's magnitude (fan_out) per adapted layer, the biases it trains, the
    modules it saves. An 8-bit optimizer quantizes each tensor on its own, so its state depends
    on these sizes, not only on their sum."""
    layout.refuse_unmodelled(lora)
    adapted = adapted_layers(base, lora, model_type)
    sizes = []
    for name, (fan_in, fan_out) in adapted.items():
        r = rank_of(name, lora)
        sizes += [r * fan_in, fan_out * r] + ([fan_out] if lora.use_dora else [])
    modules = dict(base.named_modules())
    if lora.bias == "all":
        sizes += [p.numel() for name, p in base.named_parameters() if name == "bias" or name.endswith(".bias")]
    elif lora.bias == "lora_only":
        sizes += [modules[name].bias.numel() for name in adapted if getattr(modules[name], "bias", None) is not None]
    names = set(lora.modules_to_save or ())
    sizes += [p.numel() for n, m in modules.items() if n and name_matches(n, names) for p in m.parameters()]
    return sizes


def adapted_layers(base: nn.Module, lora: peft.LoraConfig, model_type: str | None = None) -> dict[str, tuple[int, int]]:
    """Name -> (fan_in, fan_out) of every layer that the LoRA config adapts, by peft's matching rules."""
    match = target_matcher(base, lora.target_modules, model_type)
    layers = {}
    for name, module in base.named_modules():
        if name and match(name, module):
            layers[name] = layer_shape(module)
    return layers


def target_matcher(base: nn.Module, targets: Any, model_type: str | None = None):
    """A predicate (name, module) -> adapted?, for peft's three ways of naming targets.

    A list matches a module whose full name is an entry or ends with ``.`` + entry; a string is a
    regular expression matched against the full name; ``all-linear`` is every Linear and Conv1D
    except the output layer; ``None`` is peft's default list for the architecture.
    """
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = model_type or getattr(getattr(base, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ClosedFormUnsupported(f"peft has no default LoRA targets for model_type {model_type!r}")
        targets = defaults[model_type]
    if targets == "all-linear":
        names = set(all_linear_names(base))
        return lambda name, module: name in names
    return lambda name, module: name_matches(name, targets) and is_adaptable(module)


def _trainable_biases(base: nn.Module, lora: peft.LoraConfig, adapted: dict[str, tuple[int, int]]) -> int:
    if lora.bias == "all":
        return sum(p.numel() for name, p in base.named_parameters() if name == "bias" or name.endswith(".bias"))
    if lora.bias == "lora_only":
        modules = dict(base.named_modules())
        return sum(modules[name].bias.numel() for name in adapted if getattr(modules[name], "bias", None) is not None)
    return 0


def _modules_to_save_weights(base: nn.Module, lora: peft.LoraConfig) -> int:
    """Weights of the trainable copies of ``modules_to_save`` (each counted in total too)."""
    names = set(lora.modules_to_save or ())
    if not names:
        return 0
    return sum(
        sum(p.numel() for p in module.parameters())
        for name, module in base.named_modules()
        if name_matches(name, names)
    )
