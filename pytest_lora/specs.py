"""The values a run is made of: what to build, how to store it, which adapter, which workload.

Frozen dataclasses with no behaviour beyond naming themselves, and the table of quantization
formats. This module is a leaf: the matrix (``matrix.py``) parses into these values, and
``models/`` and ``measure/`` take them; none of them is imported back from here, and nothing here
imports torch, so pytest can load the plugin without the heavy libraries.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


class MatrixError(ValueError):
    """A value of the matrix is wrong: says where it came from, what it was and what is allowed."""

    def __init__(self, where: str, value: Any, problem: str, allowed: str = ""):
        self.where, self.value, self.problem, self.allowed = where, value, problem, allowed
        text = f"{where}: {shortened(repr(value))} {problem}"
        if allowed:
            text += f"; allowed: {allowed}"
        super().__init__(text)


def shortened(text: str, limit: int = 80) -> str:
    """``text`` cut in the middle when longer than ``limit``, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text):,d} characters)"


def shown(value: Any) -> str:
    """A value quoted for a message, shortened when long."""
    return shortened(repr(value))


GROUP_SEPARATOR = "@"  # xdist's loadgroup appends "@<group>" to the ids of the tests it groups


def without_group(nodeid: str) -> str:
    """A test id as a serial run has it: xdist's ``loadgroup`` appends ``@<group>`` in workers, and
    the records, seeds and progress line must name (and seed) a test the same with and without -n."""
    return nodeid.split(GROUP_SEPARATOR, 1)[0]


def whole_number(value: Any) -> int | None:
    """``value`` as a non-negative integer written in ASCII digits, else ``None``.

    ``str.isdigit`` accepts superscripts and other digits that ``int`` refuses (``'²'``)."""
    text = str(value).strip()
    return int(text) if re.fullmatch(r"[0-9]+", text) else None


# --------------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class QuantSpec:
    """How the base model's weights are stored: one entry of the format table.

    ``backend`` names the library that stores the quantized layers (``dtype`` for none at all);
    ``models/formats`` holds one object per backend that knows how to quantize, dequantize and
    count them, and everything else asks that object. ``scheme`` is the backend's own name for
    the format (bitsandbytes ``int8``, ``nf4``, ``fp4``; torchao ``int8``, ``int4``; HQQ's bit
    width). ``dtype`` is the dtype of everything that is not quantized (embeddings, norms, the
    output layer) and the compute dtype of quantized layers; ``None`` means the model's own dtype
    as its config.json states it. ``group_size`` is the number of consecutive weights of a row
    that share a scale (bitsandbytes' 4-bit blocksize; ``None``: one scale per row).
    """

    name: str
    backend: str
    dtype: str | None
    scheme: str | None = None
    group_size: int | None = None
    double_quant: bool = False

    @property
    def is_quantized(self) -> bool:
        return self.backend != "dtype"

    @property
    def id(self) -> str:
        return self.name

    def with_group_size(self, group_size: int) -> QuantSpec:
        """The same format with another group size, named ``<name>-g<size>``."""
        return replace(self, name=f"{self.name}-g{group_size}", group_size=group_size)


def full_precision(quant: QuantSpec) -> QuantSpec:
    """The unquantized format a quantized base is made from: its compute dtype."""
    return QuantSpec(f"{quant.dtype}-original", "dtype", quant.dtype)


QUANTIZATIONS: dict[str, QuantSpec] = {
    spec.name: spec
    for spec in (
        QuantSpec("none", "dtype", None),
        QuantSpec("fp32", "dtype", "float32"),
        QuantSpec("bf16", "dtype", "bfloat16"),
        QuantSpec("fp16", "dtype", "float16"),
        QuantSpec("int8", "bitsandbytes", "float16", scheme="int8"),
        QuantSpec("nf4", "bitsandbytes", "bfloat16", scheme="nf4", group_size=64),
        QuantSpec("fp4", "bitsandbytes", "bfloat16", scheme="fp4", group_size=64),
        QuantSpec("nf4-dq", "bitsandbytes", "bfloat16", scheme="nf4", group_size=64, double_quant=True),
        QuantSpec("torchao-int8", "torchao", "bfloat16", scheme="int8"),
        QuantSpec("torchao-int4", "torchao", "bfloat16", scheme="int4", group_size=128),
        QuantSpec("hqq-4bit", "hqq", "bfloat16", scheme="4bit", group_size=64),
        QuantSpec("hqq-8bit", "hqq", "bfloat16", scheme="8bit", group_size=64),
        QuantSpec("hqq-2bit", "hqq", "bfloat16", scheme="2bit", group_size=16),
    )
}
"""The formats by name. A format of a backend that ``models/formats`` knows is one entry here;
a format with a ``group_size`` may also be named with another one (``hqq-4bit-g128``)."""

