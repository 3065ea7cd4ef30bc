"""The configuration matrix: what to measure, as frozen values, validated before anything runs.

A matrix is the cross product of four kinds of spec (the values of ``specs.py``):

* ``ModelSpec``: a registry model (a shipped published ``config.json``), a user's config.json,
  or a local checkpoint directory;
* ``QuantSpec``: the base's storage format, a name of ``specs.QUANTIZATIONS`` (``bf16``, ``nf4``,
  ``torchao-int8``, ``hqq-4bit``, ...), with another group size where the format has one;
* ``LoraSpec``: rank, alpha, target modules, dropout, variant (LoRA, DoRA, rsLoRA), bias mode and
  modules to save;
* ``WorkloadSpec``: sequence length, batch size, gradient checkpointing;

and two dimensions of their own suites: ``OptimizerSpec`` (the training step's optimizer: AdamW,
bitsandbytes' 8-bit and paged AdamW) and ``ServeSpec`` (prompt length, generated tokens and batch
of the serving suite).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import tomllib

from .models.resolve import resolve_model
from .specs import (BIAS_MODES, GROUP_SIZES, INITS, LOFTQ_FORMATS, OPTIMIZERS, QUANTIZATIONS, TARGET_KEYWORDS, VARIANTS,
                    FineTuneSpec, LoraSpec, Matrix, MatrixError, QuantSpec, ServeSpec, WorkloadSpec)

DEFAULT_MATRIX_FILE = Path(__file__).with_name("default_matrix.toml")
# A matrix layer may hold a table of keys for one suite (``[quality]``, ``[cpu.quality]`` in the
# default), named by the suite's marker without ``lora_``: its keys replace the layer's for that
# suite's tests only. The quality suite fine-tunes every config for seeds x steps, so the defaults
# give it a slice of the formats; the real model's matrix gives each suite the configs that answer
# its question. Which names are suites is the catalog's to say (``check_suite_tables``).
# Matrices shipped with the plugin, named by ``--lora-matrix=NAME`` where no file of that name exists
EMBEDDED_MATRICES = {"real": Path(__file__).with_name("real_matrix.toml")}



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
    "optimizers",
    "prompt_len",
    "new_tokens",
    "serve_batch",
    "learning_rates",
    "inits",
    "full_learning_rates",
)


@dataclass(frozen=True)
class RawValue:
    """A matrix key's values as given, where they were given (for error messages), and the
    directory their relative paths are relative to (a file's own directory, the ini file's...)."""

    values: tuple[Any, ...]
    where: str
    base_dir: Path | None = None


@dataclass(frozen=True)
class MatrixFile:
    """A ``--lora-matrix`` file, read once: its matrix keys, and its ``[gate]`` table (the gate's
    rules, ``gate.Gate``); ``where`` names the option that gave it."""

    path: Path
    where: str
    keys: dict[str, Any]
    gate: dict[str, Any]
    suites: dict[str, dict[str, Any]] = field(default_factory=dict)  # each suite table's keys, by suite

    @property
    def layer(self) -> dict[str, RawValue]:
        """Its keys as a layer of the matrix; its relative paths are relative to the file."""
        return mapping_layer(self.keys, f"{self.where} ({self.path.name})", base_dir=self.path.parent)

    def suite_layer(self, suite: str) -> dict[str, RawValue]:
        """Its ``[suite]`` table's keys as a layer (empty without one)."""
        return mapping_layer(self.suites.get(suite, {}), f"{self.where} ({self.path.name}) [{suite}]", base_dir=self.path.parent)


def read_file(path: Path, where: str) -> MatrixFile:
    """A matrix TOML file; a missing file or malformed TOML is a ``MatrixError``."""
    data = load_toml(path, where)
    gate = data.pop("gate", {})
    if not isinstance(gate, dict):
        raise MatrixError(f"{where} ({path.name})", gate, "is not a [gate] table", '[gate] fail = ["METRIC[:STAT]:THRESHOLD", ...]')
    keys = dict(data.get("matrix", data))
    suites = {name: keys.pop(name) for name in list(keys) if isinstance(keys[name], dict)}
    return MatrixFile(path, where, keys, gate, suites)


def check_suite_tables(found: MatrixFile, suites: Iterable[str]) -> None:
    """A table of the file that names no suite is a ``MatrixError`` saying which are allowed (a
    misspelt ``[servng]`` would otherwise be ignored, and its suite run the whole matrix)."""
    allowed = sorted(suites)
    for name in found.suites:
        if name not in allowed:
            raise MatrixError(f"{found.where} ({found.path.name})", f"[{name}]", "is neither a matrix key nor a suite's table",
                              f"keys: {', '.join(MATRIX_KEYS)}; tables: {', '.join(f'[{suite}]' for suite in allowed)}, [gate]")


