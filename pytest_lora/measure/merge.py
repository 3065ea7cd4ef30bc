"""Merging a LoRA adapter into its base, checked against the formula, on full-precision and
quantized bases.

The formula, computed here in float64 from the adapter's own tensors and the LoRA config (never
from peft's merge code): W' = W + s B A with s = alpha / r (alpha / sqrt(r) for rsLoRA), B A
transposed when ``fan_in_fan_out`` (Conv1D layers); with DoRA, W' = m / ||W + s B A||_row x
(W + s B A), the norm taken over each output row. On a quantized base W is the dequantized
weight (each format dequantizes its own layers), and peft's merge re-quantizes W + s B A: that rounding can be larger than the update
itself (peft #2321, #1043, #2105, #1080).

Three ways to merge into a quantized base are compared against the unmerged QLoRA model:
``requantize`` (peft's ``merge_and_unload``), ``dequantize`` (dequantize the base to the compute
dtype and merge there, so no rounding but the compute dtype's), and ``original`` (merge into the
full-precision weights the base was quantized from).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..models import formats


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer) and module.lora_A}


def scaling(lora_config: Any) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (rank_pattern / alpha_pattern not modelled)."""
    r, alpha = lora_config.r, lora_config.lora_alpha
    return alpha / math.sqrt(r) if lora_config.use_rslora else alpha / r


def dequantized(layer: nn.Module) -> torch.Tensor:
    """A base layer's weight as float32, dequantized by its format when one stores it."""
    return formats.dequantized(layer)


def expected_delta(layer: LoraLayer, lora_config: Any, adapter: str = "default") -> torch.Tensor:
    """s B A in float64, in the base weight's layout."""
    a = layer.lora_A[adapter].weight.double()
    b = layer.lora_B[adapter].weight.double()
    delta = scaling(lora_config) * (b @ a)
    return delta.T if lora_config.fan_in_fan_out else delta


def expected_merged(layer: LoraLayer, lora_config: Any, base_weight: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """W + s B A (and DoRA's magnitude rescaling) in float64, from ``base_weight`` before the merge."""
    merged = base_weight.double() + expected_delta(layer, lora_config, adapter)
    if lora_config.use_dora:
        magnitude = layer.lora_magnitude_vector[adapter].weight.double()
        rows = merged.T if lora_config.fan_in_fan_out else merged
        scale = magnitude / rows.norm(dim=1)
        merged = (rows * scale.unsqueeze(1)).T if lora_config.fan_in_fan_out else rows * scale.unsqueeze(1)
    return merged


def delta_error_bound(layer: LoraLayer, lora_config: Any, adapter: str = "default") -> torch.Tensor:
    """How far a correct s B A computed in the adapter's dtype may be from the float64 one:
    r accumulated roundings of s |B| |A| (the dot products can cancel, the bound can't)."""
    a = layer.lora_A[adapter].weight.double().abs()
    b = layer.lora_B[adapter].weight.double().abs()
    bound = 4 * lora_config.r * torch.finfo(layer.lora_A[adapter].weight.dtype).eps * abs(scaling(lora_config)) * (b @ a)
    return bound.T if lora_config.fan_in_fan_out else bound


def rounding_tolerance(dtype: torch.dtype, *magnitudes: torch.Tensor) -> torch.Tensor:
    """Elementwise bound for a sum stored in ``dtype``: two roundings of the largest terms, and at
    least two steps of the subnormal grid (fp16's is 6e-8, where small weights lose precision)."""
    info = torch.finfo(dtype)
    return 2 * info.eps * sum(m.abs() for m in magnitudes) + 2 * info.eps * info.smallest_normal


def set_relative_update(model: nn.Module, lora_config: Any, relative: float, generator: torch.Generator) -> float:
    """Give every adapter a non-zero B so that ||s B A||_F = ``relative`` x ||W||_F per layer.

    A fresh adapter has B = 0 (the identity); merging it proves nothing. Fine-tuned adapters
    typically move a weight by 0.1% to 10%. Returns the largest relative update set.
    """
    largest = 0.0
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=generator, dtype=torch.float32).to(b.device, b.dtype))
            weight = dequantized(layer.get_base_layer()).double()
            delta = expected_delta(layer, lora_config).to(weight.device)
            b.mul_(relative * weight.norm() / delta.norm())
            largest = max(largest, (expected_delta(layer, lora_config).norm() / weight.norm().cpu()).item())
    return largest


