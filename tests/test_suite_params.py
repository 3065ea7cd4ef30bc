"""The parameter suite itself, run through pytester: it passes on the real stack, fails when a
count is wrong (including peft's historical 4-bit miscount), and times what it says it times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SUITE = Path(__file__).parents[1] / "suites" / "test_params.py"
ARGS = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=none,nf4", "--lora-ranks=8", "--lora-targets=all-linear")


@pytest.fixture
def params_suite(suite):
    return suite(SUITE.read_text(), name="test_params_suite_copy.py")


def records(pytester):
    return json.loads((pytester.path / "results" / "latest.json").read_text())["records"]


def test_the_suite_passes_and_records_every_case(pytester, params_suite):
    pytester.runpytest(*ARGS).assert_outcomes(passed=2 + 6)
    by_test = {(r["model"], r["quant"]): r for r in records(pytester) if r["test"].split("::")[1].startswith("test_trainable")}
    assert set(by_test) == {("llama-3.2-1b-tiny", "none"), ("llama-3.2-1b-tiny", "nf4")}
    assert by_test[("llama-3.2-1b-tiny", "none")]["metrics"] == by_test[("llama-3.2-1b-tiny", "nf4")]["metrics"]


def test_the_suite_fails_when_a_count_is_off_by_one(pytester, params_suite):
    pytester.makeconftest(
        """
        import pytest
        from pytest_lora import ParamCount, count_parameters

        @pytest.fixture(autouse=True)
        def off_by_one(request, monkeypatch):
            def wrong(model, lora):
                right = count_parameters(model, lora)
                return ParamCount(right.trainable + 1, right.total)

            monkeypatch.setattr("pytest_lora.measure.params.count_parameters", wrong)
        """
    )
    pytester.runpytest(*ARGS).assert_outcomes(failed=2 + 6)


def test_the_suite_catches_a_count_that_forgets_four_bit_packing(pytester, params_suite):
    """peft #1020: counting ``numel`` of a ``Params4bit`` halves every 4-bit weight."""
    pytester.makeconftest(
        """
        import peft
        import pytest

        def numel_only(self):
            params = list(self.parameters())
            return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

        @pytest.fixture(autouse=True)
        def forget_packing(monkeypatch):
            monkeypatch.setattr(peft.PeftModel, "get_nb_trainable_parameters", numel_only)
        """
    )
    result = pytester.runpytest(*ARGS, "-k", "trainable")
    result.assert_outcomes(passed=1, failed=1, deselected=6)
    result.stdout.fnmatch_lines(["FAILED*test_trainable_parameters[[]llama-3.2-1b-tiny-nf4-*"])


def test_count_time_measures_the_count(pytester, params_suite):
    pytester.makeconftest(
        """
        import time
        import pytest
        from pytest_lora import count_parameters

        def slow(model, lora):
            time.sleep(0.3)
            return count_parameters(model, lora)

        @pytest.fixture(autouse=True)
        def slow_count(request, monkeypatch):
            monkeypatch.setattr("pytest_lora.measure.params.count_parameters", slow)
        """
    )
    pytester.runpytest(*ARGS, "-k", "published and flan").assert_outcomes(passed=1, deselected=7)
    (record,) = records(pytester)
    assert 0.3 <= record["metrics"]["count_time_s"] < 10
