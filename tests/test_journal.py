"""No record is lost under pytest-xdist: each worker's append-only journal, the controller's reading
of it as the worker reports, a worker that dies in a config (a planted ``os._exit``) and a run
killed as a whole (its controller killed by SIGKILL), read back by ``pytest-lora report``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pytest_lora.dist import journal
from pytest_lora.report import markdown
from pytest_lora.results.store import load

from conftest import clean_environment, untimed


def record(test: str, status: str = "ok", **metrics) -> dict:
    return {"suite": "params", "test": test, "model": "m", "quant": "none", "lora": None, "workload": None,
            "status": status, "error": None, "metrics": metrics}


def test_a_reader_takes_complete_lines_once_and_leaves_a_torn_last_line(tmp_path):
    writer = journal.Journal(tmp_path / "gw0.jsonl")
    reader = journal.Reader(tmp_path / "gw0.jsonl")
    assert journal.Reader(tmp_path / "gw9.jsonl").new_events() == []  # a worker that wrote nothing yet
    writer.record(record("a", trainable_params=1))
    writer.build(("m", "nf4", "cpu"))
    assert [event["event"] for event in reader.new_events()] == ["record", "build"]
    assert reader.new_events() == []
    with open(tmp_path / "gw0.jsonl", "ab") as stream:  # a worker killed in the middle of a write
        stream.write(b'{"event": "record", "rec')
    assert reader.new_events() == []
    writer.close()
    with open(tmp_path / "gw0.jsonl", "ab") as stream:
        stream.write(b'ord": {"test": "b"}}\n')
    assert reader.new_events() == [{"event": "record", "record": {"test": "b"}}]


def test_the_collector_sends_on_records_builds_and_groups_and_knows_what_was_running(tmp_path):
    collector = journal.Collector(tmp_path)
    writer = journal.Journal(collector.expect("gw1"))
    writer.groups({"suites/test_params.py::t[a]": "base:m:none"})
    writer.started("suites/test_params.py::t[a]", record("a"))
    writer.build(("m", "none", "cpu"))
    writer.record(record("a", trainable_params=7))
    writer.started("suites/test_params.py::t[b]", record("b"))
    writer.started("suites/test_params.py::t[c]", record("c"))
    writer.dropped("suites/test_params.py::t[c]")  # skipped outside the bench: no record, not lost
    arrivals = collector.collect("gw1")
    assert [r["metrics"] for r in arrivals.records] == [{"trainable_params": 7}]
    assert arrivals.builds == [("m", "none", "cpu")]
    assert collector.groups == {"suites/test_params.py::t[a]": "base:m:none"}
    assert collector.interrupted("suites/test_params.py::t[a]", "died") is None  # its record arrived
    crashed = collector.interrupted("suites/test_params.py::t[b]", "worker gw1 died")
    assert (crashed["test"], crashed["status"], crashed["error"]) == ("b", "error", "worker gw1 died")
    assert collector.interrupted("suites/test_params.py::t[b]", "again") is None  # marked once
    assert collector.unfinished("killed") == []  # c was dropped, b is marked


def test_recovery_folds_the_journals_of_an_unfinished_run_into_its_document(tmp_path):
    document = {"run": {"id": "r1", "finished": None, "status": "running"}, "records": [record("a", trainable_params=1)]}
    writer = journal.Journal(journal.directory_of(tmp_path, "r1") / "gw0.jsonl")
    writer.record(record("a", trainable_params=1))  # merged already
    writer.record(record("b", trainable_params=2))  # written to the journal, not yet to the JSON
    writer.started("t[c]", record("c"))  # running when the run was killed
    assert journal.recover(document, tmp_path) == 2
    assert [(r["test"], r["status"], r["error"]) for r in document["records"]] == [
        ("a", "ok", None), ("b", "ok", None), ("c", "error", journal.KILLED)]
    finished = {"run": {"id": "r1", "finished": "2026-11-29T10:00:00", "status": "passed"}, "records": []}
    assert journal.recover(finished, tmp_path) == 0 and finished["records"] == []  # a finished run holds everything


def test_the_report_says_how_many_bases_were_built_and_that_a_run_did_not_finish():
    once = [{"model": "m", "quant": "nf4", "device": "cpu", "count": 1}, {"model": "m", "quant": "none", "device": "cpu", "count": 1}]
    assert markdown.builds_line(once) == "2 for 2 bases, each built once"
    again = [{**once[0], "count": 3}, once[1]]
    assert markdown.builds_line(again) == "4 for 2 bases; built more than once: m nf4 on cpu x3"
    assert "not finished" in markdown.run_line({"status": "running", "started": "t0", "finished": None})
    assert markdown.run_line({"status": "passed", "started": "t0", "finished": "t1"}) == "passed, t0 to t1"


PLANT_EXIT = """
import os

