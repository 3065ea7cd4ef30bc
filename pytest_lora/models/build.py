"""Building base models: on the meta device for counting, with random weights for measuring,
or from a local checkpoint.

Random-weight models are built directly in their target dtype on the target device: building in
float32 and casting afterwards makes the build's own peak bigger than a whole 4-bit training step
(31 GiB for the Llama-3-8B shape on an H200). Quantized bases are built in the compute dtype and
then quantized in place (``quantize.py``).
"""

from __future__ import annotations

import contextlib
import gc
import zlib
from typing import Any, Iterator

import torch
import transformers
from torch import nn

from ..specs import ModelSpec, QuantSpec, full_precision, without_group
from . import formats, placement, quantize, storage

# peft task types by the head a published config names; others get peft's generic PeftModel.
_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}
_DROPPED_KEYS = ("architectures", "transformers_version", "_name_or_path", "quantization_config")


def transformers_config(config_dict: dict[str, Any]) -> transformers.PretrainedConfig:
    """The transformers config object of a published config.json."""
    kwargs = {key: value for key, value in config_dict.items() if key not in _DROPPED_KEYS and key != "model_type"}
    config = transformers.AutoConfig.for_model(config_dict["model_type"], **kwargs)
    config.architectures = config_dict.get("architectures")
    return config


def model_class(config_dict: dict[str, Any]) -> type[transformers.PreTrainedModel]:
    """The class the config.json names in ``architectures`` (the published model's head), else the
    causal-LM, seq2seq-LM or bare model class transformers registers for its ``model_type``."""
    from transformers.models.auto import modeling_auto

    model_type = config_dict["model_type"]
    candidates = list(config_dict.get("architectures") or ())
    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES"):
        name = getattr(modeling_auto, mapping).get(model_type)
        candidates.extend(name if isinstance(name, (list, tuple)) else [name] if name else [])
    for name in candidates:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(f"transformers has no model class for model_type {model_type!r}")


def task_type(config_dict: dict[str, Any]) -> str | None:
    """peft's task type for the model's head: CAUSAL_LM, SEQ_2_SEQ_LM, or None."""
    cls_name = model_class(config_dict).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if cls_name.endswith(suffix)), None)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def config_dtype(config_dict: dict[str, Any]) -> torch.dtype:
    """The dtype the published checkpoint is stored in (float32 when the config doesn't say)."""
    return getattr(torch, storage.config_dtype(config_dict))


def weight_dtype(quant: QuantSpec, config_dict: dict[str, Any]) -> torch.dtype:
    """The dtype a base is built in: the quantization's (its compute dtype), else the model's own."""
    return getattr(torch, storage.build_dtype(quant, config_dict))


def instantiate(config_dict: dict[str, Any], device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """The model of a config dict, with random weights, built in ``dtype`` on ``device``."""
    cls = model_class(config_dict)
    with torch.device(device), _default_dtype(dtype):
        model = cls(transformers_config(config_dict))
    untie_published_output(model, config_dict)
    return model


def build_meta(config_dict: dict[str, Any]) -> nn.Module:
    """The architecture on the meta device: real shapes and counts, no memory, no time."""
    return instantiate(config_dict, "meta", config_dtype(config_dict))


def untie_published_output(model: nn.Module, config_dict: dict[str, Any]) -> None:
    """Give the output layer its own weight when the published checkpoint has one.

    FLAN-T5 and mT0 ship ``tie_word_embeddings: false``: their lm_head is a separate matrix
    (the FLAN-T5-XXL total of 11,154,206,720 with LoRA counts it). transformers 5 forces T5's
    config to tie it to the shared embedding and keeps the published flag only as
    ``scale_decoder_outputs``, so a model built from the config has one matrix too few.
    """
    published_untied = config_dict.get("tie_word_embeddings") is False or config_dict.get("scale_decoder_outputs") is False
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if not published_untied or output is None or inputs is None or output.weight is not inputs.weight:
        return
    output.weight = nn.Parameter(inputs.weight.detach().clone(), requires_grad=inputs.weight.requires_grad)
    model.config.tie_word_embeddings = False


def seed_for(*parts: str) -> int:
    """A stable seed from names (``zlib.crc32``; Python's ``hash`` changes between runs); a test id
    seeds the same under xdist's loadgroup, which appends ``@<group>`` to it."""
    return zlib.crc32("::".join(without_group(part) for part in parts).encode())


def build_base(model: ModelSpec, quant: QuantSpec, device: str, capacities: dict[int, int] | None = None) -> nn.Module:
    """The base model of one (model, quantization, device).

    Seeded by the model alone: a quantized base holds the quantized weights of exactly the model
    that ``full_precision_of`` builds, so merges can be compared with the original weights.
    ``capacities`` (GPU index: bytes) are the GPUs of a worker that owns several: a base too large
    for the first is spread over them (``placement``).
    """
    torch.manual_seed(seed_for(model.id))
    config_dict = model.config_dict()
    dtype = weight_dtype(quant, config_dict)
    spread = placement.device_map(build_meta(config_dict), capacities, dtype) if capacities else None
    if model.kind == "checkpoint":
        return load_checkpoint(model.path, quant, device, config_dict, spread)
    if spread is not None:  # made on the host, then each block to its GPU
        base = placement.dispatch(instantiate(config_dict, "cpu", dtype), spread)
    else:
        base = instantiate(config_dict, device, dtype)
    if quant.is_quantized:
        quantize.quantize_model(base, quant)
    return base


def full_precision_of(model: ModelSpec, quant: QuantSpec, device: str, capacities: dict[int, int] | None = None) -> nn.Module:
    """The weights a quantized base was made from: the same model in its compute dtype."""
    return build_base(model, full_precision(quant), device, capacities)


def load_checkpoint(path: str, quant: QuantSpec, device: str, config_dict: dict[str, Any], spread: dict[str, Any] | None = None) -> nn.Module:
    """A local checkpoint through ``from_pretrained``, quantized by transformers' own loader with
    the format's ``quantization_config``, onto ``device`` or over the GPUs of ``spread``
    (``placement.device_map``). A format whose loader refuses these devices (HQQ on the CPU) is
    loaded in its compute dtype and quantized in place, as a registry base is."""
    cls = model_class(config_dict)
    dtype = weight_dtype(quant, config_dict)
    found = formats.of(quant)
    device_map = spread or {"": device}
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map}
    in_place = quant.is_quantized and not found.loads_pretrained_on({torch.device(d).type for d in device_map.values()})
    if quant.is_quantized and not in_place:
        kwargs["quantization_config"] = found.pretrained_config(quant)
    model = cls.from_pretrained(path, **kwargs)
    if in_place:
        return quantize.quantize_model(model, quant)
    found.after_build(model)
    return model


def free_memory(gpu: Any = None) -> None:
    """After the last reference to a model is dropped: collect cycles, return cached device memory
    (``gpu``: a ``measure.gpu.Gpu``, or ``None`` on the CPU)."""
    gc.collect()
    if gpu is not None:
        gpu.empty_cache()
