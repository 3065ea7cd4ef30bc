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

# The same host, one-off figures (the estimate of make gpu-check's wall time uses them).
FIRST_STEP_S = 2.45  # the first training step of a process: library and allocator warm-up
BUILD_S = 0.08 + 0.15  # the 8B shape in nf4: built in bf16 on the GPU, then each Linear weight quantized in place
SAVE_PRETRAINED_S, SAVE_PRETRAINED_GIB = 4.2, 2.87  # save_pretrained of the 1B shape; its size not given there: its bf16 weights assumed
FROM_PRETRAINED_S = 0.53  # from_pretrained of the 1B shape with BitsAndBytesConfig(load_in_4bit=True)
