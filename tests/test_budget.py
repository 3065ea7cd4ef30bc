"""A memory budget as a test (``lora_limit_memory``, ``--lora-limit-memory``), and a run's status
when pytest-benchmark's own gate fails it."""

from __future__ import annotations

import json

import peft
import pytest

from fakes import FakeGpuPlugin
from pytest_lora.specs import QUANTIZATIONS, WorkloadSpec
from pytest_lora.measure import memory
from pytest_lora.models import registry

GiB = 2**30
ONE = ("--lora-models=llama-3.2-1b-tiny", "--lora-quant=nf4", "--lora-ranks=8", "--lora-targets=q_proj,v_proj", "--lora-optimizers=adamw")

BUDGET_SUITE = """
import pytest

pytestmark = pytest.mark.lora_params


@pytest.mark.lora_limit_memory({budget!r})
def test_fits(lora_model, lora_bench):
    lora_bench.record("trainable_params", lora_model.get_nb_trainable_parameters()[0], "params")
"""


def analytic_total() -> int:
    """The analytic step of ONE's config with the matrix's workload (2 x 64 tokens), as the CPU runs
    it (its dropout keeps fp32 noise), worked out here."""
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    estimate = memory.analytic_step(registry.load_config_dict("llama-3.2-1b-tiny"), QUANTIZATIONS["nf4"], lora, WorkloadSpec(seq_len=64, batch=2),
                                    device="cpu")
    return estimate.total


@pytest.mark.parametrize("margin,fits", [(0, True), (-1, False)], ids=["at the budget", "one byte over"])
def test_on_the_cpu_the_marker_checks_the_analytic_step(pytester, suite, margin, fits):
    total = analytic_total()
    suite(BUDGET_SUITE.format(budget=f"{total + margin}B"))
    pytester.makefile(".toml", pinned='variants = ["lora"]\ndropout = [0.05]\nseq_len = [64]\nbatch = [2]\n')
    result = pytester.runpytest("--lora-bench", *ONE)
    record = json.loads((pytester.path / "results" / "latest.json").read_text())["records"][0]
    assert record["budget"] == {"limit_bytes": total + margin, "checked": record["budget"]["checked"], "bytes": total, "within": fits}
    assert record["budget"]["checked"].startswith("analytic step model (no GPU here")
    if fits:
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*memory budget: 1 configs checked against the analytic step model (no GPU here*; 0 over*"])
    else:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([f"*memory budget * exceeded: analytic step model (no GPU here*({total:,d} B > {total - 1:,d} B)*"])
        assert record["status"] == "error" and "memory budget" in record["error"]


def test_the_option_applies_to_every_config_that_measures_a_step(pytester):
    result = pytester.runpytest("--lora-bench", *ONE, "-k", "(test_step_memory and not with_an) or test_trainable_parameters", "--lora-limit-memory=1KiB")
    result.assert_outcomes(passed=1, failed=1)  # the count measures no step: no budget to hold it to
    result.stdout.fnmatch_lines(["*_ test_step_memory*", "memory budget 0.00 GiB exceeded: analytic step model*(1,149,792 B > 1,024 B)"])


GPU_SUITE = """
import pytest

pytestmark = pytest.mark.lora_memory


@pytest.mark.lora_limit_memory("1 GiB")
@pytest.mark.parametrize("size", [{small}, {large}], ids=["512MiB", "2GiB"])
def test_peak(lora_gpu, lora_bench, size):
    lora_gpu.runtime.allocate(size)  # the fake device: reserved memory grows in 2 MiB blocks
    lora_gpu.runtime.release(size)
    lora_bench.record("allocated_then_freed_bytes", size, "bytes")
"""


def test_on_a_gpu_the_marker_checks_the_peak_reserved_over_the_call(pytester, suite):
    suite(GPU_SUITE.format(small=512 * 2**20, large=2 * GiB))
    result = pytester.runpytest("--lora-bench", plugins=[FakeGpuPlugin()])
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*_ test_peak?2GiB? _*", "memory budget 1.00 GiB exceeded: peak reserved bytes 2.00 GiB (2,147,483,648 B > 1,073,741,824 B)"])
    records = {r["test"].split("[")[1]: r for r in json.loads((pytester.path / "results" / "latest.json").read_text())["records"]}
    assert records["512MiB]"]["budget"] == {"limit_bytes": GiB, "checked": "peak reserved bytes", "bytes": 512 * 2**20, "within": True}
    assert records["2GiB]"]["budget"]["bytes"] == 2 * GiB


@pytest.mark.parametrize("marker,message", [
    ('"lots"', "lora_limit_memory marker of *: 'lots' is not a size; allowed: e.g. 24GiB, 80GB, 512MiB"),
    ("", "lora_limit_memory marker of *: takes one size, got (); allowed: e.g. lora_limit_memory('24 GiB')"),
    ('"0 GiB"', "'0 GiB' is not a positive size"),
])
def test_a_bad_budget_is_a_usage_error(pytester, suite, marker, message):
    suite(f"import pytest\n\n@pytest.mark.lora_limit_memory({marker})\ndef test_x(lora_bench):\n    pass\n")
    result = pytester.runpytest("--lora-bench")
    assert result.ret == 4
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_a_bad_budget_option_is_a_usage_error(pytester):
    result = pytester.runpytest("--lora-limit-memory=big")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--lora-limit-memory: 'big' is not a size; allowed: e.g. 24GiB*"])


def test_a_marker_on_a_test_with_nothing_to_check_fails_and_says_why(pytester, suite):
    suite("import pytest\n\n@pytest.mark.lora_limit_memory('1 GiB')\ndef test_x(lora_bench):\n    lora_bench.record('x', 1, 'things')\n")
    result = pytester.runpytest("--lora-bench")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*lora_limit_memory: *test_x has no peak to check*"])


BENCHMARK_SUITE = """
import os
import time

import pytest

pytestmark = pytest.mark.lora_step_time


def test_sleep(benchmark, lora_bench):
    benchmark.pedantic(time.sleep, args=(float(os.environ["SLEEP"]),), rounds=3, iterations=1)
    lora_bench.record("slept_s", float(os.environ["SLEEP"]), "s")
"""


def test_a_run_that_pytest_benchmarks_compare_fail_fails_is_recorded_as_failed(pytester, suite, monkeypatch):
    suite(BENCHMARK_SUITE)
    monkeypatch.setenv("SLEEP", "0.001")
    pytester.runpytest("--lora-bench", "--benchmark-save=base").assert_outcomes(passed=1)
    monkeypatch.setenv("SLEEP", "0.02")
    result = pytester.runpytest("--lora-bench", "--benchmark-compare=0001", "--benchmark-compare-fail=median:5%")
    assert result.ret == 1
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*pytest-benchmark: performance has regressed (--benchmark-compare-fail); the run failed*"])
    run = json.loads((pytester.path / "results" / "latest.json").read_text())["run"]
    assert run["status"] == "failed" and run["failed_by"] == ["pytest-benchmark --benchmark-compare-fail: performance has regressed"]
