"""The gate's pieces without pytest runs: the Mann-Whitney test, rule parsing, default rules, and
the verdicts of ``gate.compare`` on hand-written records."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_lora.results import baseline as baseline_module
from pytest_lora.gate import rules, stats
from pytest_lora.gate.compare import compare

# ------------------------------------------------------------------ Mann-Whitney


@pytest.mark.parametrize("n,m", [(5, 5), (10, 10), (3, 7), (1, 1)])
def test_complete_separation_has_the_smallest_exact_p_value(n, m):
    """Every new value above every base value: one ordering of C(n + m, n) gives it."""
    base = [float(i) for i in range(m)]
    new = [float(m + i) for i in range(n)]
    assert stats.mann_whitney_greater(new, base) == pytest.approx(1 / math.comb(n + m, n))
    assert stats.mann_whitney_greater(base, new) == pytest.approx(1.0)


def _permutation_p(new, base):
    """P(U >= u) by enumerating every way to split the pooled values: the definition itself."""
    pooled = [*new, *base]
    observed = stats.u_statistic(new, base)
    hits = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(new)):
        picked = [pooled[i] for i in chosen]
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += stats.u_statistic(picked, rest) >= observed
        total += 1
    return hits / total


@given(st.lists(st.floats(0, 1), min_size=1, max_size=5, unique=True), st.lists(st.floats(2, 3), min_size=1, max_size=5, unique=True),
       st.floats(-2.5, 2.5))
def test_exact_p_value_is_the_permutation_p_value(new, base, shift):
    new = [value + shift for value in new]
    if len(set(new) | set(base)) < len(new) + len(base):
        return  # ties go to the normal approximation
    assert stats.mann_whitney_greater(new, base) == pytest.approx(_permutation_p(new, base))


def test_normal_approximation_is_close_to_the_exact_distribution():
    base = [0.010 + 0.0001 * i for i in range(15)]
    new = [0.0107 + 0.0001 * i for i in range(15)]
    exact = stats._exact_upper_tail(15, 15, int(stats.u_statistic(new, base)))
    approximate = stats._normal_upper_tail(new, base, stats.u_statistic(new, base))
    assert approximate == pytest.approx(exact, abs=0.01)


def test_ties_and_equal_samples():
    assert stats.mann_whitney_greater([1.0, 1.0], [1.0, 1.0]) == 1.0  # no evidence either way
    assert stats.mann_whitney_greater([2.0, 2.0, 3.0], [1.0, 2.0, 1.0]) < 0.2
    with pytest.raises(ValueError, match="at least one sample"):
        stats.mann_whitney_greater([], [1.0])


def test_median():
    assert stats.median([3, 1, 2]) == 2
    assert stats.median([4, 1, 2, 3]) == 2.5


# ------------------------------------------------------------------ rules


@pytest.mark.parametrize("text,expected", [
    ("trainable_params:==", dict(metric="trainable_params", exact=True)),
    ("step_time:10%", dict(metric="step_time_median_s", relative=0.10, direction=+1)),
    ("tokens_per_s:10%", dict(metric="tokens_per_s", relative=0.10, direction=-1)),
    ("peak_memory:+5%&+256MiB", dict(metric="peak_reserved_bytes", relative=0.05, absolute=256 * 2**20, direction=+1)),
    ("step_time_median_s:min:-5%", dict(stat="min", relative=0.05, direction=-1)),
    ("merge_max_abs_err:<=1e-3", dict(bound=("<=", 1e-3))),
    ("mfu:>=0.3", dict(bound=(">=", 0.3))),
    ("my_metric:5%", dict(metric="my_metric", relative=0.05, direction=0)),
    ("forgetting_delta_loss:+0.1", dict(absolute=0.1, direction=+1)),
    ("weight_bytes:+1GB", dict(absolute=1e9)),
    ("mfu:off", dict(off=True)),
])
def test_rules_parse(text, expected):
    rule = rules.parse(text, "--lora-fail")
    for name, value in expected.items():
        assert getattr(rule, name) == value, name


@pytest.mark.parametrize("text,message", [
    ("step_time", "is not a rule; allowed: METRIC[:STAT]:THRESHOLD"),
    ("a:b:c:d", "is not a rule"),
    ("step_time:p90:5%", "'p90' is not a statistic; allowed: value, median, mean, min, max"),
    ("step_time:fast", "'fast' is not a threshold"),
    ("peak_memory:+5XB", "'XB' is not a size unit; allowed: B, KiB"),
    ("peak_memory:+5%&-1MiB", "different signs"),
    ("2x:5%", "is not a metric name"),
    ("step_time:-inf%", "must be a finite number >= 0"),
])
def test_malformed_rules_say_what_is_allowed(text, message):
    with pytest.raises(rules.RuleError, match=f"^--lora-fail: .*{__import__('re').escape(message)}"):
        rules.parse(text, "--lora-fail")


@pytest.mark.parametrize("metric,unit,device,text", [
    ("trainable_params", "params", "cuda", "=="),
    ("weight_bytes", "bytes", "cuda", "=="),
    ("peak_reserved_bytes", "bytes", "cuda", "+1%&+1KiB"),
    ("step_time_median_s", "s", "cuda", "10%"),
    ("step_time_median_s", "s", "cpu", "100%"),
    ("tokens_per_s", "tokens/s", "cuda", "10%"),
    ("merge_max_abs_err_requantize", "logit", "cpu", "+100%&+1e-6"),
    ("merge_kl", "nats", "cpu", "+100%&+1e-9"),
    ("forgetting_delta_loss", "nats", "cpu", "+0.05"),
    ("learning_delta_loss", "nats", "cpu", "-0.05"),
])
def test_default_rules_per_kind(metric, unit, device, text):
    assert rules.default_rule(metric, unit, device).text == text


@pytest.mark.parametrize("metric,unit", [("step_time_iqr_s", "s"), ("cpu_pressure", "share"), ("activation_ratio", "measured/analytic")])
def test_spreads_and_ratios_are_shown_not_gated(metric, unit):
    assert rules.default_rule(metric, unit) is None


def test_sizes():
    assert rules.size_in_bytes("24 GiB", "x") == 24 * 2**30
    assert rules.size_in_bytes("80GB", "x") == 80 * 10**9
    with pytest.raises(rules.RuleError, match="positive size"):
        rules.size_in_bytes("0", "x")


def test_a_later_layer_replaces_a_metrics_rules():
    file_rules = [rules.parse("step_time:5%", "file"), rules.parse("mfu:off", "file")]
    option_rules = [rules.parse("step_time:20%", "cli")]
    merged = rules.merged([file_rules, option_rules])
    assert [rule.relative for rule in merged["step_time_median_s"]] == [0.20]
    assert merged["mfu"][0].off


# ------------------------------------------------------------------ verdicts on hand-written records

MACHINE = {"device": "cuda", "gpu_name": "NVIDIA H200", "cpu": "x", "cpu_count": 16, "torch": "2.11"}


def record(test="suites/test_x.py::test_x[a]", status="ok", samples=None, **metrics):
    units = {name: UNITS.get(name, "x") for name in metrics}
    return {"suite": "x", "test": test, "model": "m", "quant": "nf4", "lora": {"r": 8}, "workload": None, "status": status,
            "metrics": metrics, "units": units, "error": None, "warnings": [], "samples": samples or {}}


UNITS = {"trainable_params": "params", "peak_reserved_bytes": "bytes", "step_time_median_s": "s", "tokens_per_s": "tokens/s",
         "merge_max_abs_err": "logit", "forgetting_delta_loss": "nats", "forgetting_delta_loss_std": "nats", "seeds": "runs"}


def run(*records, machine=MACHINE, status="passed", run_id="base"):
    return {"schema_version": 1, "run": {"id": run_id, "started": run_id, "status": status}, "machine": dict(machine), "records": list(records)}


def judged(base_records, new_records, user_rules=(), machine=MACHINE, base_machine=MACHINE, **kwargs):
    baseline = baseline_module.Baseline(None, [run(*base_records, machine=base_machine)])
    baseline.path = __import__("pathlib").Path("base.json")
    parsed = rules.merged([[rules.parse(text, "--lora-fail") for text in user_rules]])
    return compare(new_records, machine, baseline, parsed, **kwargs)


def steps(median, spread=0.02, n=10):
    return [median * (1 + spread * (i - n / 2) / n) for i in range(n)]


def timing(median, **extra):
    return record(step_time_median_s=median, samples={"step_time_median_s": steps(median)}, **extra)


def test_a_count_that_changes_by_one_regresses():
    comparison = judged([record(trainable_params=100)], [record(trainable_params=101)])
    assert [(c.metric, c.baseline, c.now) for c in comparison.regressions] == [("trainable_params", 100, 101)]
    assert not judged([record(trainable_params=100)], [record(trainable_params=100)]).regressions


@pytest.mark.parametrize("factor,regressed", [(1.10, True), (1.005, False), (0.5, False)])
def test_memory_past_one_percent_regresses(factor, regressed):
    comparison = judged([record(peak_reserved_bytes=10 * 2**30)], [record(peak_reserved_bytes=int(10 * 2**30 * factor))])
    assert bool(comparison.regressions) == regressed


def test_memory_from_zero_needs_the_absolute_floor():
    assert not judged([record(peak_reserved_bytes=0)], [record(peak_reserved_bytes=512)]).regressions
    assert judged([record(peak_reserved_bytes=0)], [record(peak_reserved_bytes=2**20)]).regressions


def test_a_slower_step_regresses_when_past_the_threshold_and_significant():
    comparison = judged([timing(0.100)], [timing(0.130)])
    [check] = [c for c in comparison.regressions]
    assert check.metric == "step_time_median_s" and check.p_value < 0.01


def test_a_faster_step_is_not_a_regression():
    assert not judged([timing(0.100)], [timing(0.070)]).regressions


def test_a_change_inside_the_threshold_does_not_fail_even_if_significant():
    comparison = judged([timing(0.100)], [timing(0.105)])
    [check] = comparison.checks
    assert check.p_value < 0.01 and not check.regressed


def test_a_change_past_the_threshold_without_significance_does_not_fail():
    """Overlapping samples: the medians differ by 20% but the steps don't tell the runs apart."""
    base = record(step_time_median_s=0.100, samples={"step_time_median_s": [0.05, 0.08, 0.1, 0.13, 0.2]})
    new = record(step_time_median_s=0.120, samples={"step_time_median_s": [0.04, 0.09, 0.12, 0.14, 0.19]})
    [check] = judged([base], [new]).checks
    assert check.p_value > 0.01 and not check.regressed


