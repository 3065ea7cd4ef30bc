"""The plugin's options: one table, three ways to set each, one precedence.

Every option is a command-line flag (``--lora-models``), an ini key (``lora_models``) and an
environment variable (``PYTEST_LORA_MODELS``). The value that wins is the first one set in the
order command line > environment > ini > built-in default, and the report header says which
source each value came from, so a CI log always shows what a run measured.

An ini value may be a string (``lora_ranks = 8,16``) or, in ``pyproject.toml``, a native TOML
list (``lora_ranks = [8, 16]``) or boolean (``lora_bench = true``); a list keeps its items as
given. A relative path is relative to where its value was written: the invocation directory
for the command line and the environment, the ini file's directory for ini values, and the
rootdir for defaults (``Setting.base_dir``); a matrix file's paths are relative to that file.

Each option says what values it allows (``Option.check``): a value it refuses is a usage error
(exit code 4) when the options are resolved, before anything runs, naming where the value came
from. This module holds strings only: parsing values into a matrix is ``matrix.py``'s job.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from .specs import INITS, OPTIMIZERS, QUANTIZATIONS, shortened, shown, whole_number

DEVICES = ("auto", "cpu", "cuda")
REPORTS = ("summary", "full")
PEAK_CHOICES = ("auto", "measure")

@dataclass(frozen=True)
class Option:
    """One pytest-lora option and its help text."""

    name: str
    help: str
    metavar: str = ""
    flag: bool = False
    default: str | None = None
    repeat: bool = False  # given several times (--lora-fail A --lora-fail B), a list in the ini, ';' in the environment
    negatable: bool = False  # a flag that is on by default (``default="on"``): --lora-no-<name> turns it off
    check: Callable[["Setting"], str | None] | None = field(default=None, compare=False)  # what is wrong with a value, if anything

    @property
    def cli(self) -> str:
        return "--lora-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "lora_" + self.name

    @property
    def env(self) -> str:
        return "PYTEST_LORA_" + self.name.upper()

    @property
    def dest(self) -> str:
        return "lora_" + self.name

    @property
    def negation(self) -> str:
        return "--lora-no-" + self.name.replace("_", "-")


def count_of(what: str, smallest: int) -> Callable[["Setting"], str | None]:
    """A value that must be a whole number of ``what`` of at least ``smallest`` (unset: the default)."""
    def check(setting: Setting) -> str | None:
        number = whole_number(setting.value)
        if setting.value is None or number is not None and number >= smallest:
            return None
        return f"{setting.shown} is not {what}; allowed: an integer >= {smallest}"
    return check


def one_of(what: str, choices: tuple[str, ...]) -> Callable[["Setting"], str | None]:
    def check(setting: Setting) -> str | None:
        if str(setting.value).lower() in choices:
            return None
        return f"{setting.shown} is not {what}; allowed: {', '.join(choices)}"
    return check


def positive_float(value: Any) -> bool:
    """A finite number above 0 (``inf`` and ``1e400`` would make every MFU read 0.0)."""
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def _peak(setting: Setting) -> str | None:
    if str(setting.value).lower() in PEAK_CHOICES or positive_float(setting.value):
        return None
    return f"{setting.shown} is not a peak; allowed: auto, measure or TFLOP/s as a finite positive number"


def _learning_rate(setting: Setting) -> str | None:
    if setting.value is None or positive_float(setting.value):
        return None
    return f"{setting.shown} is not a learning rate; allowed: a finite positive number, e.g. 1e-3"


def _two_learning_rates(setting: Setting) -> str | None:
    if setting.value is None:
        return None
    rates = [part.strip() for part in str(setting.value).split(",")]
    if len(rates) == 2 and all(positive_float(rate) for rate in rates) and float(rates[0]) > float(rates[1]):
        return None
    return f"{setting.shown} is not two learning rates; allowed: a higher and a lower finite positive number, e.g. 1e-4,1e-5"


def _fraction(setting: Setting) -> str | None:
    if setting.value is None or positive_float(setting.value) and float(setting.value) < 1:
        return None
    return f"{setting.shown} is not a fraction of the reference's improvement; allowed: a number in (0, 1), e.g. 0.75"


def _text_file(setting: Setting) -> str | None:
    if not setting.value or setting.path().is_file():
        return None
    return f"{setting.shown} does not exist; allowed: a text or JSONL file"


OPTIONS: tuple[Option, ...] = (
    Option("bench", "run the benchmark suites, record their numbers and report them.", flag=True),
    Option(
        "models",
        "comma-separated registry names (e.g. llama-3.1-8b, llama-3.2-1b-tiny) or paths to a "
        "config.json or a local checkpoint directory. Default: tiny variants on the CPU, real shapes on the GPU.",
        metavar="NAME|PATH,...",
    ),
    Option("quant", "comma-separated quantizations: " + ", ".join(QUANTIZATIONS) + " (a grouped one may end in -g<size>).",
           metavar="Q,..."),
    Option("ranks", "comma-separated LoRA ranks, e.g. 8,16.", metavar="R,..."),
    Option(
        "targets",
        "target modules: a comma-separated list of module names (q_proj,v_proj), 'all-linear', or "
        "'default' (peft's per-architecture default); several sets separated by '|'.",
        metavar="NAMES|all-linear|default",
    ),
    Option("optimizers", "comma-separated optimizers of the training step: " + ", ".join(OPTIMIZERS) + ".", metavar="OPT,..."),
    Option("matrix", "a TOML file with a whole matrix (models, quant, ranks, targets, alpha, ...), or 'real': the shipped matrix of "
           "the pretrained smollm2-135m on the CPU (make bench-real).", metavar="FILE.toml|real"),
    Option("device", "where models are built: auto (cuda when available), cpu or cuda.", metavar="auto|cpu|cuda", default="auto",
           check=one_of("a device", DEVICES)),
    Option(
        "results",
        "directory for the results JSON (<run-id>.json and latest.json). Results are written under --lora-bench, or "
        "when this option is set; default: results/ in the rootdir.",
        metavar="DIR",
        default="results",
    ),
    Option(
        "suites",
        "comma-separated directories of your own suites, run with the built-in ones when --lora-bench is given no path.",
        metavar="DIR,...",
    ),
    Option("rounds", "timed training steps per config (default 10 on a GPU, 5 on the CPU).", metavar="N",
           check=count_of("a step count", 1)),
    Option("warmup", "untimed training steps before the timed ones (default 3 on a GPU, 1 on the CPU).", metavar="N",
           check=count_of("a step count", 0)),
    Option(
        "threads",
        "torch CPU threads while timing training steps (default 1 on the CPU, where more threads make "
        "medians bimodal on a shared machine; torch's own count on a GPU). Recorded in the machine record.",
        metavar="N",
        check=count_of("a thread count", 1),
    ),
    Option("seeds", "seeds of the forgetting experiment (default 3).", metavar="N", default="3", check=count_of("a seed count", 1)),
    Option("forget_steps", "training steps of each forgetting run (default 60; 20 on a pretrained model).", metavar="N",
           check=count_of("a step count", 1)),
    Option("forget_batch", "sequences a training step of the forgetting experiment (default 16; 4 on a pretrained model, 8 on your data).",
           metavar="N", check=count_of("a batch size", 1)),
    Option("forget_block", "tokens a sequence of the forgetting experiment (default 64).", metavar="N", check=count_of("a block length", 2)),
    Option("forget_lr", "LoRA's learning rate in the forgetting experiment (default 1e-3).", metavar="LR", check=_learning_rate),
    Option("forget_full_lrs", "full fine-tuning's two learning rates in the forgetting experiment, higher first (default 1e-3,1e-4; "
           "1e-4,1e-5 on a pretrained model).", metavar="LR,LR", check=_two_learning_rates),
    Option("forget_data", "text or JSONL whose held-out loss measures forgetting (with a checkpoint in --lora-models).", metavar="PATH",
           check=_text_file),
    Option("learn_data", "text or JSONL to fine-tune on in the forgetting experiment (with --lora-forget-data).", metavar="PATH",
           check=_text_file),
    Option("learning_rates", "comma-separated LoRA learning rates of the quality suite (default 1e-3).", metavar="LR,..."),
    Option("inits", "comma-separated adapter initialisations of the quality suite (peft's init_lora_weights): "
           + ", ".join(INITS) + " (default: default).", metavar="INIT,..."),
    Option("full_learning_rates", "comma-separated learning rates of the quality suite's full fine-tuning (default: none).",
           metavar="LR,..."),
    Option("quality_steps", "training steps of each quality run (default 30; 20 on a pretrained model).", metavar="N",
           check=count_of("a step count", 2)),
    Option("quality_target", "the quality suite's target: this fraction of the 16-bit LoRA's improvement of the held-out loss "
           "(default 0.75).", metavar="FRACTION", check=_fraction),
    Option(
        "compare",
        "a results JSON, or a directory of earlier runs (the history), to compare this run with and gate on.",
        metavar="PATH",
    ),
    Option(
        "fail",
        "a gate rule METRIC[:STAT]:THRESHOLD, e.g. step_time_median_s:10%, peak_reserved_bytes:+5%&+256MiB, "
        "trainable_params:==, merge_max_abs_err:<=1e-3, mfu:off (repeatable; replaces the default rule of that metric).",
        metavar="RULE",
        repeat=True,
    ),
    Option("confirm", "rerun the configs whose timing regressed, once every test has run, and fail only if they regress again "
           "(on by default; --lora-no-confirm, PYTEST_LORA_CONFIRM=0 or lora_confirm = false turn it off).", flag=True, default="on",
           negatable=True),
    Option("history", "runs of a --lora-compare directory to compare with: the newest N that passed (default 5).", metavar="N", default="5",
           check=count_of("a number of runs", 1)),
    Option("cross_hardware", "compare timings with a baseline measured on other hardware (another GPU, CPU or device).", flag=True),
    Option(
        "limit_memory",
        "a memory budget for every config, e.g. 24GiB: a GPU's peak reserved bytes in the step, or the analytic step "
        "model on the CPU, must stay within it (as the lora_limit_memory marker does for one test).",
        metavar="SIZE",
    ),
    Option(
        "shard",
        "run shard K of N of the selected tests (a CI job matrix, a Slurm array): deterministic, each base's tests "
        "together, balanced by parameters x tokens; pytest-lora merge joins the shards' results.",
        metavar="K/N",
    ),
    Option(
        "gpus_per_worker",
        "GPUs each xdist worker owns (default 1): -n auto starts one worker per group of K GPUs of CUDA_VISIBLE_DEVICES, "
        "and a base too large for one GPU is spread over its worker's GPUs (device_map auto).",
        metavar="K",
    ),
    Option(
        "report",
        "the terminal summary: summary (the headline tables, one screen) or full (every table too; -v does the same).",
        metavar="summary|full",
        default="summary",
        check=one_of("a report", REPORTS),
    ),
    Option(
        "peak",
        "the device's dense bf16 peak for MFU: auto (a table of known GPUs, else measured), measure "
        "(a large bf16 matrix product, once per session) or a number in TFLOP/s.",
        metavar="auto|measure|TFLOPS",
        default="auto",
        check=_peak,
    ),
)

BY_NAME = {option.name: option for option in OPTIONS}

LIST_SEPARATORS = {"targets": "|"}  # how a native TOML list is joined into the option's text
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Setting:
    """A resolved option value, where it came from (``cli``, ``env``, ``ini`` or ``default``) and
    the directory its relative paths are relative to."""

    option: Option
    value: str | bool | None
    source: str
    base_dir: Path | None = None

    def path(self, text: str | None = None) -> Path:
        """``text`` (by default the value) as a path: a relative one is taken from ``base_dir``.
        A path the filesystem refuses (a name too long, a NUL byte, ``~nobody``) is a usage error."""
        raw = str(self.value if text is None else text)
        try:
            path = Path(raw).expanduser()
            path = path if path.is_absolute() or self.base_dir is None else self.base_dir / path
            path.exists()  # raises for what the filesystem refuses, not for what is missing
        except (OSError, ValueError, RuntimeError) as error:
            why = getattr(error, "strerror", None) or str(error)
            raise pytest.UsageError(f"{self.describe()}: {shown(raw)} is not a usable path ({why}); "
                                    "allowed: a path the filesystem accepts") from None
        return path

    @property
    def shown(self) -> str:
        """The value for a message: quoted, shortened in the middle when long."""
        return shown(self.value)

    @property
    def is_set(self) -> bool:
        """True when the user chose this value (any source but the default)."""
        return self.source != "default"

    def describe(self) -> str:
        """Where to look when this value is wrong, for error messages."""
        return {
            "cli": self.option.cli,
            "env": f"{self.option.env} (environment)",
            "ini": f"{self.option.ini} (ini)",
            "default": f"{self.option.cli} (default)",
        }[self.source]


def add_options(parser: pytest.Parser) -> None:
    """Register every option as a command-line flag and an ini key."""
    group = parser.getgroup("lora", "LoRA / QLoRA benchmarks (pytest-lora)")
    for option in OPTIONS:
        text = f"{option.help} [env {option.env}, ini {option.ini}]"
        if option.flag:
            group.addoption(option.cli, action="store_true", dest=option.dest, default=None, help=text)
            if option.negatable:
                group.addoption(option.negation, action="store_false", dest=option.dest, default=None, help=f"turn {option.cli} off")
        elif option.repeat:
            group.addoption(option.cli, action="append", dest=option.dest, default=None, metavar=option.metavar, help=text)
        else:
            group.addoption(option.cli, action="store", dest=option.dest, default=None, metavar=option.metavar, help=text)
        # a list type takes a string (one value per line) and a native TOML list alike
        if option.flag:
            parser.addini(option.ini, option.help, type="bool", default=None)
        else:
            parser.addini(option.ini, option.help, type="linelist", default=[])


def _parse_flag(option: Option, raw: str, where: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise pytest.UsageError(f"{where}: {shown(raw)} is not a boolean; allowed: 1/0, true/false, yes/no, on/off")


def resolve(config: pytest.Config, namespace: Any = None) -> dict[str, Setting]:
    """Resolve every option with the precedence command line > environment > ini > default.

    ``namespace`` holds the command line when it is read before pytest has parsed it (the
    ``pytest_load_initial_conftests`` hook); by default it is ``config.option``.
    """
    namespace = config.option if namespace is None else namespace
    settings = {option.name: _checked(_resolve_one(config, namespace, option)) for option in OPTIONS}
    _check_together(settings)
    return settings


def _checked(setting: Setting) -> Setting:
    problem = setting.option.check(setting) if setting.option.check is not None else None
    if problem is not None:
        raise pytest.UsageError(f"{setting.describe()}: {problem}")
    return setting


def _check_together(settings: dict[str, Setting]) -> None:
    """Options that only mean something together: the forgetting experiment's two data files."""
    forget, learn = settings["forget_data"], settings["learn_data"]
    if bool(forget.value) != bool(learn.value):
        given, missing = (forget, learn) if forget.value else (learn, forget)
        raise pytest.UsageError(f"{given.describe()}: {given.shown} needs {missing.option.cli} too; allowed: both or neither")


