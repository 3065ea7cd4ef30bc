"""Hooks that pytest-lora adds to pytest, for plugins and conftest files to implement."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec(firstresult=True)
def pytest_lora_gpu(config: pytest.Config) -> Any:
    """The GPU the bench measures on, as a ``pytest_lora.measure.gpu.Gpu``; ``False`` for none.

    ``None`` means "no answer here" and lets the next implementation answer (pytest's
    first-result hooks stop at the first value that is not ``None``).

    pytest-lora's own implementation (called last) returns the current CUDA device when torch sees
    one. A plugin can return another ``Gpu``: the plugin's tests hand one built on a fake CUDA
    runtime and a fake NVML, so that every GPU code path runs on the CPU. Called once per session,
    only when a test needs the device (so merely loading the plugin imports no torch).
    """
