"""Helpers for the plugin's tests: a clean environment and small benchmark suites in pytester."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock
from hypothesis import settings

from pytest_lora import bench
from pytest_lora.models import heap

# CI runs the same examples every time (a red build must be reproducible); set
# HYPOTHESIS_PROFILE=explore to search new ones.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


# The xdist worker this process is, if any (its variables are hidden from the tests, below).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config: pytest.Config) -> None:
    """Coverage measures the processes that run the tests (an xdist controller hands its
    subprocess patch on to its workers), not the pytest runs the tests start: those were never
    part of the gate, and tracing their imports would cost every subprocess run seconds.

    pytester's in-process runs restore ``sys.modules`` afterwards; a C extension such as torch
    can't be imported a second time, so everything heavy is imported once here, before any inner
    run, by each process that runs tests (not by an xdist controller, which would only wait the
    seconds it takes before it starts its workers)."""
    if WORKER is not None or config.getoption("dist", "no") == "no":
        os.environ.pop("COVERAGE_PROCESS_CONFIG", None)
    if WORKER is not None or not config.getoption("numprocesses", None):
        import_the_heavy_stack()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read a shared run go after the others, the slow ones of them first (xdist
    hands tests out in this order): the runs start in the background with the first test and are
    done by then. Early in the order, two readers waited 31 s and 33 s for the bench run, on both
    workers at once."""
    def place(item: pytest.Item) -> tuple[bool, bool]:
        reads = any(name in getattr(item, "fixturenames", ()) for name in SHARED_RUNS)
        return reads, reads and item.get_closest_marker("slow") is None

    items.sort(key=place)  # stable: the collection's order within each group


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session):
    """What is alive when the first test starts (the heavy stack, the collected tests) is frozen
    until the last, as in the bench (``models.heap``): without it, every full collection of the
    tests' own and of their in-process runs walks half a million objects, 0.3 s (in one process,
    the fast tests of fixtures, counts, formats and memory took 39-40 s unfrozen, 20-22 s frozen).
    Not in an xdist controller, which runs no test."""
    if WORKER is None and session.config.getoption("numprocesses", None):
        return (yield)
    with heap.long_lived_frozen():
        return (yield)


def import_the_heavy_stack() -> None:
    import bitsandbytes  # noqa: F401
    import matplotlib
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    matplotlib.use("Agg")  # the report's plots: imported once here too, not again in every inner run
    import matplotlib.pyplot  # noqa: F401


@pytest.fixture(autouse=True)
def no_lora_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own PYTEST_LORA_* variables must not leak into the tests' pytest runs, nor
    the PYTEST_XDIST_* of the worker a test runs on: an inner run that sees them believes it is
    an xdist worker itself (pytest-benchmark then switches its benchmarks off)."""
    for name in list(os.environ):
        if name.startswith(("PYTEST_LORA_", "PYTEST_XDIST_")):
            monkeypatch.delenv(name)


class CpuOnly:
    """A plugin of every inner run: it sees no GPU, so that the tests expect the same on a GPU
    host as on the CPU (a test that wants a GPU hands the inner run a fake one)."""

    def pytest_lora_gpu(self, config):
        return False  # an answer: no GPU (None would let the default discovery answer)


@pytest.fixture(autouse=True)
def inner_runs_see_no_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every in-process inner run gets ``CpuOnly`` (subprocess runs pass ``--lora-device=cpu``);
    every run gets ``INNER_RUN_OPTIONS`` (pytester has just cleared ``PYTEST_ADDOPTS``)."""
    if "pytester" not in request.fixturenames:
        return
    pytester = request.getfixturevalue("pytester")
    monkeypatch.setenv("PYTEST_ADDOPTS", INNER_RUN_OPTIONS)
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


# The pytest runs the tests start in a subprocess leave hypothesis' pytest plugin out: it imports
# all of hypothesis in every run's terminal summary, 1.1 s of a 2 s run that uses none of it.
INNER_RUN_OPTIONS = "-p no:hypothesispytest"


def clean_environment() -> dict[str, str]:
    """This environment less the runner's PYTEST_LORA_* and the xdist worker's PYTEST_XDIST_*, with
    ``INNER_RUN_OPTIONS`` for the pytest runs started in it."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_LORA_", "PYTEST_XDIST_"))}
    return {**environment, "PYTEST_ADDOPTS": INNER_RUN_OPTIONS}


def bench_command(directory: Path) -> list[str]:
    """``pytest --lora-bench`` of the built-in suites on the CPU, results under ``directory/results``."""
    return [sys.executable, "-m", "pytest", "--lora-bench", "--lora-device=cpu", "-q", "-p", "no:cacheprovider",
            f"--lora-results={directory / 'results'}"]


def bench_subprocess(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """``pytest --lora-bench`` of the built-in suites in a fresh process (as a user runs it, output
    not a terminal), results under ``directory/results``."""
    return subprocess.run([*bench_command(directory), *args], cwd=directory, capture_output=True, text=True,
                          env=clean_environment(), timeout=900)


# A small matrix of the three suites whose numbers repeat exactly (timings aside): -n 2, a killed
# worker and shards are held against its serial run.
SMALL = ("--lora-models=llama-3.2-1b-tiny,gpt2-medium-tiny", "--lora-quant=none,nf4", "--lora-ranks=8", "--lora-targets=default",
         "--lora-device=cpu", "-p", "no:cacheprovider", "-m", "lora_params or lora_merge or lora_step_time")
TIMINGS = ("_s", "tokens_per_s", "cpu_pressure", "other_cpu_load", "harness_overhead_pct", "mfu")


def untimed(document: dict, suites: tuple[str, ...] | None = None) -> dict:
    """Each record's status and metrics by test id, timings left out (of ``suites`` only, if given)."""
    return {r["test"]: (r["status"], {k: v for k, v in r["metrics"].items() if not k.endswith(TIMINGS)})
            for r in document["records"] if suites is None or r["suite"] in suites}


