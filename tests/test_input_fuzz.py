"""Arbitrary values for every option, from every source, and arbitrary matrix files (hypothesis).

Each example sets one to three options, each from the command line, the environment, an ini
file (``tox.ini`` text, or native TOML in ``pyproject.toml``) or a ``--lora-matrix`` file, to
arbitrary text, numbers, booleans or TOML values, and runs pytest in-process on a suite that
takes every matrix dimension but builds nothing. The outcome must be one of two:

- a clean run (exit 0, or 5 when a shard holds no test), or
- exit 4 with an ``ERROR:`` line naming one of the options set, in the form of its source
  (``--lora-ranks``, ``PYTEST_LORA_RANKS``, ``lora_ranks``, or the matrix file), and no file
  written by the run;

never an INTERNALERROR, never a traceback. CI runs a bounded, derandomised set
(``FUZZ_EXAMPLES``, default 100); ``make fuzz`` runs a long randomised one.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from pytest_lora.matrix import MATRIX_KEYS
from pytest_lora.options import BY_NAME, OPTIONS

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
DERANDOMIZE = os.environ.get("FUZZ_RANDOM", "0") != "1"
# shrinking re-runs pytest hundreds of times: the long run shrinks, CI reports the example it found
PHASES = (Phase.explicit, Phase.generate, Phase.shrink) if os.environ.get("FUZZ_SHRINK") == "1" else (Phase.explicit, Phase.generate)

DIMENSIONS_SUITE = """
def test_spec(model_spec, quant_spec, lora_spec, workload_spec, optimizer_spec, serve_spec, lora_bench):
    lora_bench.record("rank", lora_spec.r, "rank")
"""

# Options whose value is a path: kept relative and inside the example's directory, so that a
# clean run neither reads the whole filesystem (--lora-suites=/) nor writes outside it.
PATH_OPTIONS = {"matrix", "results", "suites", "forget_data", "learn_data", "compare", "models"}

# --------------------------------------------------------------------------- values

# Values that once broke, or sit at an edge: digits int() refuses, numbers too large for a float,
# blanks, separators alone, a path too long for the filesystem, words the options know.
TRICKY = ["", " ", "\t", "\u00a0", "\u200b", "0", "-1", "²", "¹", "٣", "1e400", "inf", "nan", "-0", "0x10", "1_000", " 8 ",
          "9" * 30, "8,,16", ",", "|", "1/0", "0/0", "3/2", "+5%", "==", "a" * 300, "m" * 3000]
KNOWN = ["auto", "cpu", "cuda", "all-linear", "default", "q_proj,v_proj", "nf4", "bf16", "fp32", "nf4-dq", "int8", "hqq-4bit-g7",
         "1/2", "1 GiB", "true", "off", "summary", "full", "measure", "adamw", "paged_adamw", "lora", "8,16", "2", "8",
         "llama-3.2-1b-tiny", "trainable_params:==", "mfu:off"]
scalars = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
nested = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)),
                      max_leaves=8)
toml_values = st.one_of(st.sampled_from(TRICKY), st.sampled_from(KNOWN), scalars, nested)  # a quarter each, roughly


def toml(value: object) -> str:
    """A TOML value (the tests' own writer: strings in JSON's escapes, which TOML shares)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value) if -(2**63) <= value < 2**63 else json.dumps(str(value))  # TOML integers are 64-bit
    if isinstance(value, list):
        return "[" + ", ".join(toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml(str(key))} = {toml(item)}" for key, item in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML refuses a raw DEL



