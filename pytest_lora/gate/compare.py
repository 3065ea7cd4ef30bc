"""A run beside its baseline: every gated metric of every config, judged by its rule.

Pairing. Records are paired by (suite, test, model, quant, LoRA spec, workload); a config on one
side only is listed (``only_baseline``, ``only_now``), never dropped in silence. With a history
(a directory of runs), each config is compared with the records of the runs that have it.

The verdict of one rule on one config (``Check.regressed``):
- a bound (``<=``, ``>=``) on the new value, with or without a baseline;
- ``==``: any difference from the newest baseline value;
- a threshold: the change from the baseline (the median of the history's values) past the
  rule's relative and absolute thresholds, in the bad direction; and then, by kind of metric:
  - timings must also be significant: a one-sided Mann-Whitney U test of this run's per-step
    samples against the baseline's (pooled over the history) at ``ALPHA``; and, with a history
    of two or more runs, outside its spread (slower than its slowest run). A timing with neither
    samples nor a history is not judged: one number says nothing about noise. Timings measured
    on other hardware (another GPU or CPU model, device or CPU count) are not compared unless
    asked for (``cross_hardware``). A timing taken while the machine was busy (the record's
    busy warning: another process kept a task waiting for a CPU) is not a baseline, and its
    regression counts only when a rerun on a quiet machine repeats it;
  - forgetting and learning, recorded as a mean over seeds with ``<metric>_std``, must also
    exceed twice the standard error of the difference;
- a config that ran in the baseline and now runs out of memory or errors is a regression of its
  ``status``.

With a confirming rerun (``record["confirmation"]``), a regression counts only if the rerun
regresses too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import kinds
from . import rules as rules_module
from . import stats
from ..results.baseline import Baseline
from ..results.recorder import timed_while_busy
from ..results.identity import HARDWARE_FIELDS, config_key, config_name
from .rules import Rule
from .verdict import gate_lines

ALPHA = 0.01  # one-sided; 5 against 5 steps can reach 1/252, asv's 0.002 could never fail there
Z_SEEDS = 2.0  # standard errors of a mean-over-seeds difference that a change must pass
MACHINE_FIELDS = ("device", "gpu_name", "driver", "cuda", "torch", "transformers", "peft", "bitsandbytes", "python",
                  "cpu", "cpu_count", "cpu_threads")


@dataclass
class Check:
    """One rule on one metric of one config, and its verdict (``None``: not judged, see ``note``)."""

    config: str
    metric: str
    rule: Rule
    kind: str
    unit: str | None
    baseline: Any
    now: Any
    p_value: float | None = None
    regressed: bool | None = None
    note: str = ""
    confirmed: bool | None = None  # the confirming rerun's verdict, when there was one (None: none, or inconclusive)
    rerun: Any = None  # the confirming rerun's value
    busy: bool = False  # a timing measured while the machine was busy: not counted unless a rerun confirms it

    @property
    def change(self) -> float | None:
        if not _numbers(self.now, self.baseline):
            return None
        return self.now - self.baseline

    @property
    def relative(self) -> float | None:
        change = self.change
        if change is None or self.baseline == 0:
            return None
        return change / abs(self.baseline)

    @property
    def counts(self) -> bool:
        """A regression that fails the gate: it regressed, and a confirming rerun did too; one
        measured on a busy machine counts only when a rerun on a quiet one repeats it."""
        if not self.regressed or self.confirmed is False:
            return False
        return self.confirmed is True or not self.busy

    @property
    def unjudged_busy(self) -> bool:
        """A timing that regressed while the machine was busy and that no quiet rerun settled."""
        return bool(self.regressed) and self.busy and self.confirmed is None


@dataclass
class Comparison:
    """Every check of a run against its baseline, and what could not be paired."""

    baseline: Baseline
    checks: list[Check] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)
    only_now: list[str] = field(default_factory=list)
    machine_differences: list[str] = field(default_factory=list)
    timings_refused: bool = False
    unused_rules: list[str] = field(default_factory=list)
    baseline_records: dict[tuple, dict[str, Any]] = field(default_factory=dict)

    @property
    def regressions(self) -> list[Check]:
        return [check for check in self.checks if check.counts]

    @property
    def cleared(self) -> list[Check]:
        """Regressions that their confirming rerun did not repeat."""
        return [check for check in self.checks if check.regressed and check.confirmed is False]

    @property
    def busy(self) -> list[Check]:
        """Timing regressions measured on a busy machine, not counted."""
        return [check for check in self.checks if check.unjudged_busy]

    def baseline_of(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The newest baseline record of ``record``'s config (for the tables' change column)."""
        return self.baseline_records.get(config_key(record))

    def annotate(self, records: Iterable[dict[str, Any]]) -> None:
        """Keep each record's baseline values in the record (``baseline_metrics``): the report
        shows every number beside its baseline, from the results file alone."""
        for record in records:
            before = self.baseline_of(record)
            if before is not None:
                record["baseline_metrics"] = dict(before["metrics"])

    def summary(self) -> dict[str, Any]:
        """What the results file keeps of the gate's decision."""
        return {
            "baseline": None if self.baseline.path is None else str(self.baseline.path),
            "baseline_runs": [run["run"].get("id") for run in self.baseline.runs],
            "checks": len(self.checks),
            "regressions": [check_record(check) for check in self.regressions],
            "cleared_by_rerun": [check_record(check) for check in self.cleared],
            "not_counted_busy": [check_record(check) for check in self.busy],
            "only_baseline": self.only_baseline,
            "only_now": self.only_now,
            "machine_differences": self.machine_differences,
            "timings_compared": not self.timings_refused,
            "lines": [text for text, _ in gate_lines(self)],
        }


