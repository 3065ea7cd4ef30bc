"""The analytic step's arithmetic: what a LoRA training step holds, term by term, at any workload.

Plain numbers, no torch: ``step_model`` takes the architecture's layout (``models.layout``), the
format, the LoRA config and the optimizer. ``measure.memory`` hands it the layout read on the
meta device; ``pytest-lora estimate`` a shipped or cached one, without importing torch, which
alone takes longer than the estimate may.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..models import storage
from ..models.layers import rank_of
from ..models.layout import Layout
from ..specs import OptimizerSpec, QuantSpec, WorkloadSpec

ACTIVATION_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama"}
"""The ``model_type`` values whose layers the activation model knows -> the family whose layer
model (``_LAYERS``) they share."""


@dataclass(frozen=True)
class TrainingState:
    """Bytes of the trainable parameters, their gradients and the optimizer's state."""

    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


@dataclass(frozen=True)
class ActivationTerms:
    """What a training step keeps for backward, and what it holds beside it, in bytes per token.

    ``layer`` is one layer's saved tensors with its adapters' (a mean over the ``layers``);
    ``checkpoint`` what a checkpointed layer keeps instead (its input); ``head`` the loss's fp32
    log-probabilities and the labels; ``logits`` what exists only at the start of backward: the
    returned logits and their fp32 and compute-dtype gradients.
    """

    layers: int
    layer: float
    checkpoint: float
    head: float
    logits: float

    def kept(self, grad_ckpt: bool) -> float:
        """Saved for backward when the forward ends; with checkpointing, one layer's tensors are
        rebuilt at a time during backward and counted once."""
        stack = self.layers * self.checkpoint + self.layer if grad_ckpt else self.layers * self.layer
        return stack + self.head

    def at_peak(self, grad_ckpt: bool) -> tuple[float, float]:
        """(saved activations, logits with their gradients) at the step's peak. Without
        checkpointing the peak is the start of backward: everything saved, and the logits'
        gradients. With it, the head's peak (its log-probabilities and the logits' gradients) is
        over before the first layer is rebuilt: the larger of the two counts, not their sum."""
        if not grad_ckpt:
            return self.kept(False), self.logits
        stack = self.layers * self.checkpoint
        if self.head + self.logits >= self.layer:
            return stack + self.head, self.logits
        return stack + self.layer, 0.0


@dataclass(frozen=True)
class StepEstimate:
    """The analytic memory of one training step, term by term (bytes). ``activations`` is what
    the forward keeps; ``peak_activations`` and ``peak_logits`` are the activations and the
    logits (with their gradients) at the step's peak (``ActivationTerms.at_peak``)."""

    weights: int
    training: TrainingState
    activations: int | None
    backward_transient: int | None
    peak_activations: int | None = None
    peak_logits: int | None = None

    @property
    def total(self) -> int | None:
        """The step's peak: weights, adapter with gradients and optimizer state, and the
        activations and logits at the peak."""
        if self.peak_activations is None or self.peak_logits is None:
            return None
        return self.weights + self.training.total + self.peak_activations + self.peak_logits


@dataclass(frozen=True)
class StepModel:
    """The analytic step of one architecture, format, adapter and optimizer at any workload: the
    bytes that do not depend on the tokens, and the per-token terms (``None``: not modelled).
    Searching for the largest batch that fits evaluates it many times without building again."""

    weights: int
    training: TrainingState
    terms: ActivationTerms | None

    def at(self, workload: WorkloadSpec) -> StepEstimate:
        if self.terms is None:
            return StepEstimate(self.weights, self.training, None, None)
        tokens = workload.tokens
        saved, logits = self.terms.at_peak(workload.grad_ckpt)
        return StepEstimate(self.weights, self.training, int(self.terms.kept(workload.grad_ckpt) * tokens), int(self.terms.logits * tokens),
                            int(saved * tokens), int(logits * tokens))


def step_model(layout: Layout, config_dict: dict[str, Any], quant: QuantSpec, lora: Any, optimizer: OptimizerSpec,
               device: str = "cuda", eight_bit: tuple[int, int] | None = None,
               tensor_bytes: Callable[[int, int, QuantSpec], int] = storage.quantized_bytes) -> StepModel:
    """The step of the architecture ``layout`` (of ``config_dict``) stored as ``quant``, with the
    LoRA config ``lora`` (a ``peft.LoraConfig`` or anything with its fields) trained by
    ``optimizer``, on a GPU (``device="cpu"``: as the CPU runs it, whose dropout keeps more).
    ``eight_bit``: the installed bitsandbytes' constants, for an 8-bit optimizer;
    ``tensor_bytes``: what a quantized weight costs (``Layout.weight_bytes``)."""
    element_bytes = storage.DTYPE_BYTES[storage.build_dtype(quant, config_dict)]
    adapted = layout.adapted(lora)
    training = training_state(layout.trainable_sizes(lora), optimizer, eight_bit)
    ranks = {name: rank_of(name, lora) for name in adapted}
    terms = activation_terms(config_dict, adapted, ranks, lora.lora_dropout, element_bytes, lora.use_dora, device)
    return StepModel(layout.weight_bytes(quant, element_bytes, tensor_bytes), training, terms)


def training_state(tensor_sizes: list[int], optimizer: OptimizerSpec, eight_bit: tuple[int, int] | None = None) -> TrainingState:
    """fp32 adapter, fp32 gradients, and the optimizer's state in closed form
    (``optimizer_state_bytes``; AdamW: two fp32 moments and a 4-byte step per tensor)."""
    trainable = sum(tensor_sizes)
    return TrainingState(4 * trainable, 4 * trainable, optimizer_state_bytes(optimizer, tensor_sizes, eight_bit))