GROUP_SIZES = {"bitsandbytes": (64,), "torchao": (32, 64, 128, 256), "hqq": (8, 16, 32, 64, 128, 256)}
"""The group sizes each backend's kernels accept (bitsandbytes' CPU and GPU kernels agree on 64)."""


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: ``kind`` is ``registry``, ``config`` (a config.json) or ``checkpoint``;
    ``config`` is its architecture as read when the name was resolved (``models.resolve``)."""

    name: str
    kind: str
    path: str
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    label: str = ""  # the id of a checkpoint pytest-lora made (a converted GGUF file), whose directory is a hash

    @property
    def id(self) -> str:
        if self.label:
            return self.label
        if self.kind == "registry":
            return self.name
        return Path(self.path).parent.name if self.kind == "config" else Path(self.path).name

    def config_dict(self) -> dict[str, Any]:
        """The architecture as a plain dict (no transformers import), the caller's to change."""
        return copy.deepcopy(self.config)


# --------------------------------------------------------------------------- LoRA

VARIANTS = ("lora", "dora", "rslora")
BIAS_MODES = ("none", "lora_only", "all")
TARGET_KEYWORDS = ("all-linear", "default")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA configuration, independent of the model it is applied to.

    ``targets`` is a tuple of module names (matched as peft does: the full name or its last
    dotted components), or one keyword: ``all-linear`` (every Linear / Conv1D but the output
    layer) or ``default`` (peft's per-architecture default, e.g. q and v for T5).
    """

    r: int = field(metadata={"help": "rank of the update B @ A"})
    alpha: float = field(metadata={"help": "lora_alpha; scaling is alpha / r (alpha / sqrt(r) for rsLoRA)"})
    targets: tuple[str, ...] | str = field(default="default", metadata={"help": "module names or a keyword"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    variant: str = field(default="lora", metadata={"help": "lora, dora (magnitude vector) or rslora"})
    bias: str = field(default="none", metadata={"help": "none, lora_only or all (peft's bias modes)"})
    modules_to_save: tuple[str, ...] = field(default=(), metadata={"help": "modules trained in full"})

    @property
    def targets_id(self) -> str:
        return self.targets if isinstance(self.targets, str) else "+".join(self.targets)

    @property
    def id(self) -> str:
        parts = [f"r{self.r}", f"a{_number(self.alpha)}", self.targets_id]
        if self.variant != "lora":
            parts.append(self.variant)
        if self.dropout:
            parts.append(f"d{_number(self.dropout)}")
        if self.bias != "none":
            parts.append(f"bias-{self.bias}")
        if self.modules_to_save:
            parts.append("save-" + "+".join(self.modules_to_save))
        return "-".join(parts)

    def peft_kwargs(self) -> dict[str, Any]:
        """The arguments of ``peft.LoraConfig`` (without ``task_type``)."""
        if self.targets == "default":
            target_modules = None
        elif self.targets == "all-linear":
            target_modules = "all-linear"
        else:
            target_modules = list(self.targets)
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "target_modules": target_modules,
            "lora_dropout": self.dropout,
            "bias": self.bias,
            "use_dora": self.variant == "dora",
            "use_rslora": self.variant == "rslora",
            "modules_to_save": list(self.modules_to_save) or None,
        }

    def as_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        record["modules_to_save"] = list(self.modules_to_save)
        return record


@dataclass(frozen=True)
class WorkloadSpec:
    """The shape of a training step: ``batch`` sequences of ``seq_len`` tokens, with or without
    gradient checkpointing and ``torch.compile``."""

    seq_len: int
    batch: int
    grad_ckpt: bool = False
    compile: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def id(self) -> str:
        return f"b{self.batch}xs{self.seq_len}" + ("-ckpt" if self.grad_ckpt else "") + ("-compile" if self.compile else "")

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of a training step: ``library`` is ``torch`` (``torch.optim.AdamW``) or
    ``bitsandbytes`` (its ``AdamW8bit``, ``PagedAdamW8bit``, ``PagedAdamW``); ``bits`` is the width
    of the two moments it keeps; ``paged`` means they live in CUDA unified memory, which the driver
    moves to the host under memory pressure (on the CPU bitsandbytes falls back to ordinary tensors)."""

    name: str
    library: str
    bits: int = 32
    paged: bool = False

    @property
    def id(self) -> str:
        return self.name


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adamw", "torch"),
        OptimizerSpec("adamw8bit", "bitsandbytes", bits=8),
        OptimizerSpec("paged_adamw8bit", "bitsandbytes", bits=8, paged=True),
        OptimizerSpec("paged_adamw", "bitsandbytes", bits=32, paged=True),
    )
}
"""The optimizers by name: AdamW, and bitsandbytes' 8-bit and paged variants (QLoRA §3)."""


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class ServeSpec:
    """The shape of an inference request: ``batch`` prompts of ``prompt_len`` tokens, then
    ``new_tokens`` tokens generated one at a time with the KV cache."""

    prompt_len: int
    new_tokens: int
    batch: int

    @property
    def id(self) -> str:
        return f"p{self.prompt_len}-n{self.new_tokens}-b{self.batch}"

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- fine-tuning (the quality suite)

