"""pytest-lora: a pytest plugin and benchmark harness for LoRA and QLoRA fine-tuning.

``count_parameters`` and ``ParamCount`` are loaded on first use: importing the plugin (which
pytest does in every project where it is installed) must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .quiet import silence_library_logs

silence_library_logs()
__version__ = "0.1.0"
__all__ = ["ParamCount", "count_parameters", "__version__"]

if TYPE_CHECKING:
    from .measure.params import ParamCount, count_parameters


def __getattr__(name: str) -> Any:
    if name in ("ParamCount", "count_parameters"):
        from .quiet import library_warnings_silenced

        with library_warnings_silenced():  # torch and transformers warn about themselves on import
            from .measure import params

        return getattr(params, name)
    raise AttributeError(f"module 'pytest_lora' has no attribute {name!r}")
