"""The optimizer of a training step, and the bytes of state it keeps, measured and in closed form.

AdamW keeps two fp32 moments per trainable parameter (torch adds a 4-byte step counter per
tensor). bitsandbytes' 8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization") keeps each moment as one uint8 per parameter, quantized in blocks with one fp32
absmax per block and per moment, through two 256-entry fp32 maps (signed for the first moment,
unsigned for the second) that every parameter of the optimizer shares. Tensors smaller than its
``min_8bit_size`` (4096 by default) keep fp32 moments, as do its 32-bit optimizers; its step
counter is a Python int. Paged optimizers allocate the moments of tensors of at least 1e5
elements in CUDA unified memory (``F.get_paged``), which the driver moves to the host under memory
pressure; on the CPU bitsandbytes warns and falls back to ordinary tensors.

The block size is bitsandbytes' own: ``block_size()`` reads it off a probe step rather than
assuming 256 (it was 2048 before 0.45), so the closed form follows the installed library.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..specs import OptimizerSpec
from . import step

BNB_CLASSES = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "paged_adamw": "PagedAdamW"}
PAGED_MIN_ELEMENTS = 100_000  # bitsandbytes pages only moments at least this large


@dataclass
class Built:
    """An optimizer, and whether its paged state really is paged (``fell_back``: it is not, and
    the warning bitsandbytes gave)."""

    optimizer: torch.optim.Optimizer
    spec: OptimizerSpec
    fell_back: str | None = None


def make(spec: OptimizerSpec, parameters: Iterable[torch.nn.Parameter], lr: float) -> Built:
    """The optimizer of ``spec`` over ``parameters``. A paged optimizer on the CPU is bitsandbytes'
    non-paged fallback: that is said in ``fell_back``, so no figure calls it paged."""
    parameters = list(parameters)
    if spec.library == "torch":
        return Built(torch.optim.AdamW(parameters, lr=lr), spec)
    import bitsandbytes as bnb

    optimizer = getattr(bnb.optim, BNB_CLASSES[spec.name])(parameters, lr=lr)
    fell_back = None
    if spec.paged and any(p.device.type != "cuda" for p in parameters):
        fell_back = f"{spec.name} on {parameters[0].device.type}: bitsandbytes falls back to non-paged state (paging needs CUDA unified memory)"
    return Built(optimizer, spec, fell_back)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, each storage once (bitsandbytes' maps are
    one pair of tensors shared by every parameter)."""
    seen: dict[tuple[str, int], int] = {}
    for values in optimizer.state.values():
        for value in values.values():
            if isinstance(value, torch.Tensor):
                seen[(value.device.type, value.data_ptr())] = value.numel() * value.element_size()
    return sum(seen.values())


def eight_bit_share(optimizer: torch.optim.Optimizer) -> float:
    """The share of the trainable parameters whose moments are kept in 8 bits (bitsandbytes'
    uint8 ``state1``): 0 for torch's AdamW, and for an 8-bit optimizer whose every tensor is under
    ``min_8bit_size`` (an fp32 state under an 8-bit name)."""
    total = eight = 0
    for parameter, values in optimizer.state.items():
        total += parameter.numel()
        moment = values.get("state1")
        if isinstance(moment, torch.Tensor) and moment.dtype == torch.uint8:
            eight += parameter.numel()
    return eight / total if total else 0.0


def analytic_eight_bit_share(spec: OptimizerSpec, tensor_sizes: Iterable[int]) -> float:
    """``eight_bit_share`` in closed form: of an 8-bit optimizer's parameters, those in tensors of
    at least ``min_8bit_size`` elements."""
    sizes = list(tensor_sizes)
    if spec.library == "torch" or spec.bits == 32 or not sizes:
        return 0.0
    return sum(n for n in sizes if n >= min_8bit_size()) / sum(sizes)


def paged_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state bitsandbytes put in CUDA unified memory (its paged tensors)."""
    return sum(value.numel() * value.element_size() for values in optimizer.state.values()
               for value in values.values() if isinstance(value, torch.Tensor) and getattr(value, "is_paged", False))


@functools.lru_cache(maxsize=None)
def block_size() -> int:
    """The block size of bitsandbytes' 8-bit optimizer state, read from one step on a probe tensor:
    ``blocks`` absmax values for ``n`` elements."""
    import bitsandbytes as bnb

    n = 1 << 16
    probe = torch.nn.Parameter(torch.zeros(n))
    optimizer = bnb.optim.AdamW8bit([probe], lr=0.0, min_8bit_size=1)
    probe.grad = torch.ones(n)
    optimizer.step()
    return n // optimizer.state[probe]["absmax1"].numel()


def min_8bit_size() -> int:
    """bitsandbytes' default size under which a tensor keeps fp32 moments."""
    import inspect

    import bitsandbytes as bnb

    return inspect.signature(bnb.optim.AdamW8bit).parameters["min_8bit_size"].default


def analytic_state_bytes(spec: OptimizerSpec, tensor_sizes: Iterable[int]) -> int:
    """The optimizer state for trainable tensors of ``tensor_sizes`` elements, in closed form
    (``step.optimizer_state_bytes``, with the installed bitsandbytes' constants)."""
    return step.optimizer_state_bytes(spec, tensor_sizes, eight_bit_constants(spec))


def eight_bit_constants(spec: OptimizerSpec) -> tuple[int, int] | None:
    """(``min_8bit_size``, block size) of the installed bitsandbytes for an 8-bit optimizer
    (read off the library: imports it), ``None`` for any other."""
    return (min_8bit_size(), block_size()) if spec.bits == 8 else None


def analytic_paged_bytes(spec: OptimizerSpec, tensor_sizes: Iterable[int], device: str) -> int:
    """The state a paged optimizer puts in unified memory: moments of tensors of at least 1e5
    elements on a CUDA device (none on the CPU, where it falls back)."""
    if not spec.paged or device != "cuda":
        return 0
    per_element = 4 if spec.bits == 32 else 1
    threshold = 0 if spec.bits == 32 else min_8bit_size()
    return sum(2 * per_element * n for n in tensor_sizes if n >= PAGED_MIN_ELEMENTS and n >= threshold)


def release(optimizer: torch.optim.Optimizer) -> None:
    """Drop the optimizer's state, and its paged buffers from bitsandbytes' global page manager,
    which would otherwise keep them for the process."""
    paged = [value for values in optimizer.state.values() for value in values.values()
             if isinstance(value, torch.Tensor) and getattr(value, "is_paged", False)]
    manager = getattr(optimizer, "page_mng", None)
    if paged and manager is not None:
        ids = {id(value) for value in paged}
        manager.paged_tensors[:] = [t for t in manager.paged_tensors if id(t) not in ids]
    optimizer.state.clear()


@contextlib.contextmanager
def quiet_fallback() -> Iterator[None]:
    """bitsandbytes' warning that a paged optimizer falls back on the CPU: ``make`` records it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        yield
