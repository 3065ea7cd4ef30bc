"""A GPU memory budget as a test: ``@pytest.mark.lora_limit_memory("24 GiB")`` and ``--lora-limit-memory``.

"This QLoRA config fits a 24 GB card" becomes a line in a test. On a GPU, a config fails when its
peak reserved bytes exceed the budget: the step's peak that the memory suite records
(``peak_reserved_bytes``, cache emptied first), or, for a test of your own that records none, the
allocator's peak reserved bytes over the test's call. Reserved, not allocated: the caching
allocator's reserve is what another process on the card can't have.

On the CPU there is no device peak: the check uses the analytic step model
(``measure.memory.analytic_step``: weights in their format, adapter, gradients, AdamW state,
activations) and the failure message and the record say so. The marker applies to its test; the
option to every test that measures a step (a record with ``peak_reserved_bytes`` on a GPU or
``analytic_bytes`` on the CPU). The marker wins over the option.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest

from .gate.rules import RuleError, size_in_bytes

MARKER = "lora_limit_memory"
MARKER_LINE = f"{MARKER}(size): fail the config if its peak reserved GPU memory (analytic step on the CPU) exceeds size, e.g. '24 GiB'"
PEAK_KEY = pytest.StashKey[int]()


def check_markers(items: list[pytest.Item]) -> None:
    """Every ``lora_limit_memory`` marker names one size: a usage error (exit 4) before anything runs."""
    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is not None:
            marker_limit(item)


def marker_limit(item: pytest.Item) -> int | None:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    where = f"{MARKER} marker of {item.nodeid}"
    if len(marker.args) != 1 or marker.kwargs:
        raise pytest.UsageError(f"{where}: takes one size, got {marker.args!r}; allowed: e.g. {MARKER}('24 GiB')")
    try:
        return size_in_bytes(marker.args[0], where)
    except RuleError as error:
        raise pytest.UsageError(str(error)) from None


def option_limit(setting: Any) -> int | None:
    """``--lora-limit-memory``'s bytes, checked when pytest configures."""
    if not setting.value:
        return None
    try:
        return size_in_bytes(setting.value, setting.describe())
    except RuleError as error:
        raise pytest.UsageError(str(error)) from None


@contextlib.contextmanager
def peak_watch(item: pytest.Item, lora: Any) -> Iterator[None]:
    """On a GPU, the peak reserved bytes over the call of a test with the marker."""
    if item.get_closest_marker(MARKER) is None or lora.gpu is None:
        yield
        return
    gpu = lora.gpu
    gpu.synchronize()
    gpu.reset_peak()
    try:
        yield
    finally:
        gpu.synchronize()
        item.stash[PEAK_KEY] = gpu.peak_reserved()


def exceeded(item: pytest.Item, recorder: Any, lora: Any) -> str | None:
    """Why the config is over its budget, or ``None``; the check goes into the record."""
    limit, from_marker = marker_limit(item), True
    if limit is None:
        limit, from_marker = lora.memory_limit, False
    if limit is None:
        return None
    value, basis = _measured(item, recorder, lora, estimate=from_marker)
    if value is None:
        if not from_marker:
            return None  # the option holds each config once: in the test that measures its step
        return (f"{MARKER}: {item.nodeid} has no peak to check: it records no {basis} and has no "
                "model, quant and LoRA parameters to estimate one; allowed: a test of the matrix or one that records it")
    recorder.budget = {"limit_bytes": limit, "checked": basis, "bytes": value, "within": value <= limit}
    if value <= limit:
        return None
    return f"memory budget {_gib(limit)} exceeded: {basis} {_gib(value)} ({value:,d} B > {limit:,d} B)"


def _measured(item: pytest.Item, recorder: Any, lora: Any, estimate: bool) -> tuple[int | None, str]:
    """The bytes to hold to the budget and what they are: what the test recorded, else (for a
    marked test, ``estimate``) the peak over its call on a GPU or its config's analytic step."""
    if lora.gpu is not None:
        value = recorder.metrics.get("peak_reserved_bytes")
        if value is None and estimate:
            value = item.stash.get(PEAK_KEY, None)
        return value, "peak reserved bytes"
    basis = "analytic step model (no GPU here: weights, adapter, gradients, AdamW state and activations, not a measured peak)"
    value = recorder.metrics.get("analytic_bytes")
    if value is None and estimate:
        value = _analytic(item, lora)
    return value, basis


def _analytic(item: pytest.Item, lora: Any) -> int | None:
    """The analytic step of the test's own config, with the matrix's first workload if it has none."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if not all(name in params for name in ("model_spec", "quant_spec", "lora_spec")):
        return None
    import peft

    from .measure import memory

    workload = params.get("workload_spec") or lora.matrix.workloads[0]
    config = params["model_spec"].config_dict()
    lora_config = peft.LoraConfig(**params["lora_spec"].peft_kwargs())
    return memory.analytic_step(config, params["quant_spec"], lora_config, workload, device=lora.device_kind).total


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"