def _resolve_one(config: pytest.Config, namespace: Any, option: Option) -> Setting:
    invocation_dir = config.invocation_params.dir
    cli = getattr(namespace, option.dest, None)
    if not option.flag and isinstance(cli, str) and not cli.strip() or option.repeat and cli and not any(str(item).strip() for item in cli):
        raise pytest.UsageError(f"{option.cli}: an empty value; allowed: {option.metavar or 'a value'} (leave the option out for its default)")
    if option.flag and cli is not None or cli:  # a flag's False is --lora-no-<name>
        return Setting(option, tuple(cli) if option.repeat else cli, "cli", invocation_dir)
    env = os.environ.get(option.env)
    if env is not None and env != "" and not env.strip():  # "" is unset, as CI templates leave it; "  " is a mistake
        raise pytest.UsageError(f"{option.env} (environment): {env!r} is blank; allowed: {option.metavar or 'a value'}, or unset or ''")
    if env is not None and env.strip() != "":
        value = _parse_flag(option, env, option.env) if option.flag else env.strip()
        if option.repeat:
            value = tuple(item.strip() for item in env.split(";") if item.strip())
        return Setting(option, value, "env", invocation_dir)
    ini = _read_ini(config, option)
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    if option.flag and ini is not None:
        return Setting(option, ini, "ini", ini_dir)
    items = [] if option.flag else [str(item).strip() for item in ini if str(item).strip()]
    if items:
        return Setting(option, tuple(items) if option.repeat else _ini_text(option, items), "ini", ini_dir)
    if option.flag:
        return Setting(option, option.default == "on", "default", config.rootpath)
    return Setting(option, option.default, "default", config.rootpath)