def pytest_runtest_call(item):
    if item.nodeid.endswith("test_record[5]"):
        os._exit(3)  # a segfault, the OOM killer: the worker is gone without a word
"""

PLANT_KILL = """
import os
import signal

def pytest_runtest_call(item):
    if item.nodeid.endswith("test_record[7]"):
        os.kill(os.getppid(), signal.SIGKILL)  # the whole run: its controller
        os._exit(3)
"""

PLANT_CTRL_C = """
import os
import signal
import time

def pytest_runtest_call(item):
    if item.nodeid.endswith("test_record[5]"):
        os.killpg(0, signal.SIGINT)  # Ctrl-C in the terminal: every process of the run
        time.sleep(5)
"""

# The parallel runs here run a suite of twelve configs that record a number and build nothing:
# what they test is the records' way from the workers to the controller (``--dist load`` spreads
# them over both workers), not what a suite measures; each config takes 50 ms, so that the other
# worker is inside one when a fault strikes. tests/test_workers.py holds -n 2 against the serial
# run on every suite of SMALL.
RECORDING_SUITE = """
import time

import pytest


@pytest.mark.parametrize("n", range(12))
def test_record(n, lora_bench):
    lora_bench.describe(model=f"m{n}")
    lora_bench.record("square", n * n, "count")
    time.sleep(0.05)
