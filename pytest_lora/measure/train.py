"""One LoRA training step on synthetic tokens: forward, backward, optimizer step, zero_grad.

The step is split into phases so that suites can measure each (memory per phase, time per
step). Token ids are drawn from a generator seeded by the caller: the same config gives the same
batch. Causal and masked LMs learn to predict their own input; encoder-decoder models get the
same ids as labels (transformers shifts them into decoder inputs).

Gradient checkpointing uses transformers' non-reentrant checkpointing of each layer, switched on
for the step and off again afterwards (hooks included), because the base is shared with later tests.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..specs import OPTIMIZERS, OptimizerSpec, WorkloadSpec
from . import optimizers


def synthetic_batch(vocab_size: int, workload: WorkloadSpec, device: str | torch.device, seed: int) -> dict[str, torch.Tensor]:
    """``batch`` sequences of ``seq_len`` random token ids, as input and labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (workload.batch, workload.seq_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids}


@contextlib.contextmanager
def checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing on ``model`` for the block, off again after it, leaving no hook behind.

    Non-reentrant checkpointing, with gradients required at the input embeddings' output (with
    the reentrant variant and a frozen base, no gradient would reach the adapters of checkpointed
    layers); ``TrainStep`` turns the KV cache off. transformers registers that embedding hook in
    ``gradient_checkpointing_enable`` but removes it in ``gradient_checkpointing_disable`` only
    when the model says peft loaded it (``_hf_peft_config_loaded``, which ``get_peft_model`` never
    sets): on a shared base the hooks would pile up, one per checkpointed test, and change every
    later step. They are removed here unless they were there before.
    """
    if not enabled:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    had_hooks = bool(getattr(base, "_require_grads_hooks", None))
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    api = "activation_checkpointing" if hasattr(base, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(base, f"{api}_enable")(**{f"{api}_kwargs": {"use_reentrant": False}})
    if not getattr(base, "_require_grads_hooks", None):  # pragma: no cover - transformers >= 5.17 registers it for every model that reads input_ids, as all of ours do
        base.enable_input_require_grads()
    try:
        yield
    finally:
        getattr(base, f"{api}_disable")()
        if not had_hooks:
            base.disable_input_require_grads()


@contextlib.contextmanager
def compiled(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """``torch.compile(model)`` for the block when enabled; dynamo's caches are reset afterwards,
    because their guards hold the shared base alive."""
    if not enabled:
        yield model
        return
    try:
        yield torch.compile(model)
    finally:
        torch._dynamo.reset()


class TrainStep:
    """A LoRA training step over the trainable parameters, phase by phase, with AdamW or the
    optimizer of ``optimizer`` (an ``OptimizerSpec``: bitsandbytes' 8-bit and paged AdamW)."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, optimizer: OptimizerSpec | None = None):
        self.model = model.train()  # once, not per step: walking thousands of modules is harness overhead
        self.built = optimizers.make(optimizer or OPTIMIZERS["adamw"], (p for p in model.parameters() if p.requires_grad), lr)
        self.optimizer = self.built.optimizer
        self.loss: torch.Tensor | None = None
        self.output: Any = None
        self._kwargs = {"use_cache": False} if _accepts_cache(model) else {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.output = self.model(**batch, **self._kwargs)
        self.loss = self.output.loss
        return self.loss

    def backward(self) -> None:
        self.loss.backward()
        self.loss = None
        self.output = None  # the logits go with it

    def optimizer_step(self) -> None:
        with optimizers.quiet_fallback():  # recorded as ``built.fell_back`` instead
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, batch: dict[str, torch.Tensor]) -> None:
        """All four phases: one full training step."""
        self.forward(batch)
        self.backward()
        self.optimizer_step()
        self.zero_grad()

    def close(self) -> None:
        """Drop gradients and optimizer state: nothing of the step survives it."""
        self.zero_grad()
        optimizers.release(self.optimizer)
        self.output = self.loss = None


def _accepts_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")
