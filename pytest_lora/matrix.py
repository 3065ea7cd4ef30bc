"""The configuration matrix: what to measure, as frozen values, validated before anything runs.

A matrix is the cross product of four kinds of spec:

* ``ModelSpec``: a registry model (a shipped published ``config.json``), a user's config.json,
  or a local checkpoint directory;
* ``QuantSpec``: the base's storage format (``none``, ``fp32``, ``bf16``, ``fp16``, ``int8``,
  ``nf4``, ``fp4``, ``nf4-dq``);
* ``LoraSpec``: rank, alpha, target modules, dropout, variant (LoRA, DoRA, rsLoRA), bias mode and
  modules to save;
* ``WorkloadSpec``: sequence length, batch size, gradient checkpointing.

Values come in layers: the embedded default matrix for the device (``default_matrix.toml``), then
a ``--lora-matrix`` TOML file, then each single option that the user set (command line,
environment or ini). Every value is checked here, with no heavy import; a bad one raises
``MatrixError`` naming where it came from, the value and what is allowed. Checks that need the
model's architecture (do the targets match any module?) live in ``models.validate``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import tomllib

from .models import registry

DEFAULT_MATRIX_FILE = Path(__file__).with_name("default_matrix.toml")


class MatrixError(ValueError):
    """A value of the matrix is wrong: says where it came from, what it was and what is allowed."""

    def __init__(self, where: str, value: Any, problem: str, allowed: str = ""):
        self.where, self.value, self.problem, self.allowed = where, value, problem, allowed
        text = f"{where}: {value!r} {problem}"
        if allowed:
            text += f"; allowed: {allowed}"
        super().__init__(text)


# --------------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class QuantSpec:
    """How the base model's weights are stored.

    ``dtype`` is the dtype of everything that is not quantized (embeddings, norms, the output
    layer) and the compute dtype of quantized layers; ``None`` means the model's own dtype as its
    config.json states it. ``kind`` is ``dtype`` (no quantization), ``int8`` (LLM.int8) or
    ``4bit`` (``quant_type`` nf4 or fp4, blocksize 64, optionally double-quantized constants).
    """

    name: str
    kind: str
    dtype: str | None
    quant_type: str | None = None
    double_quant: bool = False
    blocksize: int = 64

    @property
    def is_quantized(self) -> bool:
        return self.kind != "dtype"

    @property
    def id(self) -> str:
        return self.name


QUANTIZATIONS: dict[str, QuantSpec] = {
    spec.name: spec
    for spec in (
        QuantSpec("none", "dtype", None),
        QuantSpec("fp32", "dtype", "float32"),
        QuantSpec("bf16", "dtype", "bfloat16"),
        QuantSpec("fp16", "dtype", "float16"),
        QuantSpec("int8", "int8", "float16"),
        QuantSpec("nf4", "4bit", "bfloat16", quant_type="nf4"),
        QuantSpec("fp4", "4bit", "bfloat16", quant_type="fp4"),
        QuantSpec("nf4-dq", "4bit", "bfloat16", quant_type="nf4", double_quant=True),
    )
}


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: ``kind`` is ``registry``, ``config`` (a config.json) or ``checkpoint``."""

    name: str
    kind: str
    path: str

    @property
    def id(self) -> str:
        if self.kind == "registry":
            return self.name
        return Path(self.path).parent.name if self.kind == "config" else Path(self.path).name

    def config_dict(self) -> dict[str, Any]:
        """The architecture as a plain dict (no transformers import)."""
        return registry.load_config_dict(self.name if self.kind == "registry" else self.path)


def resolve_model(text: str, where: str, base_dir: Path | None = None) -> ModelSpec:
    """A registry name, a config.json path or a checkpoint directory, checked to exist."""
    name = text.strip()
    if registry.is_known(name):
        return ModelSpec(name, "registry", registry.config_path(name).as_posix())
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    allowed = "a registry name (" + ", ".join(registry.names()) + ") or a path to a config.json or checkpoint directory"
    if not path.exists():
        raise MatrixError(where, name, "is neither a registry model nor an existing path", allowed)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MatrixError(where, name, "is a directory without a config.json", allowed)
        kind = "checkpoint" if registry.has_weights(path) else "config"
        config_file = path if kind == "checkpoint" else path / "config.json"
        return ModelSpec(name, kind, config_file.resolve().as_posix())
    try:
        registry.load_config_dict(path)
    except ValueError as error:
        raise MatrixError(where, name, f"is not a usable config.json ({error})") from None
    return ModelSpec(name, "config", path.resolve().as_posix())


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


