"""Figures measured elsewhere that our numbers are held against.

``H200``: one NVIDIA H200, plain transformers + peft + bitsandbytes 0.50.2, random weights of the
real shapes, LoRA r=16 alpha 32 on all linear layers, AdamW, sdpa attention, sequence 2048;
median of 6 steps after 2 warm-up steps; peak allocated is torch's ``max_memory_allocated`` over
the training steps (the build excluded). Source: the device notes that come with this project
(``shared/device/README.md``). The 8B rows were measured on the Llama-3-8B shape, whose matrices
are those of ``llama-3.1-8b``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepFigure:
    model: str
    quant: str
    batch: int
    grad_ckpt: bool
    step_ms: float
    tokens_per_s: float
    peak_allocated_gib: float
    weights_gib: float

    @property
    def key(self) -> tuple[str, str, int, bool]:
        return (self.model, self.quant, self.batch, self.grad_ckpt)


H200 = (
    StepFigure("llama-3.2-1b", "bf16", 4, False, 226, 36_178, 34.0, 2.87),
    StepFigure("llama-3.2-1b", "nf4", 4, False, 222, 36_837, 32.7, 1.55),
    StepFigure("llama-3.1-8b", "bf16", 2, False, 463, 8_840, 57.4, 15.18),
    StepFigure("llama-3.1-8b", "nf4", 2, False, 467, 8_770, 47.5, 5.53),
    StepFigure("llama-3.1-8b", "nf4", 2, True, 664, 6_169, 12.5, 5.53),
)
