"""Quantized bases hold what the formats say: NF4 / FP4 codes times a per-64-block absmax, LLM.int8
rows times a per-row scale; the layers transformers keeps in full precision stay so; the shared
base's storage doesn't change when it runs."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS
from pytest_lora.models import build, formats, quantize, registry

# QLoRA paper (arXiv 2305.14314), Appendix E: the 16 NF4 values.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip
HALF_GAP = {"nf4": float((NF4[1:] - NF4[:-1]).max()) / 2, "fp4": 1 / 6}  # FP4's widest gap: 2/3 -> 1


def original_and_quantized(name: str, quant: str):
    """The same random model twice: full precision (compute dtype) and quantized in place."""
    spec = QUANTIZATIONS[quant]
    config = registry.load_config_dict(name)
    torch.manual_seed(0)
    original = build.instantiate(config, "cpu", getattr(torch, spec.dtype))
    torch.manual_seed(0)
    quantized = quantize.quantize_model(build.instantiate(config, "cpu", getattr(torch, spec.dtype)), spec)
    return original, quantized


def weight_in_out_layout(module: nn.Module) -> torch.Tensor:
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


@pytest.mark.parametrize("quant", ["nf4", "fp4", "nf4-dq"])
@pytest.mark.parametrize("name", ["llama-3.1-8b-tiny", "gpt2-medium-tiny"])
def test_four_bit_weights_are_codes_times_block_absmax(name, quant):
    spec = QUANTIZATIONS[quant]
    original, quantized = original_and_quantized(name, quant)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers
    modules = dict(original.named_modules())
    for layer_name, layer in layers.items():
        w = weight_in_out_layout(modules[layer_name]).float()
        restored = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert restored.shape == w.shape, layer_name
        blocks, restored_blocks = w.reshape(-1, 64), restored.reshape(-1, 64)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        slack = 0.02 if spec.double_quant else 0.005  # 8-bit absmax under double quantization; bf16 output
        assert ((blocks - restored_blocks).abs() <= (HALF_GAP[spec.scheme] + slack) * absmax).all(), layer_name
        if spec.scheme == "nf4" and not spec.double_quant:
            codes = restored_blocks / absmax
            nearest = (codes.unsqueeze(-1) - NF4).abs().amin(dim=-1)
            assert (nearest < 0.01).all(), f"{layer_name}: values are not NF4 codes x block absmax"


def test_int8_rows_are_codes_times_row_absmax():
    original, quantized = original_and_quantized("llama-3.1-8b-tiny", "int8")
    modules = dict(original.named_modules())
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert layers
    for layer_name, layer in layers.items():
        w = modules[layer_name].weight.data.float()
        row_absmax = w.abs().amax(dim=1)
        assert torch.allclose(layer.weight.SCB.float(), row_absmax, rtol=1e-3), layer_name
        restored = layer.weight.data.float() * layer.weight.SCB.float().unsqueeze(1) / 127
        assert ((w - restored).abs() <= row_absmax.unsqueeze(1) / 127 / 2 * 1.01 + 1e-6).all(), layer_name


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq", "int8"])
def test_a_quantized_layer_computes_with_its_dequantized_weight(quant):
    _, quantized = original_and_quantized("llama-3.1-8b-tiny", quant)
    layer = quantized.model.layers[0].mlp.up_proj
    x = torch.randn(3, 64, dtype=getattr(torch, QUANTIZATIONS[quant].dtype))
    if quant == "int8":
        w = layer.weight.data.float() * layer.weight.SCB.float().unsqueeze(1) / 127
    else:
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    with torch.no_grad():
        out = layer(x).float()
    reference = x.float() @ w.t()
    assert torch.allclose(out, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


def test_transformers_full_precision_layers_stay_unquantized():
    _, llama = original_and_quantized("llama-3.1-8b-tiny", "nf4")
    assert type(llama.lm_head) is nn.Linear  # the output layer
    assert isinstance(llama.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    _, t5 = original_and_quantized("flan-t5-base-tiny", "int8")
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear  # T5's _keep_in_fp32_modules
    assert isinstance(t5.encoder.block[0].layer[1].DenseReluDense.wi_0, bnb.nn.Linear8bitLt)
    assert type(t5.lm_head) is nn.Linear
    _, gpt2 = original_and_quantized("gpt2-medium-tiny", "nf4")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied, never quantized


def test_the_model_says_it_is_quantized_as_transformers_would():
    _, model = original_and_quantized("llama-3.1-8b-tiny", "nf4-dq")
    assert model.is_quantized  # what peft reads, with the flags below
    config = model.config.quantization_config
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_running_the_base_does_not_repack_its_weights():
    """On CPUs with AVX512-BF16, bitsandbytes would rewrite the 4-bit layout on the first eval pass."""
    _, model = original_and_quantized("llama-3.1-8b-tiny", "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.data.clone()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 8)))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, before)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "nf4-dq", "int8"])
def test_quantizing_in_place_gives_what_from_pretrained_gives(quant, tmp_path):
    """The same full-precision weights, saved and loaded with a BitsAndBytesConfig: the same layer
    types, the same packed bytes and constants, and the model flags peft reads for dispatch."""
    spec, q = resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS[quant]
    build.full_precision_of(spec, q, "cpu").save_pretrained(tmp_path)
    ours = build.build_base(spec, q, "cpu")
    theirs = build.model_class(spec.config_dict()).from_pretrained(
        tmp_path, dtype=getattr(torch, q.dtype), device_map={"": "cpu"}, quantization_config=formats.of(q).pretrained_config(q)
    )
    assert {n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in theirs.named_modules()}
    for (name, a), (_, b) in zip(ours.named_modules(), theirs.named_modules()):
        weight_a, weight_b = getattr(a, "weight", None), getattr(b, "weight", None)
        if isinstance(weight_a, bnb.nn.Params4bit):
            sa, sb = weight_a.quant_state, weight_b.quant_state
            assert torch.equal(weight_a.data, weight_b.data), name
            assert (sa.blocksize, sa.quant_type, sa.dtype, sa.shape, sa.nested) == (sb.blocksize, sb.quant_type, sb.dtype, sb.shape, sb.nested)
            assert torch.equal(sa.absmax, sb.absmax), name
        elif isinstance(weight_a, bnb.nn.Int8Params):
            assert torch.equal(weight_a.data, weight_b.data) and torch.equal(weight_a.SCB, weight_b.SCB), name
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "quantization_method"):
        assert getattr(ours, flag, None) == getattr(theirs, flag, None), flag
    assert type(ours.hf_quantizer) is type(theirs.hf_quantizer)
