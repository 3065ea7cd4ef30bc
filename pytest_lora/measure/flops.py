"""Model FLOPs of a LoRA training step, for tokens/s and MFU.

PaLM (arXiv 2204.02311, appendix B) counts 6N + 12 L H Q T FLOPs per token for training: 2N
forward, 4N backward (gradients of activations and of weights), and the attention scores and
values. LoRA never computes the weight gradients of the frozen weights, so the frozen part costs
4N (2N forward, 2N for the activation gradients) and the adapter 6 N_lora. Here N is the weights
of every matrix multiply: all Linear and Conv1D layers, the output layer included, embedding
lookups excluded. The attention term counts every attention sub-layer (self and, in
encoder-decoder models, cross), with keys of the batch's sequence length.

Like PaLM's, this count ignores that autograd skips the input gradient of the layers that read the
frozen embeddings directly (the first block's projections): an overcount of a fraction 1/L of those
layers' backward, checked against ``torch.utils.flop_counter`` in the tests. DoRA's magnitude
arithmetic is elementwise and not counted.
"""

from __future__ import annotations

from typing import Any

import peft
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..specs import WorkloadSpec
from ..models import build
from .params import closed_form


def matmul_weights(model: nn.Module) -> int:
    """Weights that take part in a matrix multiply: every Linear / Conv1D module (tied ones too)."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, Conv1D):
            total += module.nx * module.nf
    return total


def attention_layers(config_dict: dict[str, Any]) -> int:
    """Attention sub-layers a token passes: decoder-only L; encoder-decoder L_enc + 2 L_dec."""
    config = build.transformers_config(config_dict)
    if getattr(config, "is_encoder_decoder", False):
        return config.num_hidden_layers + 2 * getattr(config, "num_decoder_layers", config.num_hidden_layers)
    return config.num_hidden_layers


def attention_width(config_dict: dict[str, Any]) -> int:
    """H x Q: heads times head dimension of the queries."""
    config = build.transformers_config(config_dict)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def lora_step_flops(config_dict: dict[str, Any], lora: peft.LoraConfig, workload: WorkloadSpec) -> int:
    """FLOPs of one LoRA training step: (4 N + 6 N_lora + 12 L H Q T) per token, times the tokens."""
    meta = build.build_meta(config_dict)
    frozen = matmul_weights(meta)
    adapter = closed_form(meta, lora).trainable
    attention = 12 * attention_layers(config_dict) * attention_width(config_dict) * workload.seq_len
    return (4 * frozen + 6 * adapter + attention) * workload.tokens