# --------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Matrix:
    """The cross product to run: every model x quant, and every LoRA spec and workload on each."""

    models: tuple[ModelSpec, ...]
    quants: tuple[QuantSpec, ...]
    loras: tuple[LoraSpec, ...]
    workloads: tuple[WorkloadSpec, ...]

    @property
    def size(self) -> int:
        return len(self.models) * len(self.quants) * len(self.loras) * len(self.workloads)


MATRIX_KEYS = (
    "models",
    "quant",
    "ranks",
    "targets",
    "alpha",
    "dropout",
    "variants",
    "bias",
    "modules_to_save",
    "seq_len",
    "batch",
    "grad_ckpt",
    "compile",
)


@dataclass(frozen=True)
class RawValue:
    """A matrix key's values as given, where they were given (for error messages), and the
    directory their relative paths are relative to (a file's own directory, the ini file's...)."""

    values: tuple[Any, ...]
    where: str
    base_dir: Path | None = None


def load_toml(path: Path, where: str) -> dict[str, Any]:
    """Read a matrix TOML file's matrix keys (its ``[gate]`` table is the gate's); malformed TOML
    is a ``MatrixError``."""
    if not path.is_file():
        raise MatrixError(where, str(path), "does not exist", "a path to a TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise MatrixError(where, str(path), f"is not valid TOML ({error})") from None
    data.pop("gate", None)  # the regression gate's rules (pytest_lora.gate reads them)
    return data.get("matrix", data)


def default_layer(device_kind: str) -> dict[str, RawValue]:
    """The embedded default matrix for ``cpu`` or ``cuda``."""
    data = tomllib.loads(DEFAULT_MATRIX_FILE.read_text(encoding="utf-8"))[device_kind]
    return {key: RawValue(_as_tuple(value), f"default matrix [{device_kind}] {key}") for key, value in data.items()}


def file_layer(path: Path, where: str) -> dict[str, RawValue]:
    """A matrix file's keys; its relative paths are relative to the file."""
    return mapping_layer(load_toml(path, where), f"{where} ({path.name})", base_dir=path.parent)


def mapping_layer(data: dict[str, Any], where: str, base_dir: Path | None = None) -> dict[str, RawValue]:
    """Keys and values as TOML or a ``lora_matrix`` marker give them."""
    unknown = sorted(set(data) - set(MATRIX_KEYS))
    if unknown:
        raise MatrixError(where, unknown[0], "is not a matrix key", ", ".join(MATRIX_KEYS))
    layer = {key: RawValue(_as_tuple(value), f"{where}: {key}", base_dir) for key, value in data.items()}
    if "targets" in layer:
        layer["targets"] = RawValue(_target_sets(data["targets"]), layer["targets"].where, base_dir)
    return layer


def _target_sets(value: Any) -> tuple[Any, ...]:
    """TOML targets: a flat list of bare module names is one set, as in peft's ``target_modules``.

    Several sets are written as a list of strings with commas or keywords
    (``["q_proj,v_proj", "all-linear"]``) or as a list of lists.
    """
    if isinstance(value, list) and value and all(
        isinstance(v, str) and "," not in v and v.strip().lower() not in TARGET_KEYWORDS for v in value
    ):
        return (value,)
    return _as_tuple(value)


def option_layer(options: dict[str, tuple[str, str, Path | None]]) -> dict[str, RawValue]:
    """Single options as strings: ``{"ranks": ("8,16", "--lora-ranks", directory)}``.

    Targets hold several sets separated by ``|``; every other key is a comma-separated list.
    """
    layer = {}
    for key, (text, where, base_dir) in options.items():
        if key == "targets":
            values = tuple(part.strip() for part in text.split("|"))
        else:
            values = tuple(part.strip() for part in text.split(","))
        layer[key] = RawValue(values, where, base_dir)
    return layer


def build(layers: Iterable[dict[str, RawValue]], base_dir: Path | None = None) -> Matrix:
    """Merge layers (later ones win key by key) and parse every value.

    A relative model path is relative to its layer's directory, else to ``base_dir``.
    """
    merged: dict[str, RawValue] = {}
    for layer in layers:
        merged.update(layer)
    missing = [key for key in ("models", "quant", "ranks") if key not in merged or not merged[key].values]
    if missing:
        raise MatrixError("matrix", missing[0], "is empty", "at least one value")

    def values(key: str, default: tuple[Any, ...], parse) -> list[Any]:
        raw = merged.get(key) or RawValue(default, key)
        return [parse(value, raw.where) for value in raw.values]

    models_dir = merged["models"].base_dir or base_dir
    models = _unique(values("models", (), lambda v, where: resolve_model(_text(v, where), where, models_dir)))
    quants = _unique(values("quant", (), _parse_quant))
    ranks = values("ranks", (), lambda v, where: _positive_int(v, where, "rank"))
    targets = values("targets", ("default",), _parse_targets)
    alphas = values("alpha", ("2r",), _parse_alpha)
    dropouts = values("dropout", (0.0,), _parse_dropout)
    variants = values("variants", ("lora",), lambda v, where: _choice(v, where, VARIANTS, "LoRA variant"))
    biases = values("bias", ("none",), lambda v, where: _choice(v, where, BIAS_MODES, "bias mode"))
    to_save = tuple(values("modules_to_save", (), _module_name))
    loras = _unique(
        LoraSpec(r=r, alpha=alpha(r), targets=t, dropout=d, variant=v, bias=b, modules_to_save=to_save)
        for r, alpha, t, d, v, b in itertools.product(ranks, alphas, targets, dropouts, variants, biases)
    )
    seq_lens = values("seq_len", (128,), lambda v, where: _positive_int(v, where, "sequence length"))
    batches = values("batch", (1,), lambda v, where: _positive_int(v, where, "batch size"))
    ckpts = values("grad_ckpt", (False,), _parse_bool)
    compiles = values("compile", (False,), _parse_bool)
    workloads = _unique(WorkloadSpec(*w) for w in itertools.product(seq_lens, batches, ckpts, compiles))
    return Matrix(models, quants, loras, workloads)


# --------------------------------------------------------------------------- value parsers


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def _unique(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MatrixError(where, value, "is not a non-empty string")
    return value


def _parse_quant(value: Any, where: str) -> QuantSpec:
    if isinstance(value, str) and value.strip().lower() in QUANTIZATIONS:
        return QUANTIZATIONS[value.strip().lower()]
    raise MatrixError(where, value, "is not a quantization", ", ".join(QUANTIZATIONS))


def _positive_int(value: Any, where: str, what: str) -> int:
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise MatrixError(where, value, f"is not a {what}", "a positive integer") from None
    if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
        raise MatrixError(where, value, f"is not a valid {what}", "a positive integer")
    return number


_ALPHA_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d+)?)?\s*r\s*$")