def cycle_drift(layers: dict[str, LoraLayer], before: dict[str, torch.Tensor], cycles: tuple[int, ...], sample: int = 4) -> dict[int, float]:
    """Largest |W - W0| / max |W0| after k merge / unmerge cycles of the first ``sample`` layers,
    for each k in ``cycles`` (increasing; the cycles accumulate)."""
    drift, done = {}, 0
    chosen = dict(list(layers.items())[:sample])
    for k in cycles:
        for _ in range(k - done):
            for layer in chosen.values():
                layer.merge()
                layer.unmerge()
        done = k
        with torch.no_grad():  # weights and their copies may require grad; the drift is a plain number
            drift[k] = max(
                ((layer.get_base_layer().weight.double() - before[name].double()).abs().max() / before[name].double().abs().max()).item()
                for name, layer in chosen.items()
            )
    return drift


def logits_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Largest absolute logit difference, mean KL(reference || other) of next-token distributions,
    and how often the top-1 token agrees."""
    reference, other = reference.double(), other.double()
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return {
        "max_abs_err": (reference - other).abs().max().item(),
        "kl": kl.item(),
        "top1": (reference.argmax(-1) == other.argmax(-1)).double().mean().item(),
    }


def logit_spread(logits: torch.Tensor) -> float:
    """The standard deviation of a model's logits over every position and token: the scale a
    merge's KL grows with the square of (a random T5's output layer, drawn with std 1.0, gives
    logits about 50x a random Llama's, std 0.02), so KLs of models whose spreads differ widely
    are not set side by side."""
    return logits.double().std().item()


def adapted_module_name(peft_name: str) -> str:
    """A LoRA layer's name in the plain model (peft nests the model under ``base_model.model``)."""
    return peft_name.removeprefix("base_model.model.")


@torch.no_grad()
def merge_into(target: nn.Module, qlora: nn.Module, lora_config: Any, dequantize_base: bool) -> nn.Module:
    """``target`` (the architecture in the compute dtype) with every adapter merged into it.

    ``dequantize_base``: first give ``target`` the quantized base's values, every quantized
    weight dequantized by its format (the ``dequantize`` strategy); otherwise ``target`` keeps its own weights
    (the ``original`` strategy: the full-precision weights the base was quantized from). The merge
    is the float64 formula, rounded once to the compute dtype. ``target`` is put in eval mode, as
    the unmerged model it is compared with: a model built from its config is in training mode, and
    GPT-2's and T5's dropout (0.1) then changed its logits by 0.3 and 25 on every call.
    """
    target.eval()
    base = qlora.get_base_model()
    if dequantize_base:
        for name, module in target.named_modules():
            source = base.get_submodule(name) if name else base
            source = source.get_base_layer() if isinstance(source, LoraLayer) else source
            if formats.layer_format(source) is not None:
                _assign(module, dequantized(source))
                if module.bias is not None:  # a parameter, or a plain tensor (HQQ)
                    module.bias.copy_(source.bias)
                continue
            for key, parameter in module.named_parameters(recurse=False):
                parameter.copy_(getattr(source, key))
    for name, layer in lora_layers(qlora).items():
        module = target.get_submodule(adapted_module_name(name))
        weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
        _assign(module, expected_merged(layer, lora_config, weight.to(layer.lora_A["default"].weight.device)))
    return target


def _assign(module: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Write an (out, in) weight into a Linear, or transposed into a Conv1D."""
    value = weight_out_in.t() if isinstance(module, Conv1D) else weight_out_in
    module.weight.copy_(value.to(module.weight.device, module.weight.dtype))


def requantization_error(merged: nn.Module, expected: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> float:
    """Largest ||deq(W merged) - W'|| / ||W' - W|| over the adapted layers, W' the formula's merged
    weight and W the dequantized base: the share of the update that peft's re-quantizing merge
    loses (above 1: the rounding is larger than the update itself)."""
    worst = 0.0
    for name, target in expected.items():
        module = merged.get_submodule(adapted_module_name(name))
        after = dequantized(module).double().cpu()
        target, original = target.double().cpu(), originals[name].double().cpu()
        worst = max(worst, ((after - target).norm() / (target - original).norm()).item())
    return worst