def _read_ini(config: pytest.Config, option: Option) -> Any:
    try:
        return config.getini(option.ini)
    except (ValueError, TypeError, pytest.UsageError) as error:  # pytest's own check of the ini type
        allowed = "true or false" if option.flag else "a string or a list"
        raise pytest.UsageError(f"{option.ini} (ini): {shortened(str(error), 200)}; allowed: {allowed}") from None


def _ini_text(option: Option, items: list[str]) -> str:
    """An ini list as the option's text: items joined by the option's separator.

    For targets, a list of bare module names (``["q_proj", "v_proj"]``) is one set, as in peft's
    ``target_modules`` and the matrix file; items with commas or keywords are one set each.
    """
    if option.name == "targets" and len(items) > 1 and all(_bare_module_name(item) for item in items):
        return ",".join(items)
    return LIST_SEPARATORS.get(option.name, ",").join(items)


def _bare_module_name(text: str) -> bool:
    return not any(mark in text for mark in ",|") and text.lower() not in ("all-linear", "default")


def header_lines(settings: dict[str, Setting]) -> list[str]:
    """The report-header lines: each value with its source."""
    parts = []
    for name, setting in settings.items():
        if setting.option.flag:
            shown = "on" if setting.value else "off"
        elif setting.option.repeat:
            shown = " ".join(setting.value) if setting.value else "-"
        else:
            shown = setting.value if setting.value is not None else "-"
        parts.append(f"{name}={shown} [{setting.source}]")
    return wrapped_line("lora: ", parts)


def wrapped_line(prefix: str, parts: list[str], width: int = 120) -> list[str]:
    """``parts`` joined by commas in lines of at most ``width`` columns, each starting with ``prefix``."""
    lines, line = [], ""
    for part in parts:
        if line and len(prefix) + len(line) + len(part) + 2 > width:
            lines.append(prefix + line + ",")
            line = ""
        line = f"{line}, {part}" if line else part
    return [*lines, prefix + line]
