"""A run's status tells the truth, every selected test leaves one record, and kills leave no debris.

- the status comes from what happened: ``passed`` only when every selected test left its record
  and none failed, ``interrupted`` with the counts otherwise; a second Ctrl-C while the first is
  handled changes nothing of that;
- SIGTERM ends a run as Ctrl-C does: status, finished time, tables, no temporary files;
- the records go to an append-only log while the run goes (``results.runlog``); a killed run's
  log is read by every reader, and the next run says it never finished and leaves it alone;
- temporary files of a killed write are removed at the next run's start, only ours.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import clean_environment
from pytest_lora.results import runlog
from pytest_lora.report.publish import write_report
from pytest_lora.results.store import ResultsStore, load, remove_stale_temporaries, unfinished_runs
from pytest_lora.run import run_status

THREE = """
import os, signal
import pytest


def test_first(lora_bench):
    lora_bench.record("n", 1, "things")


def test_second(lora_bench):
    {second}


def test_third(lora_bench):
    lora_bench.record("n", 3, "things")
"""

SECOND_CTRL_C = """
import os, signal


def pytest_keyboard_interrupt(excinfo):
    os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while pytest handles the first
"""


def run_files(directory):
    results = directory / "results"
    return load(results / "latest.json"), sorted(path.name for path in results.iterdir())


def test_a_double_ctrl_c_is_recorded_interrupted_with_the_counts(pytester, suite):
    suite(THREE.replace("{second}", "os.kill(os.getpid(), signal.SIGINT)"))
    pytester.makepyfile(planted_second_ctrl_c=SECOND_CTRL_C)
    pytester.syspathinsert()
    result = pytester.runpytest_subprocess("--lora-bench", "suites", "-k", "test_first or test_second or test_third",
                                           "-p", "planted_second_ctrl_c", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stderr.fnmatch_lines(["*pytest-lora: SIGINT held until the results are written*"])
    result.stdout.fnmatch_lines(["pytest-lora: interrupted: 1 of 3 selected tests recorded"])
    document, names = run_files(pytester.path)
    assert document["run"]["status"] == "interrupted" and document["run"]["stopped_by"] == "SIGINT"
    assert document["run"]["tests"] == {"selected": 3, "recorded": 1, "dropped": 0}
    assert [record["metrics"] for record in document["records"]] == [{"n": 1}]
    assert not [name for name in names if name.endswith((".tmp", ".jsonl"))]
    assert any(name.endswith(".md") for name in names)


SLEEPS = """
import pathlib, time


def test_first(lora_bench):
    lora_bench.record("n", 1, "things")


def test_waits(lora_bench):
    pathlib.Path("started").write_text("")
    time.sleep(120)