def check_record(check: Check) -> dict[str, Any]:
    return {"config": check.config, "metric": check.metric, "rule": check.rule.describe(), "rule_from": check.rule.where, "baseline": check.baseline,
            "now": check.now, "change": check.relative, "p_value": check.p_value, "rerun": check.rerun, "note": check.note}


def machine_differences(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    return [f"{name}: {before.get(name)} -> {now.get(name)}" for name in MACHINE_FIELDS if before.get(name) != now.get(name)]


def same_hardware(now: dict[str, Any], before: dict[str, Any]) -> bool:
    return all(now.get(name) == before.get(name) for name in HARDWARE_FIELDS)


def compare(records: Iterable[dict[str, Any]], machine: dict[str, Any], baseline: Baseline,
            rules: dict[str, list[Rule]], cross_hardware: bool = False, history: dict | None = None) -> Comparison:
    """Judge ``records`` (this run's, on ``machine``) against ``baseline`` with ``rules`` (by metric,
    the user's; metrics they don't name get ``rules.default_rule``). ``history``: the baseline's
    records by config (``history_by_config``), when the caller judges record by record."""
    records = list(records)
    comparison = Comparison(baseline)
    if baseline.runs:
        comparison.machine_differences = machine_differences(machine, baseline.machine)
        comparison.timings_refused = not cross_hardware and not same_hardware(machine, baseline.machine)
    history = history if history is not None else history_by_config(baseline, machine, cross_hardware)
    comparison.baseline_records = {key: entries[-1][0] for key, entries in history.items()}
    now_keys = set()
    for record in records:
        key = config_key(record)
        now_keys.add(key)
        past = history.get(key, [])
        if baseline.runs and not past:
            comparison.only_now.append(config_name(record))
        comparison.checks.extend(_checks(record, past, rules, comparison.timings_refused, machine.get("device")))
    comparison.only_baseline = [config_name(entries[-1][0]) for key, entries in history.items() if key not in now_keys]
    recorded = {metric for record in records for metric in record.get("metrics", {})}
    comparison.unused_rules = sorted(rule.describe() for metric, named in rules.items() if metric not in recorded for rule in named)
    return comparison


def history_by_config(baseline: Baseline, machine: dict[str, Any], cross_hardware: bool) -> dict[tuple, list[tuple[dict, bool]]]:
    """Each config's baseline records, oldest first, with whether their run had this hardware."""
    history: dict[tuple, list[tuple[dict, bool]]] = {}
    for run in baseline.runs:
        same = cross_hardware or same_hardware(machine, run["machine"])
        for record in run["records"]:
            history.setdefault(config_key(record), []).append((record, same))
    return history


def _checks(record: dict[str, Any], past: list[tuple[dict, bool]], rules: dict[str, list[Rule]], timings_refused: bool,
            device: str | None) -> list[Check]:
    name = config_name(record)
    usable = [(entry, same) for entry, same in past if entry.get("status") == "ok"]
    if record.get("status") in ("oom", "error") and usable:
        status_rule = Rule("status", text="ok", where="default")
        return [Check(name, "status", status_rule, "status", None, "ok", record["status"], regressed=True, note=record.get("error") or "")]
    if record.get("status") != "ok":
        return []
    found = []
    for metric, value in record.get("metrics", {}).items():
        unit = record.get("units", {}).get(metric)
        chosen = rules.get(metric) or [rules_module.default_rule(metric, unit, device)]
        for rule in chosen:
            if rule is None or rule.off or value is None:
                continue
            if rule.needs_baseline and not usable:
                continue
            check = judge(name, rule, unit, record, usable, timings_refused)
            if check is not None:
                found.append(check)
    return found


def judge(name: str, rule: Rule, unit: str | None, record: dict[str, Any], past: list[tuple[dict, bool]],
          timings_refused: bool) -> Check | None:
    """One rule on one metric of one config; with ``record["confirmation"]``, on the rerun too."""
    kind = rules_module.kind_of(rule.metric, unit)
    check = _verdict(name, rule, kind, unit, record, past, timings_refused)
    rerun = record.get("confirmation")
    if check is not None and check.regressed and rerun is not None:
        if rerun.get("status") != "ok":  # a rerun that failed clears nothing
            check.note = f"rerun {rerun.get('status')}: {rerun.get('error')}"
            return check
        again = _verdict(name, rule, kind, unit, {**record, **rerun}, past, timings_refused)
        check.rerun = again.now if again else None
        check.confirmed = None if again is not None and again.busy else bool(again and again.regressed)
    return check


def statistic(record: dict[str, Any], rule: Rule) -> float | None:
    """The rule's statistic of a record: its value, or a statistic of its raw samples."""
    samples = record.get("samples", {}).get(rule.metric)
    if rule.stat == "value" or not samples:
        return record.get("metrics", {}).get(rule.metric)
    return {"median": stats.median, "mean": lambda s: sum(s) / len(s), "min": min, "max": max}[rule.stat](samples)


def _verdict(name: str, rule: Rule, kind: str, unit: str | None, record: dict[str, Any], past: list[tuple[dict, bool]],
             timings_refused: bool) -> Check | None:
    now = statistic(record, rule)
    if now is None:
        return None
    if rule.bound is not None:
        sign, limit = rule.bound
        regressed = now > limit if sign == "<=" else now < limit
        return Check(name, rule.metric, rule, kind, unit, limit, now, regressed=regressed, note=f"bound {sign} {limit:g}")
    values = [value for value in (statistic(entry, rule) for entry, _ in past) if value is not None]
    if not values:
        return None
    if rule.exact:
        return Check(name, rule.metric, rule, kind, unit, values[-1], now, regressed=now != values[-1])
    check = Check(name, rule.metric, rule, kind, unit, stats.median(values), now)
    evidence = kinds.named(kind).evidence
    if evidence == "samples":  # its baseline is the median of the comparable, quiet runs only
        return _timing(check, rule, record, past, timings_refused)
    past_enough = _past_threshold(rule, check.baseline, now)
    if evidence == "seeds" and _has_seed_spread(record, rule.metric) and past and _has_seed_spread(past[-1][0], rule.metric):
        z = _seed_z(record, past[-1][0], rule.metric)
        check.note = f"{z:.1f} standard errors of the seeds"
        check.regressed = past_enough and z > Z_SEEDS
        return check
    check.regressed = past_enough
    return check


def _bad_change(rule: Rule, baseline: float, now: float) -> float:
    change = now - baseline
    return abs(change) if rule.direction == 0 else change * rule.direction


def _past_threshold(rule: Rule, baseline: float, now: float) -> bool:
    bad = _bad_change(rule, baseline, now)
    if bad <= 0:
        return False
    if rule.relative is not None and bad <= rule.relative * abs(baseline):
        return False
    return rule.absolute is None or bad > rule.absolute


def _timing(check: Check, rule: Rule, record: dict[str, Any], past: list[tuple[dict, bool]], refused: bool) -> Check:
    """A timing regresses only past its threshold, significantly, and outside the history's spread."""
    comparable = [entry for entry, same in past if same]
    if refused or not comparable:
        check.note = "not compared: measured on other hardware"
        return check
    quiet = [entry for entry in comparable if not timed_while_busy(entry)]
    if not quiet:
        check.note = "not judged: the baseline was timed on a busy machine"
        return check
    comparable = quiet
    check.busy = timed_while_busy(record)
    values = [statistic(entry, rule) for entry in comparable]
    check.baseline = stats.median(values)
    past_enough = _past_threshold(rule, check.baseline, check.now)
    evidence = []
    samples = record.get("samples", {}).get(rule.metric)
    pooled = [value for entry in comparable for value in entry.get("samples", {}).get(rule.metric) or ()]
    if samples and pooled:
        sign = rule.direction or (1 if check.now >= check.baseline else -1)
        check.p_value = stats.mann_whitney_greater([sign * v for v in samples], [sign * v for v in pooled])
        evidence.append(check.p_value < ALPHA)
    if len(values) >= 2:
        worst = max(values) if (rule.direction or 1) > 0 else min(values)
        evidence.append(_bad_change(rule, worst, check.now) > 0)
        check.note = f"history of {len(values)} runs: {min(values):.4g} to {max(values):.4g}"
    if not evidence:
        check.note = "not judged: one sample and no history"
        return check
    check.regressed = past_enough and all(evidence)
    if check.busy:
        check.note = "timed on a busy machine: counts only if a quiet rerun repeats it"
    return check


def _has_seed_spread(record: dict[str, Any], metric: str) -> bool:
    metrics = record.get("metrics", {})
    return metrics.get(f"{metric}_std") is not None and bool(metrics.get("seeds"))


def _seed_z(now: dict[str, Any], before: dict[str, Any], metric: str) -> float:
    """The change in standard errors of the difference of two means over seeds."""
    def variance_of_mean(record: dict[str, Any]) -> float:
        return record["metrics"][f"{metric}_std"] ** 2 / record["metrics"]["seeds"]

    error = math.sqrt(variance_of_mean(now) + variance_of_mean(before))
    change = abs(now["metrics"][metric] - before["metrics"][metric])
    return math.inf if error == 0 else change / error


def _numbers(*values: Any) -> bool:
    return all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
