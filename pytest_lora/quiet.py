"""Library messages that say nothing to a pytest-lora user, silenced where the harness meets them.

Each entry names the message, who emits it and why it is noise here; every other warning stays
visible. The plugin adds the warning filters to pytest's own ``filterwarnings`` (a ``-W`` on the
command line still overrides them), ``count_parameters`` applies them around its work, and the
log filters (installed when the package is imported) drop the lines that bitsandbytes and
torchao log when they are imported. A logger's other messages still reach the user.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

# (start of the message, a regular expression; its category; why it is noise)
WARNINGS = (
    (
        "`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        "peft reads this deprecated transformers property when it wraps any model; nothing a user can change",
    ),
    (
        "`torch.jit.script_method` is deprecated",
        DeprecationWarning,
        "torch warns about its own torch.utils.mkldnn when transformers imports torch.fx",
    ),
    (
        "fan_in_fan_out is set to False but the target module is `Conv1D`",
        UserWarning,
        "peft sets fan_in_fan_out itself for GPT-2's Conv1D layers and says so on every adapter",
    ),
    (
        "The PEFT config's `base_model_name_or_path` was renamed from",
        UserWarning,
        "one LoraConfig of the matrix goes on several bases (the built base, the meta-device model that counts, "
        "copies); peft writes each base's name into it and warns when the next differs. No adapter saved here is "
        "reloaded by that name",
    ),
    (
        "Merge lora module to (4|8)-bit linear may get different generations",
        UserWarning,
        "the merge suite merges into quantized layers on purpose and measures that rounding",
    ),
)
# the same, as lines of pytest's ``filterwarnings``
WARNING_FILTERS = tuple(f"ignore:{message}:{category.__name__}" for message, category, _ in WARNINGS)

# (logger, start of a message it logs, why it says nothing here)
LOG_MESSAGES = (
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "bitsandbytes tries to fetch a faster 4-bit CPU kernel from the hub at import and falls back to its own; nothing "
        "here may download, and the fallback is what the numbers are measured on",
    ),
    (
        "torchao",
        "Failed to load ",
        "torchao's wheel carries CUDA extensions for GPUs and ABIs it may not run on (_C_mxfp8, _C_cutlass_90a) and logs "
        "each it cannot load at import; the formats measured here do not use them, and a format that needs a kernel "
        "says so when it is asked (formats.unavailable)",
    ),
    (
        "torchao.kernel.intmm",
        "Warning: Detected no triton",
        "torchao logs at import that Triton is missing (there is none for the CPU); its int8 matrix products fall back to torch",
    ),
    (
        "torch.utils._pytree",
        "%s is an Enum subclass and is now natively supported by torch.compile",
        "torchao registers its enums with register_constant() at import, which torch 2.13 deprecates, once per enum in "
        "280-column lines; nothing a user can change",
    ),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_library_logs() -> None:
    """Install the log filters (once); cheap, and imports nothing."""
    for name, start, _ in LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))


@contextmanager
def library_warnings_silenced() -> Iterator[None]:
    """The warning filters, for code that runs outside pytest (``count_parameters``)."""
    with warnings.catch_warnings():
        for message, category, _ in WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