"""

KILLED_TEST = "suites/test_recording.py::test_record[5]"
EXPECTED = {f"suites/test_recording.py::test_record[{n}]": ("ok", {"square": n * n}) for n in range(12)}


def run_pytest(directory, *args: str, plant: str | None = None) -> subprocess.CompletedProcess:
    environment = clean_environment()
    (directory / "suites").mkdir()
    (directory / "suites" / "test_recording.py").write_text(RECORDING_SUITE)
    plugin = []
    if plant is not None:
        (directory / "planted.py").write_text(plant)
        environment["PYTHONPATH"] = str(directory)
        plugin = ["-p", "planted"]
    return subprocess.run([sys.executable, "-m", "pytest", *plugin, "--lora-bench", "suites", "--dist", "load", "-p", "no:cacheprovider",
                           "-q", *args],
                          cwd=directory, capture_output=True, text=True, env=environment, timeout=300,
                          start_new_session=True)  # its own process group: a planted Ctrl-C stops only the run


@pytest.mark.slow
def test_a_worker_that_dies_loses_no_record_and_its_config_says_why(tmp_path):
    done = run_pytest(tmp_path, "-n", "2", "--lora-results=results", plant=PLANT_EXIT)
    assert done.returncode == 1, done.stdout[-3000:]  # the config that killed its worker fails the run
    assert done.stdout.count("node down") == 1  # the config is not run again on the next worker
    document = json.loads((tmp_path / "results" / "latest.json").read_text())
    records = untimed(document)
    status, metrics = records.pop(KILLED_TEST)
    assert (status, metrics) == ("error", {})
    killed = next(r for r in document["records"] if r["test"] == KILLED_TEST)
    assert killed["error"].startswith("worker gw") and "died while running this config" in killed["error"]
    expected = dict(EXPECTED)
    del expected[KILLED_TEST]
    assert records == expected  # every other record, measured before the crash or after it
    assert not list((tmp_path / "results").glob("*.workers"))  # the journals go once the JSON holds them


def test_a_killed_run_leaves_results_that_pytest_lora_report_reads_whole(tmp_path):
    done = run_pytest(tmp_path, "-n", "2", "--lora-results=results", plant=PLANT_KILL)
    assert done.returncode != 0
    results = tmp_path / "results"
    (run_json,) = results.glob("*.jsonl")  # the controller's log: the run never wrote its JSON
    assert load(run_json)["run"]["status"] == "running"
    (workers,) = results.glob("*.workers")
    journaled = {json.loads(line)["record"]["test"] for path in workers.glob("*.jsonl")
                 for line in path.read_text().splitlines() if '"event":"record"' in line}
    report = subprocess.run([sys.executable, "-m", "pytest_lora.cli", "report", str(run_json)],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "did not finish" in report.stdout
    text = (results / f"{run_json.stem}.md").read_text()
    assert "not finished" in text
    csv_tests = (results / f"{run_json.stem}.csv").read_text()
    assert all(test.split("::")[-1] in csv_tests for test in journaled)  # every record a worker wrote
    killed = "test_record[7]"
    row = next(line for line in csv_tests.splitlines() if killed in line)
    assert "error" in row and "killed before it finished" in row


@pytest.mark.slow
def test_a_run_stopped_with_ctrl_c_marks_what_its_workers_were_running(tmp_path):
    done = run_pytest(tmp_path, "-n", "2", "--lora-results=results", plant=PLANT_CTRL_C)
    assert done.returncode == 2, done.stdout[-3000:]  # interrupted
    document = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert document["run"]["status"] == "interrupted"
    stopped = {r["test"]: r["error"] for r in document["records"] if r["status"] == "error"}
    assert stopped[KILLED_TEST] == "the run stopped while this config ran (interrupted)"
    assert set(stopped.values()) == {"the run stopped while this config ran (interrupted)"}  # at most one per worker
    assert 1 <= len(stopped) <= 2
    assert all(EXPECTED[test] == value for test, value in untimed(document).items() if test not in stopped)


FAKE_GPU_PLUGIN = """
import sys

import pytest

sys.path.insert(0, {tests!r})
from fakes import FakeCudaRuntime, fake_gpu


@pytest.hookimpl(tryfirst=True)
def pytest_lora_gpu(config):
    return fake_gpu(FakeCudaRuntime(names=("NVIDIA H200",)))
"""

ON_THE_GPU = """
import pytest

@pytest.mark.parametrize("n", range(4))
def test_on_the_gpu(n, lora_gpu, lora_bench):
    lora_bench.describe(model=f"m{n}")
    lora_bench.record("gpu_seen", int(lora_gpu is not None), "count")
"""


@pytest.mark.slow
def test_the_run_describes_the_workers_gpu_not_the_controllers(pytester):
    """The controller never touches a GPU: the run's machine is the one its workers measured on."""
    from pathlib import Path

    pytester.makepyfile(fakegpu=FAKE_GPU_PLUGIN.format(tests=str(Path(__file__).parent)), test_on_gpu=ON_THE_GPU)
    pytester.syspathinsert()
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "load", "--lora-bench", "-p", "fakegpu", "test_on_gpu.py",
                                           "--lora-results=results", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()[-2000:]
    document = json.loads((pytester.path / "results" / "latest.json").read_text())
    machine = document["machine"]
    assert (machine["device"], machine["gpu_name"], machine["driver"]) == ("cuda", "NVIDIA H200", "580.95.05")
    assert [r["metrics"]["gpu_seen"] for r in document["records"]] == [1, 1, 1, 1]
