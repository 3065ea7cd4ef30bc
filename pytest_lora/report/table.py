"""Tables of records: one per suite, one row per measured case, one column per metric.

Rendered with rich (imported only when a table is printed) for the terminal summary, and as
GitHub-flavoured markdown for the published ``results/*.md``.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable

CASE_COLUMNS = ("model", "quant", "lora", "workload", "status")


def by_suite(records: Iterable[dict[str, Any]], skipped: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by ``suite: test function``: each group has one set of metric columns."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if skipped or record["status"] != "skipped":
            groups[f"{record['suite']}: {function_name(record)}"].append(record)
    return dict(groups)


def function_name(record: dict[str, Any]) -> str:
    """The test function's name, without module or parameters."""
    return record["test"].split("[", 1)[0].rsplit("::", 1)[-1]


def metric_columns(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(metric, unit) in first-seen order across the records."""
    columns: dict[str, str] = {}
    for record in records:
        for metric, unit in record["units"].items():
            columns.setdefault(metric, unit)
    return list(columns.items())


BaselineOf = Callable[[dict[str, Any]], "dict[str, Any] | None"]


def rows(records: list[dict[str, Any]], baseline_of: BaselineOf | None = None) -> tuple[list[str], list[list[str]], int]:
    """Header, cells and the number of leading text columns of one suite's table.

    Case columns that no record fills (no workload in the parameter suite) are left out. With
    ``baseline_of`` (a comparison's), each number has its change from the baseline beside it.
    """
    metrics = metric_columns(records)
    case_columns = [c for c in CASE_COLUMNS if c == "status" or any(r.get(c) is not None for r in records)]
    header = [*case_columns, *(f"{metric} [{unit}]" for metric, unit in metrics)]
    body = []
    for record in records:
        case = [case_cell(column, record.get(column)) for column in case_columns]
        before = baseline_of(record) if baseline_of else None
        values = [with_change(record["metrics"].get(metric), (before or {}).get("metrics", {}).get(metric)) for metric, _ in metrics]
        body.append([*case, *values])
    return header, body, len(case_columns)


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # a status
        return value
    if isinstance(value, int):
        return f"{value:,d}"
    return f"{value:.4g}"


def with_change(value: Any, baseline: Any) -> str:
    """A value and, when there is a baseline value, its change: ``1.25 (+4.1%)``."""
    text = format_value(value)
    if not isinstance(value, (int, float)) or not isinstance(baseline, (int, float)):
        return text
    return f"{text} ({format_change(value, baseline)})"


def format_change(value: float, baseline: float) -> str:
    if value == baseline:
        return "="
    if baseline == 0:
        return f"{value - baseline:+.3g}"
    return f"{(value - baseline) / abs(baseline):+.1%}"


def case_cell(column: str, value: Any) -> str:
    """How a record's model, quant, lora, workload or status reads in a table cell."""
    if value is None:
        return "-"
    if column == "lora":
        if value.get("r") is None:  # not an adapter: full fine-tuning
            return str(value.get("variant") or value.get("targets"))
        targets = value["targets"] if isinstance(value["targets"], str) else ",".join(value["targets"])
        variant = "" if value.get("variant") in (None, "lora") else f" {value['variant']}"
        return f"r{value['r']} a{format_value(value['alpha'])} {targets}{variant}"
    if column == "workload":
        return f"{value['batch']}x{value['seq_len']}" + (" ckpt" if value.get("grad_ckpt") else "")
    return str(value)


def render_terminal(records: list[dict[str, Any]], width: int, color: bool, baseline_of: BaselineOf | None = None) -> str:
    """The records as rich tables, one per suite and test, as text for pytest's terminal writer.

    Skipped records (a GPU measurement on a CPU machine) stay in the JSON, not on screen.
    """
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=max(width, 80), force_terminal=color, color_system="standard" if color else None)
    for suite, suite_records in by_suite(records, skipped=False).items():
        header, body, text_columns = rows(suite_records, baseline_of)
        console.print(_rich_table(f"pytest-lora {suite}", header, body, text_columns))
    return buffer.getvalue()


def _rich_table(title: str, header: list[str], body: list[list[str]], text_columns: int) -> Any:
    """A rich table of plain text: brackets (units, test parameters) are not rich markup."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for index, name in enumerate(header):
        numeric = index >= text_columns
        table.add_column(escape(name), justify="right" if numeric else "left", no_wrap=numeric, overflow="fold")
    for row in body:
        table.add_row(*(escape(cell) for cell in row))
    return table


REGRESSION_HEADER = ["metric", "config", "baseline", "now", "change", "rule", "p-value", "rerun", "note"]


def regression_rows(checks: Iterable[Any]) -> list[list[str]]:
    """One row per regression (a ``report.compare.Check``): what a CI log must show."""
    body = []
    for check in checks:
        change = format_change(check.now, check.baseline) if check.change is not None else "-"
        p_value = "-" if check.p_value is None else f"{check.p_value:.2g}"
        rerun = "-" if check.rerun is None else format_value(check.rerun)
        body.append([check.metric, check.config, format_value(check.baseline), format_value(check.now), change,
                     check.rule.describe() + ("" if check.rule.where == "default" else f" ({check.rule.where})"), p_value, rerun, check.note])
    return body


def render_regressions_terminal(title: str, checks: Iterable[Any], width: int, color: bool) -> str:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=max(width, 80), force_terminal=color, color_system="standard" if color else None)
    console.print(_rich_table(title, REGRESSION_HEADER, regression_rows(checks), 2))
    return buffer.getvalue()


def markdown_table(header: list[str], body: list[list[str]], text_columns: int) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if i >= text_columns else "---" for i in range(len(header))) + "|")
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body)
    return lines


def render_markdown(records: list[dict[str, Any]], baseline_of: BaselineOf | None = None) -> str:
    """The records as markdown tables, one per suite."""
    out = []
    for suite, suite_records in by_suite(records).items():
        header, body, text_columns = rows(suite_records, baseline_of)
        out.append(f"### {suite}\n")
        out.extend(markdown_table(header, body, text_columns))
        out.append("")
    return "\n".join(out)


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


def render_gate_markdown(comparison: Any) -> str:
    """The gate's section of the markdown report."""
    out = ["## Regression gate\n"]
    out.extend(f"- {text}" for text, _ in gate_lines(comparison))
    out.append("")
    if comparison.regressions:
        out.extend(markdown_table(REGRESSION_HEADER, regression_rows(comparison.regressions), 2))
        out.append("")
    return "\n".join(out)
