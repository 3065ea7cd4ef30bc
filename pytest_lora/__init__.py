"""pytest-lora: a pytest plugin and benchmark harness for LoRA and QLoRA fine-tuning.

``count_parameters``, ``ParamCount`` and ``estimate_memory`` are loaded on first use: importing
the plugin (which pytest does in every project where it is installed) must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .quiet import silence_library_logs

silence_library_logs()
__version__ = "0.1.0"
__all__ = ["ParamCount", "count_parameters", "estimate_memory", "__version__"]

if TYPE_CHECKING:
    from .estimate import estimate_memory
    from .measure.params import ParamCount, count_parameters


def __getattr__(name: str) -> Any:
    if name in ("ParamCount", "count_parameters"):
        from .quiet import library_warnings_silenced

        with library_warnings_silenced():  # torch and transformers warn about themselves on import
            from .measure import params

        return getattr(params, name)
    if name == "estimate_memory":  # imports torch only when the step model is not cached
        from .estimate import estimate_memory

        return estimate_memory
    raise AttributeError(f"module 'pytest_lora' has no attribute {name!r}")
