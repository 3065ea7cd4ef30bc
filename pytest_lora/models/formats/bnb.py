"""bitsandbytes: LLM.int8 (``int8``) and 4-bit (``nf4``, ``fp4``, ``nf4-dq``), as QLoRA trains on.

Each weight is quantized once with ``bitsandbytes.functional`` (``quantize_4bit`` /
``int8_vectorwise_quant``) on the device where it already lies, and the layer becomes a
``bnb.nn.Linear4bit`` / ``Linear8bitLt`` holding the quantized tensor. Nothing goes through disk
and no layer is quantized twice: a loop of ``Params4bit(...).to("cuda")`` took 44 s for the
Llama-3-8B shape on an H200, quantizing in place 0.15 s.

Swapping layers is not enough: peft decides whether a model is quantized from the model's own
flags (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``), not from its layers. Without them it wraps
a ``bnb.nn.Linear4bit`` as a plain Linear and merges into the packed bytes. ``mark_model`` sets
the flags the way transformers' bitsandbytes quantizer does after ``from_pretrained``.

Storage: 4-bit formats store half a byte per weight plus, per 64-weight block, a 4-byte absmax
(32/64 = 0.5 extra bits per weight; QLoRA §3); double quantization stores that absmax in 8 bits
with an fp32 constant per 256 blocks (8/64 + 32/(64 x 256) = 0.127 bits). Each quantized tensor
also carries its 16-entry code table (and the 256-entry nested one, plus an offset). LLM.int8
stores a byte per weight and an fp32 scale per output row.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

from ...specs import QuantSpec
from .. import storage
from .base import Format



class Bitsandbytes(Format):
    backend = "bitsandbytes"
    merge_requantizes = True

    def peft_layer(self, quant: QuantSpec) -> str:
        return "Linear8bitLt" if quant.scheme == "int8" else "Linear4bit"

    def computes_in_dtype(self, quant: QuantSpec) -> bool:
        return quant.scheme != "int8"  # LLM.int8 quantizes the activations too

    # ----------------------------------------------------------------- building

    def pretrained_config(self, quant: QuantSpec) -> Any:
        import transformers

        if quant.scheme == "int8":
            return transformers.BitsAndBytesConfig(load_in_8bit=True)
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.scheme,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quant.dtype),
            bnb_4bit_quant_storage=torch.uint8,
        )

    def quantize_layer(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantSpec) -> nn.Module:
        out_features, in_features = weight.shape
        if quant.scheme == "int8":
            layer = _linear_8bit(weight, in_features, out_features, bias is not None)
        else:
            layer = _linear_4bit(weight, in_features, out_features, bias is not None, quant)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def mark_model(self, model: nn.Module, quant: QuantSpec) -> None:
        """The flags transformers sets after a bitsandbytes ``from_pretrained``, which peft reads."""
        from transformers.quantizers import AutoHfQuantizer

        config = self.pretrained_config(quant)
        quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
        model.is_quantized = True
        model.quantization_method = config.quant_method
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)  # config.quantization_config, is_loaded_in_4bit / _8bit

    def after_build(self, model: nn.Module) -> None:
        """Keep 4-bit weights in bitsandbytes' standard layout on CPUs with AVX512-BF16.

        There, ``Linear4bit.forward`` in eval mode without gradients repacks the weight into a
        CPU layout the first time it runs. A base shared by many tests must not change under one
        of them, and its storage must stay what bitsandbytes documents.
        """
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False

    def fix_copy(self, module: nn.Module) -> None:
        """Point a copied 4-bit weight back at the copy's own layer.

        ``Params4bit`` keeps a reference to its layer (``module``, set by ``Linear4bit`` and by
        transformers' loader alike) and ``Params4bit.__deepcopy__`` copies that reference as it
        is. peft's 4-bit merge re-creates the weight with the old weight's attributes and
        quantizes it, which writes the merged quantization state into ``module.quant_state``: the
        shared base's layer, not the copy's.
        """
        weight = getattr(module, "weight", None)
        if isinstance(weight, bnb.nn.Params4bit) and weight.module is not None:
            weight.module = module

    # ----------------------------------------------------------------- reading layers

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        if isinstance(weight, bnb.nn.Params4bit):
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        return weight.data.float() * _int8_scales_of(module).float().unsqueeze(1) / 127

    def stored_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """Parameters, and the constants beside them: the 4-bit absmax, code tables and the
        nested ones; LLM.int8's row scales, wherever bitsandbytes holds them right now."""
        tensors = self.plain_tensors(module)
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code, getattr(state, "offset", None)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                tensors += [nested.absmax, nested.code]
        tensors.append(getattr(weight, "SCB", None))
        matmul_state = getattr(module, "state", None)  # LLM.int8 moves the scales here on the first forward
        tensors += [getattr(matmul_state, "CB", None), getattr(matmul_state, "SCB", None)]
        return [t for t in tensors if isinstance(t, torch.Tensor)]

    def weights_in(self, module: nn.Module) -> int:
        """A 4-bit ``Params4bit`` stores two weights per byte of its storage dtype."""
        count = 0
        for parameter in module.parameters(recurse=False):
            packed = isinstance(parameter, bnb.nn.Params4bit)
            count += parameter.numel() * 2 * parameter.element_size() if packed else parameter.numel()
        return count

    def layer_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The row scales of every LLM.int8 layer, wherever bitsandbytes holds them right now.

        They start on the weight (``Int8Params.SCB``); the first forward moves them into the
        layer's ``MatmulLtState`` and clears the weight's.
        """
        scales = {}
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear8bitLt):
                scale = _int8_scales_of(module)
                if scale is not None:
                    scales[name] = scale
        return scales

    def restore_layer_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Put LLM.int8 layers back in the state they are in after loading, before any forward.

        A layer that has run keeps its scales in its matmul state and none on the weight; peft's
        DoRA then re-creates the weight without scales and the next forward fails (``'NoneType'
        object has no attribute 'dtype'``). A user who runs an 8-bit model, then adds a DoRA
        adapter, hits the same. A base shared by many tests is therefore reset after each one.
        """
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear8bitLt) and name in state:
                old = module.state
                module.weight.CB = module.weight.data
                module.weight.SCB = state[name]
                module.state = bnb.MatmulLtState()
                module.state.threshold = old.threshold
                module.state.has_fp16_weights = old.has_fp16_weights
                module.state.use_pool = old.use_pool

    # ----------------------------------------------------------------- the memory model

    def tensor_bytes(self, rows: int, columns: int, quant: QuantSpec) -> int:
        return storage.bitsandbytes_bytes(rows, columns, quant)


def _int8_scales_of(module: nn.Module) -> torch.Tensor | None:
    return module.weight.SCB if module.weight.SCB is not None else module.state.SCB


def _linear_4bit(weight: torch.Tensor, in_features: int, out_features: int, bias: bool, quant: QuantSpec) -> nn.Module:
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(),
        blocksize=quant.group_size,
        compress_statistics=quant.double_quant,
        quant_type=quant.scheme,
        quant_storage=torch.uint8,
    )
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=getattr(torch, quant.dtype),
        compress_statistics=quant.double_quant,
        quant_type=quant.scheme,
        quant_storage=torch.uint8,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=quant.group_size,
        compress_statistics=quant.double_quant,
        quant_type=quant.scheme,
        quant_storage=torch.uint8,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state
    return layer


def _linear_8bit(weight: torch.Tensor, in_features: int, out_features: int, bias: bool) -> nn.Module:
    int8_rows, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=6.0, device="meta")
    layer.weight = bnb.nn.Int8Params(int8_rows, requires_grad=False, has_fp16_weights=False, CB=int8_rows, SCB=row_scales)
    return layer


FORMAT = Bitsandbytes()
