"""Where a base's weights go when its worker owns several GPUs: one GPU if they fit, else spread.

A worker of ``--lora-gpus-per-worker=K`` sees K GPUs. A base whose weights fit in the share of
one GPU that weights may take (``WEIGHT_SHARE``: the rest is the step's adapter, gradients,
optimizer state and activations) is built on the first, as on a one-GPU worker: spreading a
model that fits would only add transfers between GPUs to its step time. A larger base is spread
as transformers' ``device_map="auto"`` spreads a checkpoint: accelerate's balanced budget per GPU
(``get_balanced_memory``), then whole blocks per GPU (``infer_auto_device_map``, never splitting
the model's ``_no_split_modules``), then hooks that move each block's inputs to its GPU
(``dispatch_model``).

A base is built in its compute dtype and quantized in place afterwards, so the full-precision
weights must fit while it is built: the map is computed for those bytes. Random weights are made
on the host and then dispatched (the host needs the model's full-precision bytes of memory); a
local checkpoint is loaded by transformers straight onto the GPUs of the map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

WEIGHT_SHARE = 0.8  # of each GPU's memory, what a base's weights may fill


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The bytes of every parameter and buffer of ``model`` (a meta model: no memory) in ``dtype``."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size()) for tensor in tensors)


def budgets(capacities: dict[int, int]) -> dict[int, int]:
    """What weights may take of each GPU: ``WEIGHT_SHARE`` of its memory."""
    return {index: int(total * WEIGHT_SHARE) for index, total in capacities.items()}


def device_map(meta_model: nn.Module, capacities: dict[int, int], dtype: torch.dtype) -> dict[str, Any] | None:
    """accelerate's map of ``meta_model`` over the GPUs of ``capacities`` (index: total bytes), or
    ``None`` when the weights fit on the first GPU (or there is only one). Weights larger than all
    the GPUs hold at ``WEIGHT_SHARE`` are ``torch.OutOfMemoryError`` before anything is built: the
    config is recorded as ``oom``, as a step that runs out of memory is, and the run goes on."""
    budget = budgets(capacities)
    needed = weight_bytes(meta_model, dtype)
    if len(budget) < 2 or needed <= budget[min(budget)]:
        return None
    if needed > sum(budget.values()):
        raise torch.OutOfMemoryError(f"out of memory: the base's weights need {needed / 2**30:.1f} GiB in {dtype}; the worker's {len(budget)} GPUs hold "
                         f"{sum(budget.values()) / 2**30:.1f} GiB at {WEIGHT_SHARE:.0%} of their memory; "
                         "allowed: more GPUs per worker (--lora-gpus-per-worker) or a smaller model")
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(meta_model, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(meta_model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    return infer_auto_device_map(meta_model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)


def dispatch(model: nn.Module, mapping: dict[str, Any]) -> nn.Module:
    """Move each block of ``model`` to its device of ``mapping``, with hooks that bring every
    block its inputs on that device (accelerate's ``dispatch_model``)."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=mapping)

