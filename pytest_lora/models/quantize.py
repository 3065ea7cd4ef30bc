"""Quantizing a built model in place with bitsandbytes, so that peft treats it as quantized.

Each Linear (and GPT-2's Conv1D) weight is quantized once with ``bitsandbytes.functional``
(``quantize_4bit`` / ``int8_vectorwise_quant``) on the device where it already lies, and the
layer is replaced by ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` holding the quantized tensor. Nothing
goes through disk, and no layer is quantized twice: a loop of ``Params4bit(...).to("cuda")`` took
44 s for the Llama-3-8B shape on an H200, quantizing in place 0.15 s.

Swapping layers is not enough: peft decides whether a model is quantized from the model's own
flags (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``), not from its layers. Without them it wraps
a ``bnb.nn.Linear4bit`` as a plain Linear and merges into the packed bytes. ``mark_quantized``
sets the flags the way transformers' bitsandbytes quantizer does after ``from_pretrained``.

The layers that transformers leaves unquantized stay unquantized here too: the output embedding,
the module of the last parameter, tied weights and the model's ``_keep_in_fp32_modules``
(T5's ``wo``).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..matrix import QuantSpec


def bnb_config(quant: QuantSpec) -> transformers.BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` equivalent to a quantization spec."""
    if quant.kind == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )


def quantize_model(model: nn.Module, quant: QuantSpec) -> nn.Module:
    """Replace every quantizable Linear of ``model`` by its bitsandbytes layer, in place.

    One layer at a time, holding only names: each full-precision weight is freed as soon as its
    layer is replaced (a list of the modules would keep every bf16 Linear alive until the end,
    about 15 GB more at the peak of the Llama-3.1-8B shape's build).
    """
    keep = modules_kept_unquantized(model)
    names = [name for name, module in model.named_modules() if name not in keep and _is_linear(module)]
    for name in names:
        model.set_submodule(name, quantized_linear(model.get_submodule(name), quant))
    mark_quantized(model, quant)
    keep_cpu_layout(model)
    return model


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def modules_kept_unquantized(model: nn.Module) -> set[str]:
    """Names of the Linear modules that transformers' bitsandbytes loader leaves in full precision."""
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


def quantized_linear(module: nn.Module, quant: QuantSpec) -> nn.Module:
    """The bitsandbytes layer computing what ``module`` computed, from its quantized weight."""
    weight = module.weight.data
    if isinstance(module, Conv1D):  # Conv1D stores (in, out); bitsandbytes wants (out, in)
        weight = weight.t()
    out_features, in_features = weight.shape
    has_bias = module.bias is not None
    if quant.kind == "int8":
        layer = _linear_8bit(weight, in_features, out_features, has_bias)
    else:
        layer = _linear_4bit(weight, in_features, out_features, has_bias, quant)
    if has_bias:
        layer.bias = nn.Parameter(module.bias.data, requires_grad=module.bias.requires_grad)
    layer.source_cls = type(module)
    layer.requires_grad_(False)
    return layer


def _linear_4bit(weight: torch.Tensor, in_features: int, out_features: int, bias: bool, quant: QuantSpec) -> nn.Module:
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(),
        blocksize=quant.blocksize,
        compress_statistics=quant.double_quant,
        quant_type=quant.quant_type,
        quant_storage=torch.uint8,
    )
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=getattr(torch, quant.dtype),
        compress_statistics=quant.double_quant,
        quant_type=quant.quant_type,
        quant_storage=torch.uint8,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=quant.blocksize,
        compress_statistics=quant.double_quant,
        quant_type=quant.quant_type,
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


def mark_quantized(model: nn.Module, quant: QuantSpec) -> None:
    """Set the flags that transformers sets after a bitsandbytes ``from_pretrained`` and peft reads."""
    from transformers.quantizers import AutoHfQuantizer

    config = bnb_config(quant)
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)  # config.quantization_config, is_loaded_in_4bit / _8bit


def keep_cpu_layout(model: nn.Module) -> None:
    """Keep 4-bit weights in bitsandbytes' standard layout on CPUs with AVX512-BF16.

    There, ``Linear4bit.forward`` in eval mode without gradients repacks the weight into a CPU
    layout the first time it runs. A base shared by many tests must not change under one of them,
    and its storage must stay what bitsandbytes documents, so the repacking is switched off.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def int8_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The row scales of every LLM.int8 layer, wherever bitsandbytes holds them right now.

    They start on the weight (``Int8Params.SCB``); the first forward moves them into the layer's
    ``MatmulLtState`` and clears the weight's.
    """
    scales = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            scale = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            if scale is not None:
                scales[name] = scale
    return scales


def reset_int8_state(model: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Put LLM.int8 layers back in the state they are in after loading, before any forward.

    A layer that has run keeps its scales in its matmul state and none on the weight; peft's
    DoRA then re-creates the weight without scales and the next forward fails (``'NoneType'
    object has no attribute 'dtype'``). A user who runs an 8-bit model, then adds a DoRA
    adapter, hits the same. A base shared by many tests is therefore reset after each one.
    """
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt) and name in scales:
            old = module.state
            module.weight.CB = module.weight.data
            module.weight.SCB = scales[name]
            module.state = bnb.MatmulLtState()
            module.state.threshold = old.threshold
            module.state.has_fp16_weights = old.has_fp16_weights
            module.state.use_pool = old.use_pool


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose 4-bit weights point back at the copy's own layers.

    bitsandbytes' ``Params4bit`` keeps a reference to its layer (``module``, set by ``Linear4bit``
    and by transformers' loader alike) and ``Params4bit.__deepcopy__`` copies that reference as it
    is: the copy's weights still name the original layers. peft's 4-bit merge re-creates the
    weight with the old weight's attributes and quantizes it, which writes the merged quantization
    state into ``module.quant_state``: the shared base's layer, not the copy's.
    """
    import copy

    clone = copy.deepcopy(model)
    for module in clone.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, bnb.nn.Params4bit) and weight.module is not None:
            weight.module = module
    return clone


def is_marked_quantized(model: nn.Module) -> bool:
    """Whether peft will treat ``model`` as a bitsandbytes-quantized model."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
