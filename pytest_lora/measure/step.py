"""The analytic step's arithmetic: what a LoRA training step holds, term by term, at any workload.

Plain numbers, no torch: ``measure.memory`` fills them from the architecture on the meta device,
and ``pytest-lora estimate`` evaluates a stored one (its cache) without importing torch, which
alone takes longer than the estimate may.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..specs import WorkloadSpec

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

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepModel:
        terms = data["terms"]
        return cls(data["weights"], TrainingState(**data["training"]), None if terms is None else ActivationTerms(**terms))
