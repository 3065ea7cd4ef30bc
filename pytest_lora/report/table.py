"""Tables of records: one per suite, one row per measured case, one column per metric.

Rendered with rich (imported only when a table is printed) for the terminal summary, and as
GitHub-flavoured markdown for the published ``results/*.md``.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any, Iterable

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


def rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], int]:
    """Header, cells and the number of leading text columns of one suite's table.

    Case columns that no record fills (no workload in the parameter suite) are left out.
    """
    metrics = metric_columns(records)
    case_columns = [c for c in CASE_COLUMNS if c == "status" or any(r.get(c) is not None for r in records)]
    header = [*case_columns, *(f"{metric} [{unit}]" for metric, unit in metrics)]
    body = []
    for record in records:
        case = [case_cell(column, record.get(column)) for column in case_columns]
        values = [format_value(record["metrics"].get(metric)) for metric, _ in metrics]
        body.append([*case, *values])
    return header, body, len(case_columns)


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,d}"
    return f"{value:.4g}"


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


def render_terminal(records: list[dict[str, Any]], width: int, color: bool) -> str:
    """The records as rich tables, one per suite and test, as text for pytest's terminal writer.

    Skipped records (a GPU measurement on a CPU machine) stay in the JSON, not on screen.
    """
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=max(width, 80), force_terminal=color, color_system="standard" if color else None)
    for suite, suite_records in by_suite(records, skipped=False).items():
        header, body, text_columns = rows(suite_records)
        table = Table(title=f"pytest-lora {suite}", title_justify="left")
        for index, name in enumerate(header):
            numeric = index >= text_columns
            table.add_column(name, justify="right" if numeric else "left", no_wrap=numeric, overflow="fold")
        for row in body:
            table.add_row(*row)
        console.print(table)
    return buffer.getvalue()


def render_markdown(records: list[dict[str, Any]]) -> str:
    """The records as markdown tables, one per suite."""
    out = []
    for suite, suite_records in by_suite(records).items():
        header, body, text_columns = rows(suite_records)
        out.append(f"### {suite}\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---:" if i >= text_columns else "---" for i in range(len(header))) + "|")
        out.extend("| " + " | ".join(row) + " |" for row in body)
        out.append("")
    return "\n".join(out)
