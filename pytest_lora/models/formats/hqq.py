"""HQQ (Half-Quadratic Quantization): ``hqq-4bit`` and ``hqq-8bit``, groups of 64 by default
(``hqq-4bit-g128`` for another size).

Each Linear becomes an ``hqq.core.quantize.HQQLinear``: the packed weight ``W_q`` (the layer's
only parameter), a ``meta`` dict holding a scale and a zero point per group in the compute
dtype, and the bias as a plain tensor attribute. peft dispatches its ``HqqLoraLinear`` on the
layer's class; it merges by dequantizing, adding s B A and quantizing again with the layer's own
``quant_config``.

Two traps, both handled here and shown in the tests: peft's ``all-linear`` looks for
``nn.Linear`` and finds no HQQ layer (the adapter then names the layers instead), and peft's
``get_nb_trainable_parameters`` counts ``W_q``'s packed bytes as parameters and misses the bias.

Storage: ``bits / 8`` bytes a weight, plus a scale and a zero per group of ``group_size``
weights along each row, each in the compute dtype (HQQ's defaults keep them unquantized).
"""

from __future__ import annotations

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import nn

from ...specs import QuantSpec
from .. import storage
from .base import Format



class Hqq(Format):
    backend = "hqq"
    all_linear = False
    peft_counts_weights = False
    merge_requantizes = True
    reloads_merged = False

    def peft_layer(self, quant: QuantSpec) -> str:
        return "HqqLoraLinear"

    def config(self, quant: QuantSpec) -> dict:
        return BaseQuantizeConfig(nbits=storage.hqq_bits(quant), group_size=quant.group_size)

    # ----------------------------------------------------------------- building

    def quantize_layer(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantSpec) -> nn.Module:
        config = self.config(quant)
        layer = HQQLinear(None, config, compute_dtype=getattr(torch, quant.dtype), device=str(weight.device), initialize=False)
        config.pop("offload_meta", None)
        layer.quantize(weight, **config)
        if bias is not None:
            layer.bias = bias.to(layer.compute_dtype)
        return layer

    def pretrained_config(self, quant: QuantSpec) -> object:
        import transformers

        return transformers.HqqConfig(nbits=storage.hqq_bits(quant), group_size=quant.group_size)

    def mark_model(self, model: nn.Module, quant: QuantSpec) -> None:
        model.is_quantized = True
        model.quantization_method = "hqq"

    def loads_pretrained_on(self, devices: set[str]) -> bool:
        # transformers' HQQ quantizer: "You are attempting to use an HQQ model with a device_map
        # that contains a CPU or disk device" (quantizer_hqq.validate_environment)
        return devices <= {"cuda"}

    # ----------------------------------------------------------------- reading layers

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, HQQLinear)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize().float()

    def stored_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        meta = [value for value in module.meta.values() if isinstance(value, torch.Tensor)]
        bias = [module.bias] if isinstance(module.bias, torch.Tensor) else []
        return self.plain_tensors(module) + meta + bias

    def weights_in(self, module: nn.Module) -> int:
        rows, columns = module.meta["shape"]
        return rows * columns + (module.bias.numel() if isinstance(module.bias, torch.Tensor) else 0)

    # ----------------------------------------------------------------- the memory model

    def tensor_bytes(self, rows: int, columns: int, quant: QuantSpec) -> int:
        return storage.hqq_bytes(rows, columns, quant)


FORMAT = Hqq()