def test_a_timing_with_no_samples_and_no_history_is_not_judged():
    [check] = judged([record(step_time_median_s=0.1)], [record(step_time_median_s=0.5)]).checks
    assert check.regressed is None and "not judged" in check.note


def test_tokens_per_second_falling_regresses_rising_does_not():
    base = record(tokens_per_s=1000.0, samples={"tokens_per_s": steps(1000.0)})
    slower = record(tokens_per_s=800.0, samples={"tokens_per_s": steps(800.0)})
    faster = record(tokens_per_s=1300.0, samples={"tokens_per_s": steps(1300.0)})
    assert judged([base], [slower]).regressions
    assert not judged([base], [faster]).regressions


def test_timings_from_other_hardware_are_not_compared_unless_asked():
    other = {**MACHINE, "gpu_name": "NVIDIA A100-SXM4-80GB"}
    comparison = judged([timing(0.1, trainable_params=5)], [timing(0.2, trainable_params=5)], base_machine=other)
    assert comparison.timings_refused and not comparison.regressions
    assert "gpu_name: NVIDIA A100-SXM4-80GB -> NVIDIA H200" in comparison.machine_differences
    assert judged([timing(0.1)], [timing(0.2)], base_machine=other, cross_hardware=True).regressions


def test_configs_on_one_side_are_listed():
    comparison = judged([record(test="t::a", trainable_params=1), record(test="t::b", trainable_params=1)],
                        [record(test="t::a", trainable_params=1), record(test="t::c", trainable_params=1)])
    assert comparison.only_baseline == ["b"] and comparison.only_now == ["c"]


