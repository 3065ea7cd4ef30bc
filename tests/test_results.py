"""The results store: files, schema, provenance, statuses, atomic writes, interrupted runs."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import TINY
from pytest_lora.results.store import SCHEMA_VERSION, atomic_write_json, load

RUN_KEYS = {"id", "started", "finished", "argv", "git", "status", "builds", "tests"}
MACHINE_KEYS = {"device", "gpu_name", "driver", "cuda", "torch", "transformers", "peft", "bitsandbytes", "python", "cpu",
                "cpu_count", "cpu_threads", "load_avg_start"}
RECORD_KEYS = {"suite", "test", "model", "quant", "lora", "workload", "status", "metrics", "units", "error", "warnings", "samples"}


def read_results(pytester: pytest.Pytester) -> tuple[dict, dict]:
    directory = pytester.path / "results"
    latest = load(directory / "latest.json")
    by_id = load(directory / f"{latest['run']['id']}.json")
    return latest, by_id


def test_bench_writes_run_file_and_latest_with_the_contract_schema(pytester, suite):
    suite()
    result = pytester.runpytest("--lora-bench", *TINY)
    result.assert_outcomes(passed=1)
    latest, by_id = read_results(pytester)
    assert latest == by_id
    assert latest["schema_version"] == SCHEMA_VERSION
    assert set(latest["run"]) == RUN_KEYS and set(latest["machine"]) == MACHINE_KEYS
    assert latest["run"]["status"] == "passed" and latest["run"]["finished"] >= latest["run"]["started"]
    assert latest["run"]["argv"][:2] == ["pytest", "--lora-bench"]
    assert latest["machine"]["device"] == "cpu" and latest["machine"]["torch"]
    (record,) = latest["records"]
    assert set(record) == RECORD_KEYS
    assert record["model"] == "llama-3.2-1b-tiny" and record["quant"] == "none" and record["status"] == "ok"
    assert record["lora"] == {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"], "dropout": 0.05, "variant": "lora", "bias": "none", "modules_to_save": []}
    # llama-3.2-1b-tiny: two layers, q_proj 64 -> 64 and v_proj 64 -> 16 (one of four heads for keys/values)
    assert record["metrics"]["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 16))
    assert record["units"] == {"trainable_params": "params", "total_params": "params"}
    result.stdout.fnmatch_lines(["*pytest-lora results*", "*pytest-lora params: test_count*", "*llama-3.2-1b-tiny*none*r8 a16 q_proj,v_proj*ok*", "pytest-lora: 1 records (1 ok) in results/*.json (and latest.json)", "pytest-lora: report results/*.md (+ CSV, plots); every table: -v"])


def test_the_run_publishes_its_tables_as_markdown(pytester, suite):
    suite()
    pytester.runpytest("--lora-bench", *TINY).assert_outcomes(passed=1)
    latest, _ = read_results(pytester)
    markdown = (pytester.path / "results" / "latest.md").read_text()
    assert markdown == (pytester.path / "results" / f"{latest['run']['id']}.md").read_text()
    assert "### params: test_count" in markdown
    assert "| model | quant | lora | status | trainable_params [params] | total_params [params] |" in markdown
    trainable = latest["records"][0]["metrics"]["trainable_params"]
    assert f"| llama-3.2-1b-tiny | none | r8 a16 q_proj,v_proj | ok | {trainable:,d} |" in markdown


def test_results_directory_option(pytester, suite):
    suite()
    pytester.runpytest("--lora-bench", "--lora-results=elsewhere/out", *TINY).assert_outcomes(passed=1)
    assert (pytester.path / "elsewhere" / "out" / "latest.json").is_file()
    assert not (pytester.path / "results").exists()


def git(path, *args):
    subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)


def test_provenance_records_the_git_commit_and_dirty_flag(pytester, suite):
    suite()
    (pytester.path / ".gitignore").write_text("results/\n")
    git(pytester.path, "init", "-q")
    git(pytester.path, "add", "-A")
    git(pytester.path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "suite")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pytester.path, capture_output=True, text=True).stdout.strip()
    pytester.runpytest("--lora-bench", *TINY)
    assert read_results(pytester)[0]["run"]["git"] == {"commit": head, "dirty": False}
    (pytester.path / "suites" / "test_suite.py").write_text((pytester.path / "suites" / "test_suite.py").read_text() + "\n# edited\n")
    pytester.runpytest("--lora-bench", *TINY)
    assert read_results(pytester)[0]["run"]["git"] == {"commit": head, "dirty": True}


STATUS_SUITE = """
import pytest
import torch