def load_toml(path: Path, where: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing file or malformed TOML is a ``MatrixError``."""
    if not path.is_file():
        raise MatrixError(where, str(path), "does not exist", "a path to a TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise MatrixError(where, str(path), f"is not valid TOML ({error})") from None


def default_layer(device_kind: str, suite: str | None = None) -> dict[str, RawValue]:
    """The embedded default matrix for ``cpu`` or ``cuda`` (its ``[<device>.<suite>]`` table with a suite)."""
    data = tomllib.loads(DEFAULT_MATRIX_FILE.read_text(encoding="utf-8"))[device_kind]
    where = f"default matrix [{device_kind}]"
    if suite is not None:
        data, where = data.get(suite, {}), f"default matrix [{device_kind}.{suite}]"
    return {key: RawValue(_as_tuple(value), f"{where} {key}") for key, value in data.items() if not isinstance(value, dict)}


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


def build(layers: Iterable[dict[str, RawValue]], base_dir: Path | None = None, narrowed: bool = False) -> Matrix:
    """Merge layers (later ones win key by key) and parse every value.

    A relative model path is relative to its layer's directory, else to ``base_dir``. ``narrowed``: a
    test's ``lora_matrix`` marker narrows the session's matrix (the memory suite's 8-bit optimizer
    test keeps bf16 alone); an init it leaves no format for is its choice, not the user's error.
    """
    merged: dict[str, RawValue] = {}
    for layer in layers:
        merged.update(layer)
    missing = [key for key in ("models", "quant", "ranks") if key not in merged]
    if missing:
        raise MatrixError("matrix", missing[0], "is empty", "at least one value")
    empty = [raw for key, raw in merged.items() if not raw.values and key != "modules_to_save"]  # [] saves no module
    if empty:  # an empty dimension would leave every test of it without a case
        raise MatrixError(empty[0].where, [], "is empty", "at least one value")

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
    optimizers = _unique(values("optimizers", ("adamw",), lambda v, where: OPTIMIZERS[_choice(v, where, tuple(OPTIMIZERS), "known optimizer")]))
    prompt_lens = values("prompt_len", (16,), lambda v, where: _positive_int(v, where, "prompt length"))
    new_tokens = values("new_tokens", (4,), lambda v, where: _positive_int(v, where, "number of generated tokens"))
    serve_batches = values("serve_batch", (1,), lambda v, where: _positive_int(v, where, "serving batch size"))
    serving = _unique(ServeSpec(*s) for s in itertools.product(prompt_lens, new_tokens, serve_batches))
    lrs = values("learning_rates", (1e-3,), _parse_learning_rate)
    inits = values("inits", ("default",), lambda v, where: _choice(v, where, INITS, "LoRA initialisation"))
    if not narrowed:
        _check_inits(inits, quants, merged.get("inits"))
    fine_tunes = _unique(FineTuneSpec(lr, init) for lr, init in itertools.product(lrs, inits))
    full = _unique(FineTuneSpec(lr, "full") for lr in values("full_learning_rates", (), _parse_learning_rate))
    return Matrix(models, quants, loras, workloads, optimizers, serving, fine_tunes, full)


# --------------------------------------------------------------------------- value parsers


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def _unique(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MatrixError(where, value, "is not a non-empty string")
    return value


_GROUP_SUFFIX = re.compile(r"^(?P<name>.+)-g(?P<size>\d+)$")


def _parse_quant(value: Any, where: str) -> QuantSpec:
    """A format of the table, or one with a group size of its own (``hqq-4bit-g128``)."""
    allowed = ", ".join(QUANTIZATIONS) + "; a grouped format may end in -g<group size>"
    text = value.strip().lower() if isinstance(value, str) else None
    if text in QUANTIZATIONS:
        return QUANTIZATIONS[text]
    grouped = _GROUP_SUFFIX.match(text or "")
    spec = QUANTIZATIONS.get(grouped["name"]) if grouped else None
    if spec is None or spec.group_size is None:
        raise MatrixError(where, value, "is not a quantization", allowed)
    sizes = GROUP_SIZES[spec.backend]
    if int(grouped["size"]) not in sizes:
        raise MatrixError(where, value, f"has a group size {spec.backend} does not support", ", ".join(map(str, sizes)))
    return spec.with_group_size(int(grouped["size"]))


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


def _parse_learning_rate(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise MatrixError(where, value, "is not a learning rate", "a finite positive number, e.g. 1e-3")
    return number


def _check_inits(inits: list[str], quants: tuple[QuantSpec, ...], raw: RawValue | None) -> None:
    """An init no format of the matrix can take is an error before anything runs (LoftQ fits NF4
    only); one that some formats take runs on those, and the others skip it saying why."""
    where = raw.where if raw else "inits"
    if "loftq" in inits and not any(q.name in LOFTQ_FORMATS for q in quants):
        raise MatrixError(where, "loftq", "needs a format LoftQ's quantizer fits, and the matrix has none "
                          f"(quant: {', '.join(q.id for q in quants)})", "loftq with quant " + " or ".join(LOFTQ_FORMATS))


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
