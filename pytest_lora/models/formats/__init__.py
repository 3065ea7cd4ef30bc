"""Quantization formats as one seam: every question about a stored weight goes through here.

A format (``specs.QuantSpec``, one entry of ``specs.QUANTIZATIONS``) names its backend; each
backend is one ``Format`` object in its own module of this package, found through ``BACKENDS``.
Building, the memory model, parameter counting, merging and the suites ask that object how to
quantize a Linear, how to dequantize one, what its storage costs, what peft needs to dispatch its
LoRA layers and how a merge treats it. None of them checks a format name or a layer class.

A backend module is imported only when a format of it is used, and an installed but unused
backend is never imported: ``layer_format`` asks only the backends whose library is already
loaded (a layer of a library that was never imported cannot exist).

Adding a backend: a module here with a ``FORMAT`` (a ``Format`` subclass), one line in
``BACKENDS``, its formats in ``specs.QUANTIZATIONS`` and its group sizes in ``specs.GROUP_SIZES``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from typing import Any

from ...specs import QuantSpec
from .base import FORMAT as PLAIN
from .base import Format, plain_parts  # noqa: F401  (plain_parts: for readers of storages)

BACKENDS = {
    "dtype": "pytest_lora.models.formats.base",
    "bitsandbytes": "pytest_lora.models.formats.bnb",
    "torchao": "pytest_lora.models.formats.ao",
    "hqq": "pytest_lora.models.formats.hqq",
}
"""Backend name: the module that holds its ``FORMAT``."""

INSTALL_HINTS = {"torchao": "pip install 'pytest-lora[torchao]'", "hqq": "pip install 'pytest-lora[hqq]'"}


def of(quant: QuantSpec) -> Format:
    """The format object of a quantization spec (its backend's module is imported here)."""
    return importlib.import_module(BACKENDS[quant.backend]).FORMAT


@functools.lru_cache(maxsize=None)
def unavailable(quant: QuantSpec, device: str) -> str | None:
    """Why ``quant`` cannot run on ``device`` here, or ``None`` when it can.

    A backend that is not installed is named with how to install it; an installed one is asked
    whether its kernels run on the device (torchao's int4 has none for the CPU).
    """
    library = _library(quant.backend)
    if library is not None and importlib.util.find_spec(library) is None:
        hint = INSTALL_HINTS.get(quant.backend, f"pip install {library}")
        return f"{quant.name} needs {library}, which is not installed ({hint})"
    return of(quant).unavailable(quant, device)


def layer_format(module: Any) -> Format | None:
    """The format that stores ``module`` as a quantized layer, or ``None`` for a plain module."""
    return next((found for found in _loaded_formats() if found.owns(module)), None)


def _library(backend: str) -> str | None:
    return None if backend == "dtype" else backend


def dequantized(module: Any) -> Any:
    """A layer's weight as float32 in its stored layout ((out, in) for a quantized layer),
    dequantized by its format when one stores it."""
    return (layer_format(module) or PLAIN).dequantize(module)


def stored_tensors(module: Any) -> list[Any]:
    """The tensors a module holds itself (not its children's): what its storage is made of."""
    return (layer_format(module) or PLAIN).stored_tensors(module)


def _loaded_formats() -> list[Format]:
    return [importlib.import_module(path).FORMAT for backend, path in BACKENDS.items()
            if _library(backend) is not None and _library(backend) in sys.modules]


def layer_states(model: Any) -> list[tuple[Format, Any]]:
    """What tests may change inside a shared base's quantized layers, per loaded backend."""
    return [(found, found.layer_state(model)) for found in _loaded_formats()]


def restore_layer_states(model: Any, states: list[tuple[Format, Any]]) -> None:
    for found, state in states:
        found.restore_layer_state(model, state)