pytestmark = pytest.mark.lora_params


def test_fails_after_measuring(lora_bench):
    lora_bench.record("kept", 1, "params")
    assert False, "the config is broken"


def test_runs_out_of_memory(lora_bench):
    lora_bench.record("peak_allocated_bytes", 123, "bytes")
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_skips(lora_bench):
    pytest.skip("needs a GPU")


def test_passes(lora_bench):
    lora_bench.record("after", 2, "params")


def test_checks_after_measuring_everything(lora_bench):
    assert lora_bench.check(1 + 1 == 2, "arithmetic")
    assert not lora_bench.check(False, "the first layer is wrong")
    lora_bench.record("recorded_after_a_failed_check", 3, "params")
    lora_bench.check(False, "the second layer is wrong")
"""


def test_each_record_carries_the_test_outcome_and_the_run_goes_on(pytester, suite):
    suite(STATUS_SUITE)
    result = pytester.runpytest("--lora-bench", "-rs")
    result.assert_outcomes(passed=1, failed=2, skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED*out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"])
    records = {r["test"].rsplit("::", 1)[1]: r for r in read_results(pytester)[0]["records"]}
    assert records["test_fails_after_measuring"]["status"] == "error"
    assert records["test_fails_after_measuring"]["error"].startswith("AssertionError: the config is broken")
    assert records["test_fails_after_measuring"]["metrics"] == {"kept": 1}
    assert records["test_runs_out_of_memory"]["status"] == "oom"
    assert records["test_runs_out_of_memory"]["metrics"] == {"peak_allocated_bytes": 123}
    assert records["test_skips"]["status"] == "skipped" and "needs a GPU" in records["test_skips"]["error"]
    assert records["test_passes"]["status"] == "ok"
    checked = records["test_checks_after_measuring_everything"]  # a failed check keeps what was recorded after it
    assert checked["status"] == "error" and checked["metrics"] == {"recorded_after_a_failed_check": 3}
    assert checked["error"] == "AssertionError: the first layer is wrong; the second layer is wrong"
    assert read_results(pytester)[0]["run"]["status"] == "failed"


INTERRUPTED_SUITE = """
import pytest

pytestmark = pytest.mark.lora_params


def test_first(lora_bench):
    lora_bench.record("first", 1, "params")


def test_second(lora_bench):
    raise KeyboardInterrupt


def test_third(lora_bench):
    lora_bench.record("third", 3, "params")
"""


def test_an_interrupted_run_leaves_valid_json_with_the_records_so_far(pytester, suite):
    suite(INTERRUPTED_SUITE)
    run = pytester.inline_run("--lora-bench", no_reraise_ctrlc=True)
    assert run.ret == pytest.ExitCode.INTERRUPTED
    latest, _ = read_results(pytester)
    assert [r["metrics"] for r in latest["records"]] == [{"first": 1}]
    assert latest["run"]["status"] == "interrupted"


def test_bad_metric_values_are_refused(pytester, suite):
    suite(
        """
        import math
        import pytest

        pytestmark = pytest.mark.lora_params

        @pytest.mark.parametrize("value, unit", [(math.nan, "s"), (True, "s"), ("12", "s"), (1.0, "")])
        def test_bad(lora_bench, value, unit):
            with pytest.raises(ValueError):
                lora_bench.record("metric", value, unit)
        """
    )
    pytester.runpytest("--lora-bench").assert_outcomes(passed=4)


def test_atomic_write_keeps_the_old_document_when_a_write_fails(tmp_path):
    path = tmp_path / "latest.json"
    atomic_write_json(path, {"records": [1]})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"records": [1, object()]})  # fails half-way through serialising
    assert json.loads(path.read_text()) == {"records": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["latest.json"], "no temporary file is left behind"


def test_plain_runs_write_nothing(pytester):
    pytester.makepyfile(test_plain="def test_plain(model_spec):\n    pass\n")
    pytester.runpytest(*TINY).assert_outcomes(passed=1)
    assert not (pytester.path / "results").exists()
