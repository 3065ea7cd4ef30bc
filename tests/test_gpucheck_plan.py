"""``make gpu-check``'s plan on a lent GPU's clock: its estimated wall time on one H200 stays within
the 6 minutes that leave room for a cold start and a rerun in 15; its verdict is on disk after
every run, so that a run killed at the limit leaves what it finished; a time budget starts no run
that would not fit. The runs are driven on the fake GPU of ``tests/fakes.py``: no figure here is a
GPU measurement."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import clean_environment
from pytest_lora import gpucheck

ROOT = Path(__file__).parents[1]
TINY_RUN = {"name": "tiny-1b", "models": ["llama-3.2-1b-tiny"], "quant": ["bf16"], "batch": [2], "grad_ckpt": [False], "seq_len": [64],
            "optimizers": ["adamw"]}


def test_the_estimate_fits_the_target_and_says_where_each_figure_comes_from():
    parts = gpucheck.estimate()
    assert sum(p.seconds for p in parts) <= gpucheck.TARGET_S == 360
    assert {p.run for p in parts} == {run["name"] for run in gpucheck.RUNS}
    for part in parts:
        assert part.seconds > 0 and all(source.startswith(("ref", "assumed")) for source in part.source.split("; ")), part
    first, second = gpucheck.RUNS
    assert gpucheck.run_seconds(first, first=True) + gpucheck.run_seconds(second) == pytest.approx(sum(p.seconds for p in parts))


def test_the_estimate_grows_with_the_plan_and_refuses_what_it_cannot_estimate():
    base = sum(p.seconds for p in gpucheck.estimate())
    more = ({**gpucheck.RUNS[0], "optimizers": ["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw"]}, gpucheck.RUNS[1])
    assert sum(p.seconds for p in gpucheck.estimate(more)) > base
    with pytest.raises(KeyError, match="forgetting"):
        gpucheck.estimate(({**gpucheck.RUNS[0], "suites": ["forgetting"]},))
    with pytest.raises(KeyError, match="names no suites"):
        gpucheck.estimate((TINY_RUN,))
    with pytest.raises(KeyError, match="no H200 step figure"):
        gpucheck.estimate(({**gpucheck.RUNS[0], "models": ["gpt2-medium"]},))


def test_the_readme_has_the_estimate_as_the_code_computes_it():
    assert gpucheck.estimate_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_estimate_counts_the_serving_suites_adapters():
    from suites import test_serving

    assert gpucheck.MIXED_ADAPTERS == test_serving.ADAPTER_COUNTS


def test_each_run_selects_its_suites_and_the_references_steps(tmp_path):
    args = gpucheck.pytest_args(gpucheck.RUNS[1], tmp_path)
    assert args[args.index("-m") + 1] == "lora_memory or lora_step_time"
    assert args[args.index("-k") + 1] == "not published and not trained_model"
    assert {"--lora-warmup=2", "--lora-rounds=6"} <= set(args)
    assert "suites" not in (tmp_path / "matrix.toml").read_text() and "name" not in (tmp_path / "matrix.toml").read_text()


def test_a_budget_starts_no_run_its_estimate_would_not_fit(tmp_path):
    now = [0.0]
    started = []

    def invoke(run, where):
        started.append(run["name"])
        now[0] += 100.0
        return 0

    runs = (TINY_RUN, {**TINY_RUN, "name": "second"}, {**TINY_RUN, "name": "third"})
    checks = gpucheck.run_all(tmp_path, runs=runs, budget_s=150, invoke=invoke, clock=lambda: now[0], estimates=[90, 60, 10])
    assert started == ["tiny-1b"]  # 50 s left: the second's 60 s do not fit, and nothing starts after it
    document = json.loads((tmp_path / "verdict.json").read_text())
    assert [r["status"] for r in document["runs"]] == ["finished", "skipped", "skipped"] and not document["complete"]
    text = (tmp_path / "verdict.txt").read_text()
    assert "not started: 50 s of the 150 s budget left when second was next, its estimate 60 s" in text
    assert [c.ok for c in checks if c.name == "run finished"] == [True, False, False]


KILLED = """
    import sys, time
    from pathlib import Path

    import pytest

    sys.path.insert(0, {tests!r})
    from fakes import FakeGpuPlugin
    from pytest_lora import gpucheck

    def invoke(run, where):
        if run["name"] == "second":
            time.sleep(600)  # killed here
        args = gpucheck.pytest_args(run, where, suites="suites") + ["--lora-rounds=3", "--lora-warmup=1", "-k", "test_base_build_time"]
        return pytest.main(args, plugins=[FakeGpuPlugin()])

    first = {run!r}
    gpucheck.run_all(Path("results"), runs=(first, {{**first, "name": "second"}}), invoke=invoke, estimates=[1.0, 1.0])
"""


@pytest.mark.slow
def test_a_gpu_check_killed_in_its_second_run_leaves_the_first_runs_verdict(pytester):
    """SIGKILL (a lent machine's time limit) while the second run goes: the verdict on disk has
    the first run's checks, measured on the fake GPU, and says the second started and did not finish."""
    (pytester.path / "suites").mkdir()
    (pytester.path / "suites" / "test_step_time.py").write_text((ROOT / "suites" / "test_step_time.py").read_text())
    (pytester.path / "check.py").write_text(textwrap.dedent(KILLED.format(tests=str(ROOT / "tests"), run=TINY_RUN)))
    process = subprocess.Popen([sys.executable, "check.py"], cwd=pytester.path, env=clean_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    verdict, deadline = pytester.path / "results" / "verdict.json", time.monotonic() + 300
    while not (verdict.exists() and json.loads(verdict.read_text())["runs"][1]["status"] == "running"):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:] if process.poll() is not None else "too slow"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    document = json.loads(verdict.read_text())
    assert [r["status"] for r in document["runs"]] == ["finished", "running"] and not document["complete"]
    checks = {(c["name"], c["subject"]): c for c in document["checks"]}
    assert checks["run finished", "tiny-1b"]["ok"] is True and checks["run finished", "second"]["ok"] is False
    assert checks["base ready", "llama-3.2-1b-tiny bf16"]["ok"] is True
    text = (pytester.path / "results" / "verdict.txt").read_text()
    assert "started, not finished: its records so far are in results/second/*.jsonl" in text and "base ready" in text
    assert text.splitlines()[-1] == f"gpu-check: {document['passed']} passed, {document['failed']} failed"