def _parse_alpha(value: Any, where: str):
    """A number, or ``<k>r`` for a multiple of the rank (``2r`` is the common alpha = 2 x r)."""
    allowed = "a positive number or a multiple of the rank such as '2r'"
    if isinstance(value, str):
        match = _ALPHA_MULTIPLE.match(value)
        if match:
            factor = float(match.group(1) or 1)
            if factor <= 0:
                raise MatrixError(where, value, "is not a valid alpha", allowed)
            return lambda r: factor * r
        try:
            value = float(value)
        except ValueError:
            raise MatrixError(where, value, "is not a valid alpha", allowed) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MatrixError(where, value, "is not a valid alpha", allowed)
    return lambda r, alpha=float(value): alpha


def _parse_dropout(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number < 1.0:
        raise MatrixError(where, value, "is not a valid dropout", "a number in [0, 1)")
    return number


def _choice(value: Any, where: str, allowed: tuple[str, ...], what: str) -> str:
    if isinstance(value, str) and value.strip().lower() in allowed:
        return value.strip().lower()
    raise MatrixError(where, value, f"is not a {what}", ", ".join(allowed))


def _parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "on", "off"):
        return value.strip().lower() in ("true", "1", "on")
    raise MatrixError(where, value, "is not a boolean", "true or false")


_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _module_name(value: Any, where: str) -> str:
    if isinstance(value, str) and _MODULE_NAME.match(value.strip()):
        return value.strip()
    raise MatrixError(where, value, "is not a module name", "names such as q_proj or self_attn.q_proj")


def _parse_targets(value: Any, where: str) -> tuple[str, ...] | str:
    """``all-linear``, ``default``, ``"q_proj,v_proj"`` or a list of names."""
    allowed = "'all-linear', 'default' or module names such as q_proj,v_proj"
    if isinstance(value, str):
        if value.strip().lower() in TARGET_KEYWORDS:
            return value.strip().lower()
        names = [part for part in (p.strip() for p in value.split(",")) if part]
    elif isinstance(value, list):
        names = value
    else:
        raise MatrixError(where, value, "is not a target set", allowed)
    if not names:
        raise MatrixError(where, value, "names no target module", allowed)
    return tuple(dict.fromkeys(_module_name(name, where) for name in names))