MAP_ENTRIES = 256  # bitsandbytes' dynamic quantization maps: one entry per uint8 code


def optimizer_state_bytes(spec: OptimizerSpec, tensor_sizes: Iterable[int], eight_bit: tuple[int, int] | None = None) -> int:
    """The optimizer state for trainable tensors of ``tensor_sizes`` elements, in closed form.

    AdamW (torch): 8 bytes per parameter and a 4-byte step per tensor. bitsandbytes 32-bit: 8 bytes
    per parameter. bitsandbytes 8-bit: a tensor under ``min_8bit_size`` as 32-bit; any other 2 bytes
    per parameter and 2 x 4 bytes per block; and the two 256-entry fp32 maps once. ``eight_bit``
    is (``min_8bit_size``, block size), read off the installed library
    (``optimizers.eight_bit_constants``).
    """
    sizes = list(tensor_sizes)
    if spec.library == "torch":
        return sum(8 * n + 4 for n in sizes)
    if spec.bits == 32:
        return sum(8 * n for n in sizes)
    if eight_bit is None:
        raise ValueError(f"{spec.name}: an 8-bit optimizer's state needs bitsandbytes' min_8bit_size and block size")
    threshold, block = eight_bit
    small = [n for n in sizes if n < threshold]
    large = [n for n in sizes if n >= threshold]
    maps = 2 * MAP_ENTRIES * 4 if large else 0
    return sum(8 * n for n in small) + sum(2 * n + 8 * math.ceil(n / block) for n in large) + maps


# --------------------------------------------------------------------------- activations


_FROZEN_INPUT = re.compile(r"\.layers\.0\.self_attn\.[qkv]_proj$")
"""Adapted layers whose input needs no gradient: the first layer's attention projections read the
frozen embeddings through a frozen norm, so their dropout keeps no mask (autograd saves it only
where a gradient flows back through the dropout)."""

DROPOUT_MASK_BYTES = {"cuda": 1, "cpu": 4}
"""What LoRA's dropout keeps per input element: on a GPU ``native_dropout``'s bool mask; on the
CPU, where torch has no fused kernel, the fp32 noise it multiplies by (``at::_dropout_impl``)."""


def activation_terms(config_dict: dict[str, Any], adapted: dict[str, tuple[int, int]], r_of: dict[str, int], dropout: float,
                     dtype_bytes: int, dora: bool = False, device: str = "cuda") -> ActivationTerms | None:
    """The per-token terms of the step's activations; ``None`` for an architecture outside
    ``ACTIVATION_FAMILIES``, which has no model here yet (an estimate says so instead of guessing).

    Per adapted layer, peft casts the input to the fp32 adapter dtype and LoRA keeps it (4 x in;
    with dropout, the fp32 dropout output and its mask, ``DROPOUT_MASK_BYTES``) and the fp32 rank-r
    output of A (4 r). DoRA also keeps three fp32 tensors of the layer's width for the magnitude's
    gradient (the base output, the LoRA output and their scaled sum: 12 x out). The mask is kept
    only where a gradient flows back through the dropout (``_FROZEN_INPUT``). The frozen
    layers are ``_layer_bytes``. The head keeps fp32 log-probabilities for the loss (4 V) and the
    labels (8 bytes a token); the frozen output layer keeps nothing more that autograd reports.
    """
    if config_dict["model_type"] not in ACTIVATION_FAMILIES:
        return None
    shape = _Shape.of(config_dict)
    mask = DROPOUT_MASK_BYTES[device] if dropout > 0 else 0
    lora = sum((4 + (0 if _FROZEN_INPUT.search(name) else mask)) * fan_in + 4 * r_of[name] + (12 * fan_out if dora else 0)
               for name, (fan_in, fan_out) in adapted.items())
    layer = _layer_bytes(shape, dtype_bytes) + lora / shape.layers
    vocab = config_dict["vocab_size"]
    return ActivationTerms(shape.layers, layer, dtype_bytes * shape.hidden, 4 * vocab + 8, (4 + 2 * dtype_bytes) * vocab)


@dataclass(frozen=True)
class _Shape:
    """A decoder layer's widths under one set of names: hidden, MLP, query and key/value widths."""

    layers: int
    hidden: int
    inner: int
    heads: int
    q: int
    kv: int

    @classmethod
    def of(cls, config_dict: dict[str, Any]) -> _Shape:
        h, heads = config_dict["hidden_size"], config_dict["num_attention_heads"]
        head_dim = config_dict.get("head_dim") or h // heads
        kv = config_dict.get("num_key_value_heads") or heads
        return cls(config_dict["num_hidden_layers"], h, config_dict["intermediate_size"], heads, heads * head_dim, kv * head_dim)


def _layer_bytes(shape: _Shape, p: int) -> float:
    """What one frozen Llama-family layer keeps per token, ``p`` bytes an activation: two RMSNorms
    keep their fp32 input and an fp32 reciprocal norm (4h + 4 each); attention keeps the rotated
    queries, keys and values and its output (p x (2 q + 2 kv)) and an fp32 log-sum-exp per head;
    the gated MLP keeps gate, up and SiLU(gate) (3 p I)."""
    return 2 * (4 * shape.hidden + 4) + p * (2 * shape.q + 2 * shape.kv) + 4 * shape.heads + 3 * p * shape.inner
