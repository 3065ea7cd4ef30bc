"""The regression gate of a pytest run: ``--lora-compare``, ``--lora-fail``, ``--lora-confirm``.

The baseline and the rules are read when pytest configures, so a missing or corrupt baseline and
a malformed rule are usage errors (exit code 4) before anything runs. Rules come in layers: the
defaults per kind of metric (``gate.rules``), then a matrix file's ``[gate]`` table
(``fail = [...]``), then ``--lora-fail`` / ``PYTEST_LORA_FAIL`` / ``lora_fail``; a layer's rules for
a metric replace the earlier ones for that metric.

With ``--lora-confirm``, a config whose timing regressed is run again at once, before the next
test (its base model is still built), and the regression counts only if the rerun regresses too.
Counts, memory and correctness repeat exactly: a rerun could only repeat them, so they are not
rerun. At the end of the session the gate judges every record (``gate.compare``); a
regression makes the exit status 1 and the run's status ``failed``.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..results import baseline as baseline_module
from . import kinds
from . import rules as rules_module
from ..specs import whole_number
from .compare import Comparison, compare, history_by_config



class Gate:
    """A baseline and rules, and their judgement of a run's records: the session's
    (``Gate.of_settings``) and ``pytest-lora compare``'s alike."""

    def __init__(self, rules: dict[str, list[rules_module.Rule]], baseline: baseline_module.Baseline | None,
                 cross_hardware: bool = False, confirm: bool = False):
        """``rules``: ``rules.merged`` layers; ``baseline``: ``None`` when nothing is compared."""
        self.rules, self.baseline, self.cross_hardware, self.confirm = rules, baseline, cross_hardware, confirm
        self._history: dict | None = None  # the baseline's records by config, indexed once

    @classmethod
    def of_settings(cls, settings: dict[str, Any], file_table: dict[str, Any] | None = None, file_where: str = "") -> Gate:
        """The session's gate, from its options and the matrix file's ``[gate]`` table
        (``file_table``, named ``file_where`` in errors); a bad rule or baseline is a usage error."""
        rules = rules_module.merged([cls._file_rules(file_table or {}, file_where), cls._option_rules(settings["fail"])])
        return cls(rules, cls._load_baseline(settings), bool(settings["cross_hardware"].value), bool(settings["confirm"].value))

    @property
    def active(self) -> bool:
        """Whether anything is gated: a baseline, or a bound that needs none."""
        has_bound = any(rule.bound is not None for named in self.rules.values() for rule in named)
        return self.baseline is not None or has_bound

    @classmethod
    def _option_rules(cls, setting: Any) -> list[rules_module.Rule]:
        return [cls._parse(text, setting.describe()) for text in setting.value or ()]

    @classmethod
    def _file_rules(cls, table: dict[str, Any], where: str) -> list[rules_module.Rule]:
        unknown = sorted(set(table) - {"fail"})
        if unknown:
            raise pytest.UsageError(f"{where}: {unknown[0]!r} is not a gate key; allowed: fail = [\"METRIC[:STAT]:THRESHOLD\", ...]")
        rules = table.get("fail", [])
        if isinstance(rules, str):
            rules = [rules]
        return [cls._parse(text, f"{where} fail") for text in rules]

    @staticmethod
    def _parse(text: Any, where: str) -> rules_module.Rule:
        try:
            return rules_module.parse(str(text), where)
        except rules_module.RuleError as error:
            raise pytest.UsageError(str(error)) from None

    @staticmethod
    def _load_baseline(settings: dict[str, Any]) -> baseline_module.Baseline | None:
        setting = settings["compare"]
        if not setting.value:
            return None
        try:  # the history's count was checked where the option is declared (options.py)
            return baseline_module.load(setting.path(), setting.describe(), whole_number(settings["history"].value))
        except baseline_module.BaselineError as error:
            raise pytest.UsageError(str(error)) from None

    def judge(self, records: list[dict[str, Any]], machine: dict[str, Any]) -> Comparison:
        baseline = self.baseline or baseline_module.Baseline(None, [])
        if self._history is None:  # the machine is the session's: one index serves every call
            self._history = history_by_config(baseline, machine, self.cross_hardware)
        return compare(records, machine, baseline, self.rules, self.cross_hardware, self._history)

    def needs_rerun(self, record: dict[str, Any], machine: dict[str, Any]) -> bool:
        """Whether ``--lora-confirm`` reruns this record's config: one of its timings regressed."""
        if not self.confirm or self.baseline is None or "confirmation" in record:
            return False
        return any(check.regressed and getattr(kinds.named(check.kind), "rerun", False) for check in self.judge([record], machine).checks)

    def decide(self, records: list[dict[str, Any]], machine: dict[str, Any]) -> Comparison | None:
        """Judge the run; ``None`` when nothing is gated."""
        return self.judge(records, machine) if self.active else None