def test_running_out_of_memory_where_the_baseline_ran_is_a_regression():
    comparison = judged([record(peak_reserved_bytes=1)], [record(status="oom")])
    assert [(c.metric, c.baseline, c.now) for c in comparison.regressions] == [("status", "ok", "oom")]


def test_forgetting_must_pass_its_seed_spread():
    base = record(forgetting_delta_loss=0.30, forgetting_delta_loss_std=0.01, seeds=3)
    worse = record(forgetting_delta_loss=0.40, forgetting_delta_loss_std=0.01, seeds=3)
    noisy = record(forgetting_delta_loss=0.40, forgetting_delta_loss_std=0.2, seeds=3)
    assert judged([base], [worse]).regressions
    assert not judged([base], [noisy]).regressions  # 0.1 nats is within 2 standard errors of 0.2-spread seeds


def test_a_merge_error_ten_times_larger_regresses():
    assert judged([record(merge_max_abs_err=2.4e-7)], [record(merge_max_abs_err=2.4e-6)]).regressions
    assert not judged([record(merge_max_abs_err=2.4e-7)], [record(merge_max_abs_err=4.0e-7)]).regressions


def test_a_bound_needs_no_baseline():
    baseline = baseline_module.Baseline(None, [])
    parsed = rules.merged([[rules.parse("merge_max_abs_err:<=1e-3", "cli")]])
    comparison = compare([record(merge_max_abs_err=0.01)], MACHINE, baseline, parsed)
    assert [c.metric for c in comparison.regressions] == ["merge_max_abs_err"]


def test_user_rules_replace_the_default_and_unknown_metrics_are_reported():
    comparison = judged([record(trainable_params=100)], [record(trainable_params=101)], ["trainable_params:+5%", "stepp_time:5%"])
    assert not comparison.regressions
    assert comparison.unused_rules == ["stepp_time:5%"]