class SharedRun:
    """A ``pytest --lora-bench`` subprocess that several tests read, run once for the whole test run.

    Under xdist each worker is a process with session fixtures of its own: a bench run that two
    workers ask for would run twice, and a worker that waits for another's would sit idle. So
    the run starts in the background as soon as a collection holds a test that reads it (the
    first worker to look starts it under a file lock in the run's shared temporary root, the
    recipe of xdist's documentation; the others find it started). It runs beside the first tests,
    and whoever reads it waits for its exit-code file. Its results sit under ``directory/results``."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args  # args(directory): the run's own command-line arguments
        self.process: subprocess.Popen | None = None

    def start(self, root: Path) -> None:
        directory = root / self.name
        with FileLock(str(root / f"{self.name}.lock")):
            if directory.exists():
                return  # started by this process or another worker
            directory.mkdir()
            command = [*bench_command(directory), *self.args(directory)]
            finish = '"$@" > stdout 2> stderr; echo $? > exit.tmp && mv exit.tmp exit'  # the exit code once both files are whole
            self.process = subprocess.Popen(["bash", "-c", finish, "bash", *command], cwd=directory, env=clean_environment())

    def wait(self, root: Path, timeout: float = 900) -> subprocess.CompletedProcess:
        self.start(root)
        directory, deadline = root / self.name, time.monotonic() + timeout
        while not (directory / "exit").exists():
            assert time.monotonic() < deadline, f"{self.name}: no exit code after {timeout} s"
            time.sleep(0.2)
        done = subprocess.CompletedProcess(self.name, int((directory / "exit").read_text()),
                                           (directory / "stdout").read_text(), (directory / "stderr").read_text())
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    def close(self) -> None:
        """The process that started the run waits for it: no run outlives the test run."""
        if self.process is not None:
            self.process.wait(timeout=900)


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary directory of the whole test run: under xdist, the parent of every worker's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if WORKER is not None else base


SHARED_RUNS = {
    "small_serial_run": SharedRun("small-serial", lambda directory: SMALL),
    "bench_run": SharedRun("bench-run", lambda directory: (f"--lora-matrix={bench_matrix_file(directory)}", "--lora-seeds=2")),
}


@pytest.fixture(scope="session", autouse=True)
def shared_runs_started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Start every shared run that a selected test reads, before the first test."""
    needed = [run for name, run in SHARED_RUNS.items() if any(name in getattr(item, "fixturenames", ()) for item in request.session.items)]
    for run in needed:
        run.start(shared_root(tmp_path_factory))
    yield
    for run in needed:
        run.close()


@pytest.fixture(scope="session")
def small_serial_run(tmp_path_factory) -> dict:
    """The ``SMALL`` matrix run serially once: the reference of the parallel runs."""
    root = shared_root(tmp_path_factory)
    SHARED_RUNS["small_serial_run"].wait(root)
    return json.loads((root / "small-serial" / "results" / "latest.json").read_text())


# Every suite on the smallest matrix that still feeds every table, plot and gate kind: a decoder
# (Llama: the gate's one-config tests pair with its bf16 records) and GPT-2 (Conv1D layers), the
# two full-precision dtypes and one bitsandbytes 4-bit format (the memory grid's change from full
# precision, the merge table's quantized strategies), one LoRA spec, both optimizers (the tables'
# workload labels). The default CPU matrix's own 27 bases run in the bench and the published run.
BENCH_MATRIX = {"models": ["llama-3.2-1b-tiny", "gpt2-medium-tiny"], "quant": ["fp32", "bf16", "nf4"], "ranks": [16],
                "targets": ["default"], "optimizers": ["adamw", "adamw8bit"]}


def bench_matrix_file(directory: Path) -> Path:
    """``BENCH_MATRIX`` as a ``--lora-matrix`` file in ``directory``."""
    path = directory / "bench-matrix.toml"
    path.write_text("".join(f"{key} = {json.dumps(values)}\n" for key, values in BENCH_MATRIX.items()))
    return path


@dataclass
class BenchRun:
    """One run of ``BENCH_MATRIX``, every suite: its results directory, document and output."""

    results: Path
    document: dict
    stdout: str

    @property
    def latest(self) -> Path:
        return self.results / "latest.json"


@pytest.fixture(scope="session")
def bench_run(tmp_path_factory) -> BenchRun:
    """``BENCH_MATRIX`` run once for the whole test run, two seeds of the forgetting experiment (a
    spread, at two thirds of the default's cost): the gate's baseline and the report's source."""
    root = shared_root(tmp_path_factory)
    done = SHARED_RUNS["bench_run"].wait(root)
    results = root / "bench-run" / "results"
    return BenchRun(results, json.loads((results / "latest.json").read_text()), done.stdout)