"""


def test_sigterm_ends_a_run_as_ctrl_c_does(pytester, suite):
    """SIGTERM from outside (a CI job's timeout) to a pytest run in a subprocess: the run is
    ``interrupted`` with its finished time and counts, its tables are written, and nothing
    temporary is left."""
    suite(SLEEPS)
    environment = clean_environment()
    process = subprocess.Popen([sys.executable, "-m", "pytest", "--lora-bench", "suites", "-k", "test_first or test_waits",
                                "-p", "no:cacheprovider", "-q"], cwd=pytester.path, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (pytester.path / "started").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run did not reach its waiting test"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    document, names = run_files(pytester.path)
    run = document["run"]
    assert run["status"] == "interrupted" and run["stopped_by"] == "SIGTERM" and run["finished"] is not None
    assert run["tests"] == {"selected": 2, "recorded": 1, "dropped": 0}
    assert {f"{run['id']}.md", f"{run['id']}.csv", "latest.md", "latest.csv"} <= set(names)
    assert "interrupted, " in (pytester.path / "results" / "latest.md").read_text()
    assert "; 1 of 2 selected tests recorded (stopped by SIGTERM)" in (pytester.path / "results" / "latest.md").read_text()
    assert not [name for name in names if name.endswith((".tmp", ".jsonl"))]


def test_every_selected_test_leaves_one_record_whatever_happens_in_setup(pytester, suite):
    suite("""
        import pytest


        @pytest.fixture
        def broken():
            raise RuntimeError("setup failed")


        def test_setup_error(lora_bench, broken):
            pass


        def test_setup_skip(lora_bench):
            pytest.skip("not here")


        def test_fails(lora_bench):
            lora_bench.record("n", 1, "things")
            assert False


        def test_passes(lora_bench):
            lora_bench.record("n", 2, "things")
    """)
    result = pytester.runpytest("--lora-bench")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    document, _ = run_files(pytester.path)
    statuses = {record["test"].split("::")[-1]: record["status"] for record in document["records"]}
    assert statuses == {"test_setup_error": "error", "test_setup_skip": "skipped", "test_fails": "error", "test_passes": "ok"}
    assert document["run"]["tests"] == {"selected": 4, "recorded": 4, "dropped": 0}
    assert document["run"]["status"] == "failed"


# The merge on a trained model trains its task model first (about 30 s): the nf4 run leaves it out.
FAMILIES = {"fp32": (), "nf4": ("-k", "not test_merge_on_a_trained_model")}


@pytest.mark.slow
@pytest.mark.parametrize("quant", list(FAMILIES))
def test_a_single_quantization_family_records_every_merge_test(pytester, quant):
    """``-m lora_merge`` of the built-in suites on full-precision bases only, or quantized ones
    only (where the crash this guards against was): the other family's tests have an empty
    parameter set; each is skipped with pytest's reason and recorded, none crashes."""
    result = pytester.runpytest("--lora-bench", "-m", "lora_merge", "--lora-models=llama-3.2-1b-tiny", f"--lora-quant={quant}", "--lora-ranks=4",
                                "-p", "no:cacheprovider", *FAMILIES[quant])
    assert result.ret == 0, result.stdout.str()[-3000:]
    document = load(pytester.path / "results" / "latest.json")
    tests = document["run"]["tests"]
    assert tests["selected"] == tests["recorded"] == len(document["records"]) >= 4
    assert len({record["test"] for record in document["records"]}) == len(document["records"])
    empty = [record for record in document["records"] if "NOTSET" in record["test"]]
    assert empty and all(record["status"] == "skipped" and "empty parameter set" in record["error"] for record in empty)
    assert document["run"]["status"] == "passed"


@pytest.mark.parametrize("code, tests, status", [
    (0, {"selected": 3, "recorded": 3, "dropped": 0}, "passed"),
    (0, {"selected": 3, "recorded": 2, "dropped": 1}, "passed"),
    (0, {"selected": 3, "recorded": 2, "dropped": 0}, "interrupted"),
    (1, {"selected": 3, "recorded": 3, "dropped": 0}, "failed"),
    (1, {"selected": 3, "recorded": 1, "dropped": 0}, "interrupted"),
    (2, {"selected": 3, "recorded": 3, "dropped": 0}, "interrupted"),
])
def test_the_status_comes_from_what_happened(code, tests, status):
    assert run_status(code, tests) == status


# --------------------------------------------------------------------------- the log


def test_the_log_is_read_as_the_document_it_stands_for(tmp_path):
    log = runlog.RunLog(tmp_path / "r1.jsonl")
    header = {"schema_version": 1, "run": {"id": "r1", "status": "running"}, "machine": {}}
    log.append(header, [{"test": "a", "metrics": {"n": 1}}])
    log.append(header, [{"test": "b", "metrics": {"n": 2}}])  # the same header is not written again
    header["run"]["builds"] = [1]
    log.append(header, [{"test": "a", "metrics": {"n": 3}}])  # a rerun's record replaces the first
    log.close()
    lines = (tmp_path / "r1.jsonl").read_text().splitlines()
    assert [next(iter(json.loads(line))) for line in lines] == ["header", "record", "record", "header", "record"]
    with open(tmp_path / "r1.jsonl", "a") as stream:
        stream.write('{"record": {"test": "c", "metr')  # a kill mid-write
    document = load(tmp_path / "r1.jsonl")
    assert document["run"] == {"id": "r1", "status": "running", "builds": [1]}
    assert [(record["test"], record["metrics"]) for record in document["records"]] == [("a", {"n": 3}), ("b", {"n": 2})]


def test_a_log_broken_before_its_last_line_or_without_header_is_refused(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"header": {}}\n{"rec\n{"record": {"test": "a"}}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        runlog.read(tmp_path / "broken.jsonl")
    (tmp_path / "headless.jsonl").write_text('{"record": {"test": "a"}}\n')
    with pytest.raises(ValueError, match="no header"):
        runlog.read(tmp_path / "headless.jsonl")


def a_record(test: str) -> dict:
    return {"suite": "params", "test": test, "status": "ok", "metrics": {"n": 1}, "units": {"n": "things"}, "model": None, "quant": None,
            "lora": None, "workload": None, "error": None, "warnings": [], "samples": {}}


RUN = {"started": "2026-01-01T00:00:00Z", "finished": None, "status": "running", "argv": ["pytest"], "git": {}, "builds": []}


def test_the_store_appends_during_the_run_and_writes_the_document_at_its_end(tmp_path):
    store = ResultsStore(tmp_path, {"id": "r2", **RUN}, {"device": "cpu"}, publish=write_report)
    store.put(a_record("a"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r2.jsonl"]
    store.finish("passed", "t1")
    names = sorted(path.name for path in tmp_path.iterdir())
    assert "r2.jsonl" not in names and {"r2.json", "latest.json", "r2.md", "r2.csv"} <= set(names)
    assert load(tmp_path / "r2.json")["run"]["status"] == "passed"


def test_a_killed_run_is_reported_as_such_and_the_next_run_leaves_it_alone(pytester, suite):
    suite()
    results = pytester.path / "results"
    results.mkdir()
    killed = runlog.RunLog(results / "20260101-000000-dead00.jsonl")
    killed.append({"schema_version": 1, "run": {"id": "20260101-000000-dead00", **RUN}, "machine": {"device": "cpu"}}, [a_record("t[a]")])
    killed.close()
    before = (results / "20260101-000000-dead00.jsonl").read_bytes()
    result = pytester.runpytest("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=bf16")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["pytest-lora: run 20260101-000000-dead00 never finished (killed?): its records are in "
                                 "results/20260101-000000-dead00.jsonl; `pytest-lora report results/20260101-000000-dead00.jsonl` *"])
    assert (results / "20260101-000000-dead00.jsonl").read_bytes() == before
    assert unfinished_runs(results) == [results / "20260101-000000-dead00.jsonl"]
    report = subprocess.run([sys.executable, "-m", "pytest_lora.cli", "report", str(results / "20260101-000000-dead00.jsonl")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "not finished" in (results / "20260101-000000-dead00.md").read_text()


def test_stale_temporary_files_of_ours_are_removed_and_nothing_else(tmp_path):
    old = time.time() - 3600
    ours = [tmp_path / ".latest.json.a1b2c3d4.tmp", tmp_path / ".r1.md.zz_99xyz.tmp", tmp_path / ".pytest-lora-probe.k9k9k9k9"]
    fresh = tmp_path / ".latest.json.q1w2e3r4.tmp"  # another run's write in progress
    others = [tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / ".x.tmp"]
    for path in [*ours, fresh, *others]:
        path.write_text("partial")
    for path in [*ours, *others]:
        os.utime(path, (old, old))
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(ours)
    assert fresh.exists() and all(path.exists() for path in others)


def test_a_record_costs_the_same_bytes_at_the_end_of_a_run_as_at_its_start(tmp_path, monkeypatch):
    """What the log writes per record does not grow with the run (the document rewritten after
    each record wrote 209 MB for a 600-record run); the time is measured by ``make store-bench``."""
    written = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda handle, data: written.append(len(data)) or real(handle, data))
    store = ResultsStore(tmp_path, {"id": "r3", **RUN}, {"device": "cpu"})
    for index in range(1000):
        store.put(a_record(f"t[{index:04d}]"))
    assert len(written) == 1000 and len(set(written[1:])) == 1  # the first carries the header
    assert written[0] > written[1]


def test_the_gate_history_and_compare_read_a_killed_runs_log(tmp_path):
    """A directory of runs with a killed one: the history leaves the log out and says why; the
    log itself reads as a baseline file."""
    from pytest_lora.results import baseline

    passed = ResultsStore(tmp_path, {"id": "20260101-000000-aaaaaa", **RUN}, {"device": "cpu"})
    passed.put(a_record("t[a]"))
    passed.write()
    passed.run["status"] = "passed"
    passed.write()
    killed = ResultsStore(tmp_path, {"id": "20260102-000000-bbbbbb", **RUN}, {"device": "cpu"})
    killed.put(a_record("t[a]"))  # never finished: its log is all there is
    history = baseline.load(tmp_path, "--lora-compare", 5)
    assert [run["run"]["id"] for run in history.runs] == ["20260101-000000-aaaaaa"]
    assert history.left_out == ["20260102-000000-bbbbbb.jsonl (running)"]
    alone = baseline.load(tmp_path / "20260102-000000-bbbbbb.jsonl", "--lora-compare")
    assert alone.runs[0]["records"] == [a_record("t[a]")]