def test_a_confirming_rerun_clears_or_keeps_a_timing_regression():
    slow = timing(0.2)
    cleared = {**slow, "confirmation": {"status": "ok", "metrics": {"step_time_median_s": 0.1}, "samples": {"step_time_median_s": steps(0.1)}}}
    held = {**slow, "confirmation": {"status": "ok", "metrics": {"step_time_median_s": 0.2}, "samples": {"step_time_median_s": steps(0.2)}}}
    failed = {**slow, "confirmation": {"status": "error", "metrics": {}, "samples": {}, "error": "RuntimeError: x"}}
    assert not judged([timing(0.1)], [cleared]).regressions
    assert judged([timing(0.1)], [cleared]).cleared
    assert judged([timing(0.1)], [held]).regressions[0].rerun == pytest.approx(0.2)
    assert "rerun error" in judged([timing(0.1)], [failed]).regressions[0].note


def test_a_history_needs_the_new_value_outside_its_spread():
    history = baseline_module.Baseline(None, [run(timing(m), run_id=f"r{i}") for i, m in enumerate([0.10, 0.14, 0.10, 0.09])])
    within = compare([timing(0.125)], MACHINE, history, {})
    beyond = compare([timing(0.16)], MACHINE, history, {})
    assert not within.regressions and "history of 4 runs" in within.checks[0].note
    assert beyond.regressions


BUSY = ["machine busy while timing: a task waited for a CPU 60% of the time; its times are not comparable"]


@pytest.mark.parametrize("form", ["busy field", "warning only"])
def test_a_timing_measured_on_a_busy_machine_counts_only_if_a_quiet_rerun_repeats_it(form):
    """As records are written now (``busy`` beside the warning) and were before (the warning only);
    the rerun goes through ``confirm.confirmation_of`` as the plugin hands it over."""
    from pytest_lora.gate.confirm import confirmation_of

    def measured(value: float, busy: bool) -> dict:
        record = timing(value)
        return {**record, "warnings": BUSY, **({"busy": True} if form == "busy field" else {})} if busy else record

    busy = measured(0.2, True)
    comparison = judged([timing(0.1)], [busy])
    assert not comparison.regressions and [c.config for c in comparison.busy] == ["test_x[a]"]
    quiet_again = {**busy, "confirmation": confirmation_of(measured(0.2, False))}
    busy_again = {**busy, "confirmation": confirmation_of(measured(0.2, True))}
    assert judged([timing(0.1)], [quiet_again]).regressions
    assert not judged([timing(0.1)], [busy_again]).regressions and judged([timing(0.1)], [busy_again]).busy


def test_a_baseline_timed_on_a_busy_machine_is_not_a_baseline_for_timings():
    comparison = judged([{**timing(0.1), "warnings": BUSY}], [timing(0.3)])
    [check] = comparison.checks
    assert check.regressed is None and check.note == "not judged: the baseline was timed on a busy machine"


def test_a_new_kind_of_metric_is_one_object_in_the_kinds(monkeypatch):
    """ARCHITECTURE.md's recipe: a perplexity kind, added as one ``MetricKind``, gives its metrics
    its default rule, is judged by its evidence, and is exported; the other kinds are untouched."""
    from pytest_lora.gate import kinds

    perplexity = kinds.MetricKind("perplexity", lambda metric, unit: unit == "ppl", lambda metric, device: "+2%", export=True)
    monkeypatch.setattr(kinds, "KINDS", (perplexity, *kinds.KINDS))
    assert rules.kind_of("heldout_ppl", "ppl") == "perplexity" and rules.default_rule("heldout_ppl", "ppl").text == "+2%"
    assert rules.kind_of("trainable_params", "params") == "exact"

    def run(ppl: float) -> dict:
        return {"run": {"id": "r"}, "machine": {"device": "cpu"}, "records": [{
            "suite": "quality", "test": "t::test_ppl[x]", "model": "m", "quant": "nf4", "lora": None, "workload": None,
            "status": "ok", "metrics": {"heldout_ppl": ppl}, "units": {"heldout_ppl": "ppl"}, "warnings": [], "samples": {}}]}

    baseline = baseline_module.Baseline(None, [run(10.0)])
    judged = {ppl: compare(run(ppl)["records"], {"device": "cpu"}, baseline, {}) for ppl in (10.1, 10.3)}
    assert [c.kind for c in judged[10.3].checks] == ["perplexity"]
    assert not judged[10.1].regressions and [c.metric for c in judged[10.3].regressions] == ["heldout_ppl"]
    from pytest_lora.cli import gab_entries

    assert [entry["name"].split()[-1] for entry in gab_entries({**run(10.3), "run": {"id": "r", "git": {}}})[+1]] == ["heldout_ppl"]
