"""The terminal summary: the results tables, the records' warnings, the gate's verdict, and
where the records went."""

from __future__ import annotations

from typing import Any

import pytest


def write(writer: Any, config: pytest.Config, lora: Any) -> None:
    store = lora.store
    if store is None or not store.records:
        return
    from .report import table

    terminal = config.get_terminal_writer()
    width = terminal.fullwidth if terminal.hasmarkup else 1000  # logs are read wide, not squeezed
    comparison = store.comparison
    baseline_of = comparison.baseline_of if comparison is not None else None
    writer.write_sep("=", "pytest-lora results")
    _lines(writer, table.render_terminal(store.records, width, terminal.hasmarkup, baseline_of))
    for record in store.records:
        for warning in record.get("warnings", ()):
            writer.write_line(f"pytest-lora: warning: {record['test']}: {warning}", yellow=True)
    _budget_lines(writer, store.records)
    if comparison is not None:
        _gate(writer, comparison, width, terminal.hasmarkup)
        if lora.reruns:
            writer.write_line(f"pytest-lora: {lora.reruns} config(s) rerun to confirm a timing regression (--lora-confirm)")
    if store.writes:
        writer.write_line(f"pytest-lora: {len(store.records)} records in {store.run_path} (and {store.latest_path.name})")
    else:
        writer.write_line(f"pytest-lora: {len(store.records)} records, not written (--lora-bench or --lora-results=DIR writes them)")


def _lines(writer: Any, text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        writer.write_line(line)


def _gate(writer: Any, comparison: Any, width: int, color: bool) -> None:
    from .report import table

    writer.write_sep("=", "pytest-lora gate")
    for text, colour in table.gate_lines(comparison):
        writer.write_line(f"pytest-lora: {text}", **{colour: True})
    if comparison.regressions:
        _lines(writer, table.render_regressions_terminal("regressions", comparison.regressions, width, color))


def _budget_lines(writer: Any, records: list[dict[str, Any]]) -> None:
    """How many configs were checked against a memory budget, and against what."""
    checked = [record["budget"] for record in records if record.get("budget")]
    if not checked:
        return
    over = sum(1 for check in checked if not check["within"])
    bases = sorted({check["checked"] for check in checked})
    writer.write_line(f"pytest-lora: memory budget: {len(checked)} configs checked against the {' / '.join(bases)}; "
                      f"{over} over", red=bool(over))
