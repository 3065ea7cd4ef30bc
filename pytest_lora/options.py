"""The plugin's options: one table, three ways to set each, one precedence.

Every option is a command-line flag (``--lora-models``), an ini key (``lora_models``) and an
environment variable (``PYTEST_LORA_MODELS``). The value that wins is the first one set in the
order command line > environment > ini > built-in default, and the report header says which
source each value came from, so a CI log always shows what a run measured.

This module holds strings only: parsing values into a matrix is ``matrix.py``'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

SOURCES = ("cli", "env", "ini", "default")


@dataclass(frozen=True)
class Option:
    """One pytest-lora option and its help text."""

    name: str
    help: str
    metavar: str = ""
    flag: bool = False
    default: str | None = None

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


OPTIONS: tuple[Option, ...] = (
    Option("bench", "run the benchmark suites, record their numbers and report them.", flag=True),
    Option(
        "models",
        "comma-separated registry names (e.g. llama-3.1-8b, llama-3.2-1b-tiny) or paths to a "
        "config.json or a local checkpoint directory. Default: tiny variants on the CPU, real shapes on the GPU.",
        metavar="NAME|PATH,...",
    ),
    Option("quant", "comma-separated quantizations: none, fp32, bf16, fp16, int8, nf4, fp4, nf4-dq.", metavar="Q,..."),
    Option("ranks", "comma-separated LoRA ranks, e.g. 8,16.", metavar="R,..."),
    Option(
        "targets",
        "target modules: a comma-separated list of module names (q_proj,v_proj), 'all-linear', or "
        "'default' (peft's per-architecture default); several sets separated by '|'.",
        metavar="NAMES|all-linear|default",
    ),
    Option("matrix", "a TOML file with a whole matrix (models, quant, ranks, targets, alpha, ...).", metavar="FILE.toml"),
    Option("device", "where models are built: auto (cuda when available), cpu or cuda.", metavar="auto|cpu|cuda", default="auto"),
    Option("results", "directory for the results JSON (<run-id>.json and latest.json).", metavar="DIR", default="results"),
    Option("suites", "directory of the benchmark suites that --lora-bench runs when no path is given.", metavar="DIR", default="suites"),
    Option("rounds", "timed training steps per config (default 10 on a GPU, 5 on the CPU).", metavar="N"),
    Option("warmup", "untimed training steps before the timed ones (default 3 on a GPU, 1 on the CPU).", metavar="N"),
    Option("seeds", "seeds of the forgetting experiment (default 3).", metavar="N", default="3"),
    Option("forget_data", "text or JSONL whose held-out loss measures forgetting (with a checkpoint in --lora-models).", metavar="PATH"),
    Option("learn_data", "text or JSONL to fine-tune on in the forgetting experiment (with --lora-forget-data).", metavar="PATH"),
    Option(
        "peak",
        "the device's dense bf16 peak for MFU: auto (a table of known GPUs, else measured), measure "
        "(a large bf16 matrix product, once per session) or a number in TFLOP/s.",
        metavar="auto|measure|TFLOPS",
        default="auto",
    ),
)

BY_NAME = {option.name: option for option in OPTIONS}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Setting:
    """A resolved option value and where it came from (``cli``, ``env``, ``ini`` or ``default``)."""

    option: Option
    value: str | bool | None
    source: str

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
        else:
            group.addoption(option.cli, action="store", dest=option.dest, default=None, metavar=option.metavar, help=text)
        parser.addini(option.ini, option.help, type="string", default="")


def _parse_flag(option: Option, raw: str, where: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise pytest.UsageError(f"{where}: {raw!r} is not a boolean; allowed: 1/0, true/false, yes/no, on/off")


def resolve(config: pytest.Config) -> dict[str, Setting]:
    """Resolve every option with the precedence command line > environment > ini > default."""
    settings = {}
    for option in OPTIONS:
        settings[option.name] = _resolve_one(config, option)
    return settings


def _resolve_one(config: pytest.Config, option: Option) -> Setting:
    cli = config.getoption(option.dest, default=None)
    if cli:
        return Setting(option, cli, "cli")
    env = os.environ.get(option.env)
    if env is not None and env.strip() != "":
        value = _parse_flag(option, env, option.env) if option.flag else env.strip()
        return Setting(option, value, "env")
    ini = config.getini(option.ini)
    if isinstance(ini, str) and ini.strip():
        value = _parse_flag(option, ini, option.ini) if option.flag else ini.strip()
        return Setting(option, value, "ini")
    return Setting(option, False if option.flag else option.default, "default")


def header_lines(settings: dict[str, Setting]) -> list[str]:
    """The report-header lines: each value with its source."""
    parts = []
    for name, setting in settings.items():
        if setting.option.flag:
            shown = "on" if setting.value else "off"
        else:
            shown = setting.value if setting.value is not None else "-"
        parts.append(f"{name}={shown} [{setting.source}]")
    return ["lora: " + ", ".join(parts)]
