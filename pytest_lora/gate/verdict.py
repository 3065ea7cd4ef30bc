"""The gate's verdict as text: what was compared, what differs, what regressed.

The run's JSON keeps these lines (``Comparison.summary``), and the terminal and the CLI print
them in colour, so they are written once, here, beside the comparison they describe.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

LISTED = 10  # configs named in a line before "... and N more" (the results JSON has them all)


def gate_lines(comparison: Any) -> list[tuple[str, str]]:
    """The gate's verdict as (text, colour) lines: what was compared, what differs, what regressed."""
    lines = []
    regressions, cleared = comparison.regressions, comparison.cleared
    configs = len({check.config for check in comparison.checks})
    verdict = f"{len(regressions)} regression(s)" if regressions else "no regression"
    lines.append((f"compared with {comparison.baseline.describe()}: {len(comparison.checks)} checks on {configs} configs, {verdict}",
                  "red" if regressions else "green"))
    if comparison.baseline.is_history and not comparison.baseline.runs:
        lines.append((f"no passed run in {comparison.baseline.path} yet: nothing to compare with (this run can be the first)", "yellow"))
    if comparison.machine_differences:
        lines.append(("the baseline differs: " + "; ".join(comparison.machine_differences), "yellow"))
    if comparison.timings_refused:
        lines.append(("timings not compared: the baseline was measured on other hardware (--lora-cross-hardware compares them)", "yellow"))
    unjudged = Counter(check.note for check in comparison.checks if check.kind == "timing" and check.regressed is None)
    for note, count in sorted(unjudged.items()):
        lines.append((f"{count} timing check(s) {note}", "yellow"))
    if comparison.busy:
        lines.append((f"{len(comparison.busy)} timing regression(s) measured on a busy machine, not counted (--lora-confirm reruns them): "
                      + _names(c.config for c in comparison.busy), "yellow"))
    if cleared:
        lines.append((f"{len(cleared)} timing regression(s) not repeated by their confirming rerun: " + _names(c.config for c in cleared), "yellow"))
    for label, names in (("only in the baseline", comparison.only_baseline), ("only in this run", comparison.only_now)):
        if names:
            lines.append((f"{len(names)} config(s) {label}: {_names(names)}", "yellow"))
    if comparison.unused_rules:
        lines.append(("rules that no record's metric matches: " + ", ".join(comparison.unused_rules), "yellow"))
    return lines


def _names(names: Iterable[str]) -> str:
    names = list(dict.fromkeys(names))
    shown = ", ".join(names[:LISTED])
    return shown + (f" ... and {len(names) - LISTED} more" if len(names) > LISTED else "")
