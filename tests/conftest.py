"""Helpers for the plugin's tests: a clean environment and small benchmark suites in pytester."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from pytest_lora import bench

# CI runs the same examples every time (a red build must be reproducible); set
# HYPOTHESIS_PROFILE=explore to search new ones.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# pytester's in-process runs restore sys.modules afterwards; a C extension such as torch can't be
# imported a second time, so everything heavy is imported once here, before any inner run.
import bitsandbytes  # noqa: F401,E402
import peft  # noqa: F401,E402
import torch  # noqa: F401,E402
import transformers  # noqa: F401,E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # the report's plots: imported once here too, not again in every inner run
import matplotlib.pyplot  # noqa: F401,E402

# A tiny matrix that runs in a second: one tiny model, one quantization, one rank, two targets.
TINY = ("--lora-models=llama-3.2-1b-tiny", "--lora-quant=none", "--lora-ranks=8", "--lora-targets=q_proj,v_proj")

COUNTING_SUITE = """
import pytest

pytestmark = pytest.mark.lora_params


def test_count(lora_model, lora_bench):
    trainable, total = lora_model.get_nb_trainable_parameters()
    lora_bench.record("trainable_params", trainable, "params")
    lora_bench.record("total_params", total, "params")
"""


@pytest.fixture(autouse=True)
def no_lora_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own PYTEST_LORA_* variables must not leak into the tests' pytest runs."""
    for name in list(os.environ):
        if name.startswith("PYTEST_LORA_"):
            monkeypatch.delenv(name)


class CpuOnly:
    """A plugin of every inner run: it sees no GPU, so that the tests expect the same on a GPU
    host as on the CPU (a test that wants a GPU hands the inner run a fake one)."""

    def pytest_lora_gpu(self, config):
        return False  # an answer: no GPU (None would let the default discovery answer)


@pytest.fixture(autouse=True)
def inner_runs_see_no_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every in-process inner run gets ``CpuOnly`` (subprocess runs pass ``--lora-device=cpu``)."""
    if "pytester" not in request.fixturenames:
        return
    pytester = request.getfixturevalue("pytester")
    inline_run = pytester.inline_run
    monkeypatch.setattr(pytester, "inline_run", lambda *args, plugins=(), **kwargs: inline_run(*args, plugins=[CpuOnly(), *plugins], **kwargs))


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Write a benchmark suite file under ``suites/`` of the pytester directory: the suites that
    ``--lora-bench`` runs in this test's in-process runs, in place of the built-in ones
    (a subprocess run names the directory)."""
    monkeypatch.setattr(bench, "builtin_suites", lambda: pytester.path / "suites")

    def write(body: str = COUNTING_SUITE, name: str = "test_suite.py"):
        # pin what the options don't set, so the default matrix may change without breaking tests
        (pytester.path / "pinned.toml").write_text('variants = ["lora"]\ndropout = [0.05]\noptimizers = ["adamw"]\n')
        pytester.makeini("[pytest]\nlora_matrix = pinned.toml\n")
        directory = pytester.path / "suites"
        directory.mkdir(exist_ok=True)
        path = directory / name
        path.write_text(textwrap.dedent(body))
        return path

    return write


def bench_subprocess(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """``pytest --lora-bench`` of the built-in suites in a fresh process (as a user runs it, output
    not a terminal), results under ``directory/results``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_LORA_")}
    return subprocess.run([sys.executable, "-m", "pytest", "--lora-bench", "--lora-device=cpu", "-q", "-p", "no:cacheprovider",
                           f"--lora-results={directory / 'results'}", *args],
                          cwd=directory, capture_output=True, text=True, env=environment, timeout=900)


# A small matrix of the three suites whose numbers repeat exactly (timings aside): -n 2, a killed
# worker and shards are held against its serial run.
SMALL = ("--lora-models=llama-3.2-1b-tiny,gpt2-medium-tiny", "--lora-quant=none,nf4", "--lora-ranks=8", "--lora-targets=default",
         "--lora-device=cpu", "-p", "no:cacheprovider", "-m", "lora_params or lora_merge or lora_step_time")
TIMINGS = ("_s", "tokens_per_s", "cpu_pressure", "other_cpu_load", "harness_overhead_pct", "mfu")


def untimed(document: dict, suites: tuple[str, ...] | None = None) -> dict:
    """Each record's status and metrics by test id, timings left out (of ``suites`` only, if given)."""
    return {r["test"]: (r["status"], {k: v for k, v in r["metrics"].items() if not k.endswith(TIMINGS)})
            for r in document["records"] if suites is None or r["suite"] in suites}


@pytest.fixture(scope="session")
def small_serial_run(tmp_path_factory) -> dict:
    """The ``SMALL`` matrix run serially once for the session: the reference of the parallel runs."""
    directory = tmp_path_factory.mktemp("small-serial")
    done = bench_subprocess(directory, *SMALL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((directory / "results" / "latest.json").read_text())


@dataclass
class DefaultRun:
    """One run of the default CPU matrix, every suite: its results directory, document and output."""

    results: Path
    document: dict
    stdout: str

    @property
    def latest(self) -> Path:
        return self.results / "latest.json"


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> DefaultRun:
    """The default matrix run once for the session: the gate's baseline and the report's source."""
    directory = tmp_path_factory.mktemp("default-run")
    done = bench_subprocess(directory)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = directory / "results"
    return DefaultRun(results, json.loads((results / "latest.json").read_text()), done.stdout)
