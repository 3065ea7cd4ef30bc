"""The terminal summary: the headline tables, how the configs ended, the gate's verdict, and
where the report went.

By default it is compact enough for one screen at 120 columns (``report.headline``'s compact
sections); ``-v`` or ``--lora-report=full`` prints every table too, cut into column groups that
fit the terminal. Output that is not a terminal (a CI log) is laid out for 120 columns.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

LOG_WIDTH = 120  # the width of a summary written to a file or a CI log


def wrapped(lines: Any, width: int = LOG_WIDTH) -> Any:
    """A report-header entry (a line or a list of lines) with each line cut into lines of at most
    ``width`` columns at spaces, the continuations indented."""
    import textwrap

    if isinstance(lines, str):
        return "\n".join(textwrap.wrap(lines, width, subsequent_indent="    ", break_on_hyphens=False)) if len(lines) > width else lines
    return [wrapped(line, width) for line in lines]


def write(writer: Any, config: pytest.Config, lora: Any) -> None:
    for log in lora.run.unfinished:  # found at the start: an earlier run killed before its end
        shown = shown_path(log, config.invocation_params.dir)
        writer.write_line(f"pytest-lora: run {log.stem} never finished (killed?): its records are in {shown}; "
                          f"`pytest-lora report {shown}` makes its report", yellow=True)
    store = lora.run.store
    if store is None or not store.records:
        return
    from .report import terminal as tables
    from .report.headline import without_headline
    from .report.markdown import status_counts

    terminal = config.get_terminal_writer()
    width = terminal.fullwidth if terminal.hasmarkup else LOG_WIDTH
    full = config.get_verbosity() > 0 or str(lora.settings["report"].value).lower() == "full"
    writer.write_sep("=", "pytest-lora results")
    # every table with --lora-report=full; else the headline, and the tables of tests it doesn't read (a user's own)
    tabled = store.records if full else without_headline(store.records)
    if tabled:
        _lines(writer, tables.render_full_terminal(tabled, width, terminal.hasmarkup))
    _lines(writer, tables.render_headline_terminal(store.records, width, terminal.hasmarkup))
    _warning_lines(writer, store.records, full)
    _budget_lines(writer, store.records)
    comparison = store.comparison
    if comparison is not None:
        _gate(writer, comparison, width if terminal.hasmarkup else 1000, terminal.hasmarkup)  # a log keeps each regression on one line
        if lora.run.reruns:
            writer.write_line(f"pytest-lora: {lora.run.reruns} config(s) rerun to confirm a timing regression (--lora-confirm)")
    counts = f"{len(store.records)} records ({status_counts(store.records)})"
    tests = store.run.get("tests")
    if store.run.get("status") == "interrupted" and tests:
        writer.write_line(f"pytest-lora: interrupted: {tests['recorded']} of {tests['selected']} selected tests recorded", yellow=True)
    if store.failure is not None:
        _failure_lines(writer, store)
    elif store.writes:
        directory = shown_path(store.directory, config.invocation_params.dir)
        writer.write_line(f"pytest-lora: {counts} in {directory / store.run_path.name} (and {store.latest_path.name})")
        writer.write_line(f"pytest-lora: report {directory / (store.run['id'] + '.md')} (+ CSV, plots)"
                          + ("" if full else "; every table: -v"))
    else:
        writer.write_line(f"pytest-lora: {counts}, not written (--lora-bench or --lora-results=DIR writes them)")


def _failure_lines(writer: Any, store: Any) -> None:
    """A results write failed: where the records are, and those on no disk as JSON lines, to be
    copied from the terminal or the CI log."""
    writer.write_line(f"pytest-lora: the results were not all written: {store.whereabouts()}", red=True, bold=True)
    import json

    for record in store.unsaved:
        writer.write_line(json.dumps(record, allow_nan=False))


def shown_path(path: Path, here: Path) -> Path:
    """``path`` relative to where pytest was run from, when it lies below it."""
    try:
        return path.resolve().relative_to(here.resolve())
    except ValueError:
        return path


def _lines(writer: Any, text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        writer.write_line(line)


def _warning_lines(writer: Any, records: list[dict[str, Any]], full: bool) -> None:
    """Every record's warning with ``full``; else how many records share each kind of warning."""
    warned = [(record["test"], warning) for record in records for warning in record.get("warnings", ())]
    if full:
        for test, warning in warned:
            writer.write_line(f"pytest-lora: warning: {test}: {warning}", yellow=True)
        return
    kinds = Counter(warning.split(":", 1)[0] for _, warning in warned)
    for kind, count in kinds.items():
        writer.write_line(f"pytest-lora: warning: {kind}: {count} record(s) (-v lists each)", yellow=True)


def _gate(writer: Any, comparison: Any, width: int, color: bool) -> None:
    from .gate.compare import check_record
    from .gate.verdict import gate_lines
    from .report import terminal

    writer.write_sep("=", "pytest-lora gate")
    for text, colour in gate_lines(comparison):
        writer.write_line(f"pytest-lora: {text}", **{colour: True})
    if comparison.regressions:
        checks = [check_record(check) for check in comparison.regressions]
        _lines(writer, terminal.render_regressions_terminal("regressions", checks, width, color))


def _budget_lines(writer: Any, records: list[dict[str, Any]]) -> None:
    """How many configs were checked against a memory budget, and against what."""
    checked = [record["budget"] for record in records if record.get("budget")]
    if not checked:
        return
    over = sum(1 for check in checked if not check["within"])
    bases = sorted({check["checked"] for check in checked})
    writer.write_line(f"pytest-lora: memory budget: {len(checked)} configs checked against the {' / '.join(bases)}; "
                      f"{over} over", red=bool(over))