def as_text(value: object) -> str:
    """The command line and the environment take text."""
    if isinstance(value, (list, dict)):
        return toml(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def harmless_path(text: str) -> bool:
    """A value that, read as a path, stays inside the example's directory."""
    parts = text.replace("\\", "/").split("/")
    return not text.startswith(("/", "~")) and ".." not in parts and text.strip() == text


setting = st.tuples(st.sampled_from(OPTIONS), st.sampled_from(["cli", "env", "ini", "pyproject"]), toml_values)
matrix_entry = st.tuples(st.one_of(st.sampled_from(MATRIX_KEYS), st.text(min_size=1, max_size=10)), toml_values)


@st.composite
def examples(draw):
    # mostly one option, so that a bad value is not hidden behind another option's error
    settings_ = draw(st.lists(setting, min_size=0, max_size=3, unique_by=lambda item: item[0].name).filter(lambda found: len(found) < 3)
                     | st.lists(setting, min_size=1, max_size=1))
    matrix = draw(st.one_of(st.none(), st.none(), st.dictionaries(st.one_of(st.sampled_from(MATRIX_KEYS), st.text(min_size=1, max_size=10)),
                                                        toml_values, max_size=3)))
    return settings_, matrix


# --------------------------------------------------------------------------- one example

def write_example(directory, settings_, matrix, environment):
    """The files and environment of one example; the options given on the command line."""
    args, ini, pyproject = [], [], []
    for option, source, value in settings_:
        text = as_text(value)
        if option.name in PATH_OPTIONS and not harmless_path(text):
            text = value = "somewhere"
        if source == "cli":
            args.append(option.cli if option.flag else f"{option.cli}={text}")
        elif source == "env":
            environment[option.env] = text.replace("\x00", "")
        elif source == "ini":
            ini.append((option.ini, " ".join(text.split())))  # one line
        else:
            pyproject.append(f"{option.ini} = {toml(value)}")
    if pyproject:  # pytest reads pyproject.toml before tox.ini: the ini text goes there too, as strings
        lines = pyproject + [f"{name} = {toml(text)}" for name, text in ini]
        (directory / "pyproject.toml").write_text("[tool.pytest.ini_options]\n" + "\n".join(lines) + "\n", encoding="utf-8")
    else:
        (directory / "tox.ini").write_text("[pytest]\n" + "".join(f"{name} = {text}\n" for name, text in ini), encoding="utf-8")
    if matrix is not None:
        lines = [f"{toml(str(key))} = {toml(value)}" for key, value in matrix.items()]
        (directory / "fuzz.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        args.append("--lora-matrix=fuzz.toml")
    return [arg.replace("\x00", "") for arg in args]


def named(option, source) -> str:
    return {"cli": option.cli, "env": option.env, "ini": option.ini, "pyproject": option.ini}[source]


FIRST_ONLY = """
def pytest_collection_modifyitems(config, items):
    items[1:] = []  # every parameter set was made (and checked); one runs
"""


@pytest.fixture
def fuzz_directory(pytester, suite):
    suite(DIMENSIONS_SUITE)
    (pytester.path / "suites" / "conftest.py").write_text(FIRST_ONLY)
    (pytester.path / "pinned.toml").unlink()  # the example's files decide everything
    (pytester.path / "tox.ini").unlink()
    return pytester


def found(name: str, source: str, value: object, matrix: dict | None = None) -> tuple:
    """An example that once broke (kept as an explicit example, run first every time)."""
    return ([(BY_NAME[name], source, value)] if name else [], matrix)


@pytest.mark.slow
@example(example=found("rounds", "cli", "²"))  # str.isdigit takes it, int() refuses it: an INTERNALERROR
@example(example=found("gpus_per_worker", "env", "¹"))
@example(example=found("compare", "cli", "a" * 300))  # a name too long for the filesystem: an INTERNALERROR
@example(example=found("bench", "env", "m" * 3000))  # the value echoed whole in the message
@example(example=found("bench", "ini", "m" * 3000))
@example(example=found("", "", None, {"targets": "m" * 3000}))
@example(example=found("", "", None, {"modules_to_save": "INF"}))  # the error named the default matrix, not the file
@example(example=found("targets", "pyproject", True))  # a rejected run left pytest-benchmark's .benchmarks
@settings(max_examples=EXAMPLES, derandomize=DERANDOMIZE, deadline=None, database=None, phases=PHASES,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(example=examples())
def test_any_value_from_any_source_is_a_clean_run_or_a_usage_error_naming_it(fuzz_directory, example):
    pytester = fuzz_directory
    settings_, matrix = example
    keep = {"suites"}
    for entry in pytester.path.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    environment = {}
    args = write_example(pytester.path, settings_, matrix, environment)
    before = set(os.listdir(pytester.path))
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        result = pytester.runpytest("-p", "no:cacheprovider", *args)
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    output = result.stdout.str() + result.stderr.str()
    given_ = [(option.name, source, value) for option, source, value in settings_]
    described = f"settings={given_!r} args={args!r} env={environment!r} matrix={matrix!r}\n{output[-3000:]}"
    event(f"exit {int(result.ret)}")  # --hypothesis-show-statistics: how many runs ended which way
    assert "INTERNALERROR" not in output and "Traceback" not in output, described
    if result.ret == pytest.ExitCode.USAGE_ERROR:
        errors = [line for line in result.stderr.lines if line.startswith("ERROR: ")]
        names = [named(option, source) for option, source, _ in settings_] + (["--lora-matrix"] if matrix is not None else [])
        assert errors and any(name in errors[0] for name in names), described
        assert max(len(line) for line in result.stderr.lines) < 1000, described  # long values are shortened
        made = set(os.listdir(pytester.path)) - before  # a rejected run writes nothing of ours
        assert made <= {".benchmarks"} and not any(list((pytester.path / name).iterdir()) for name in made), described  # pytest-benchmark's empty storage
    else:
        assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED), described