# peft's ``init_lora_weights`` values the quality suite sweeps: ``default`` (peft's own: A
# Kaiming-uniform, B zero), ``gaussian`` (A Gaussian, B zero), ``pissa`` and ``olora`` (the
# adapter takes the weight's principal singular directions or its QR factors, and the base keeps
# the residual), ``loftq`` (the adapter fits what 4-bit NF4 quantization loses, peft's
# ``LoftQConfig``). peft's ``eva`` needs a data loader of activations at initialisation: not swept.
INITS = ("default", "gaussian", "pissa", "olora", "loftq")
# Inits that change the base's weights (the base keeps W - scaling * B A): on a quantized format
# the residual is what gets quantized (PiSSA's QPiSSA, LoftQ's recipe).
RESIDUAL_INITS = ("pissa", "olora", "loftq")
# LoftQ's quantizer in peft is NF4 with bitsandbytes' block size: the formats that store its Q as it fitted it.
LOFTQ_FORMATS = ("nf4", "nf4-dq")


@dataclass(frozen=True)
class FineTuneSpec:
    """How the quality suite fine-tunes: LoRA at learning rate ``lr`` from the adapter
    initialisation ``init`` (one of ``INITS``), or full fine-tuning (``init`` is ``"full"``)."""

    lr: float
    init: str = "default"

    @property
    def full(self) -> bool:
        return self.init == "full"

    @property
    def id(self) -> str:
        return f"{'full' if self.full else self.init}-lr{self.lr:g}"

    def takes(self, quant: "QuantSpec") -> bool:
        """Whether a base stored as ``quant`` can start from this init (LoftQ fits NF4 only)."""
        return self.init != "loftq" or quant.name in LOFTQ_FORMATS

    def as_record(self) -> dict[str, Any]:
        return {"lr": self.lr, "init": self.init}


# --------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Matrix:
    """The cross product to run: every model x quant, and every LoRA spec and workload on each;
    the training suites take every optimizer too, the serving suite every serving workload."""

    models: tuple[ModelSpec, ...]
    quants: tuple[QuantSpec, ...]
    loras: tuple[LoraSpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    optimizers: tuple[OptimizerSpec, ...] = (OPTIMIZERS["adamw"],)
    serving: tuple[ServeSpec, ...] = (ServeSpec(16, 4, 1),)
    fine_tunes: tuple[FineTuneSpec, ...] = (FineTuneSpec(1e-3),)  # the quality suite's LoRA runs
    full_fine_tunes: tuple[FineTuneSpec, ...] = ()  # and its full fine-tuning runs (none by default)

    @property
    def size(self) -> int:
        return len(self.models) * len(self.quants) * len(self.loras) * len(self.workloads)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
