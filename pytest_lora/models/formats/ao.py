"""torchao, PyTorch's own quantization: int8 weight-only (``torchao-int8``) and int4 weight-only
(``torchao-int4``, groups of 128 by default).

A Linear's weight becomes one of torchao's tensor subclasses through ``torchao.quantize_``; the
layer stays an ``nn.Linear``. peft dispatches its ``TorchaoLoraLinear`` on the weight's class,
and to merge it re-quantizes with the config it reads from
``model.hf_quantizer.quantization_config``: ``mark_model`` sets what transformers' torchao
loader sets. Without it peft still trains but refuses to merge.

Layouts (torchao 0.18): int8 weight-only is an ``Int8Tensor`` of int8 ``qdata`` (out, in), an
fp32 ``scale`` per row and an int8 ``zero_point`` per row (all zeros: the quantization is
symmetric, but torchao keeps them), 1 + 5 / in bytes per weight. int4 weight-only packs for the kernel that
runs it: tinygemm's ``tile_packed_to_4d`` on CUDA, the weight padded to a multiple of 1024 inputs
and 8 outputs, two weights a byte, with a scale and a zero per group of each row in bf16
(``scale_and_zero``: 4 bytes a group). torchao 0.18 has no int4 weight-only kernel for the CPU
(``plain`` needs the mslk package, ``plain_int32`` an XPU, tinygemm CUDA), so ``torchao-int4``
skips there; and peft 0.21 refuses torchao's ``Int4Tensor`` (only int8 "for now").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...specs import QuantSpec
from .. import storage
from .base import Format, plain_parts

INT4_FORMAT = "tile_packed_to_4d"


class Torchao(Format):
    backend = "torchao"
    merge_requantizes = True
    reloads_merged = False

    def peft_layer(self, quant: QuantSpec) -> str:
        return "TorchaoLoraLinear"

    def config(self, quant: QuantSpec) -> Any:
        """torchao's config object for ``quantize_`` (and for transformers' ``TorchAoConfig``)."""
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        if quant.scheme == "int8":
            return Int8WeightOnlyConfig()
        return Int4WeightOnlyConfig(group_size=quant.group_size, int4_packing_format=INT4_FORMAT)

    def unavailable(self, quant: QuantSpec, device: str) -> str | None:
        """Whether torchao quantizes and runs this format on ``device``: tried on one small layer."""
        try:
            layer = self.quantize_layer(torch.ones(8, 1024, dtype=torch.bfloat16, device=device), None, quant)
            layer(torch.ones(1, 1024, dtype=torch.bfloat16, device=device))
        except Exception as error:  # torchao raises ImportError, AssertionError, ValueError, ...
            return f"torchao cannot run {quant.name} on {device} ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        return None

    # ----------------------------------------------------------------- building

    def quantize_layer(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantSpec) -> nn.Module:
        from torchao.quantization import quantize_

        out_features, in_features = weight.shape
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(getattr(torch, quant.dtype)), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        quantize_(layer, self.config(quant))
        return layer

    def pretrained_config(self, quant: QuantSpec) -> Any:
        import transformers

        return transformers.TorchAoConfig(quant_type=self.config(quant))

    def mark_model(self, model: nn.Module, quant: QuantSpec) -> None:
        """transformers' flags after a torchao ``from_pretrained``: peft's merge reads the config."""
        from transformers.quantizers import AutoHfQuantizer

        config = self.pretrained_config(quant)
        model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
        model.is_quantized = True
        model.quantization_method = config.quant_method
        model.config.quantization_config = config

    # ----------------------------------------------------------------- reading layers

    def owns(self, module: nn.Module) -> bool:
        from torchao.utils import TorchAOBaseTensor

        return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize().float()

    def stored_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """The plain tensors inside torchao's weight (its ``__tensor_flatten__``), and the bias."""
        tensors = []
        for parameter in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            tensors += plain_parts(parameter)
        return tensors

    def weights_in(self, module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters(recurse=False))  # a subclass reports its logical shape

    # ----------------------------------------------------------------- the memory model

    def tensor_bytes(self, rows: int, columns: int, quant: QuantSpec) -> int:
        return storage.torchao_bytes(rows, columns, quant)


FORMAT = Torchao()
