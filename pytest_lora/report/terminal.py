"""The tables printed in the terminal, with rich (imported only when a table is printed): the
compact headline, every suite's full table cut to the terminal's width, and the regressions."""

from __future__ import annotations

import io
from typing import Any, Iterable

from .headline import sections
from .table import REGRESSION_HEADER, by_suite, regression_row, row_notes, rows


def console(width: int, color: bool) -> tuple[Any, io.StringIO]:
    from rich.console import Console

    buffer = io.StringIO()
    return Console(file=buffer, width=width, force_terminal=color, color_system="standard" if color else None), buffer


def render_headline_terminal(records: list[dict[str, Any]], width: int, color: bool) -> str:
    """The compact headline (``report.headline``): a few small tables that fit ``width`` columns."""
    from rich.markup import escape

    out, buffer = console(width, color)
    for index, part in enumerate(sections(records, compact=True)):
        if index:
            out.print()
        out.print(f"[bold]{escape(part.title)}[/bold]: " + escape(" ".join(part.notes)), highlight=False)
        if part.header:
            out.print(_rich_table(None, part.header, part.rows, part.text_columns))
    return buffer.getvalue()


def render_full_terminal(records: list[dict[str, Any]], width: int, color: bool) -> str:
    """Every table, one per suite and test, cut into as many column groups as ``width`` needs:
    each group repeats the case columns, so no column is squeezed to nothing."""
    out, buffer = console(width, color)
    for suite, suite_records in by_suite(records, skipped=False).items():
        header, body, text_columns = rows(suite_records)
        header = [name.replace(" [", "\n[", 1) for name in header]
        groups = column_groups(header, body, text_columns, width)
        for index, group in enumerate(groups):
            title = f"pytest-lora {suite}" + (f" ({index + 1}/{len(groups)})" if len(groups) > 1 else "")
            columns = [*range(text_columns), *group]
            out.print(title, markup=False, highlight=False)  # on a line of its own: a narrow table would wrap it
            out.print(_rich_table(None, [header[i] for i in columns], [[row[i] for i in columns] for row in body], text_columns))
        for note in row_notes(suite_records):
            out.print(note, markup=False, highlight=False)
    return buffer.getvalue()


def column_groups(header: list[str], body: list[list[str]], text_columns: int, width: int) -> list[list[int]]:
    """The metric columns, in order, split so that the case columns and each group fit ``width``."""
    def needed(index: int) -> int:  # a cell's text, its padding and its border
        return max([len(line) for line in header[index].split("\n")] + [len(row[index]) for row in body]) + 3

    room = width - 1 - sum(needed(i) for i in range(text_columns))
    groups: list[list[int]] = [[]]
    used = 0
    for index in range(text_columns, len(header)):
        if groups[-1] and used + needed(index) > room:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += needed(index)
    return groups if groups[0] else [[]]


def _rich_table(title: str | None, header: list[str], body: list[list[str]], text_columns: int) -> Any:
    """A rich table of plain text: brackets (units, test parameters) are not rich markup."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=None if title is None else escape(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for index, name in enumerate(header):
        table.add_column(escape(name), justify="right" if index >= text_columns else "left", overflow="fold")
    for row in body:
        table.add_row(*(escape(cell) for cell in row))
    return table


def render_regressions_terminal(title: str, checks: Iterable[dict[str, Any]], width: int, color: bool) -> str:
    out, buffer = console(width, color)
    out.print(_rich_table(title, REGRESSION_HEADER, [regression_row(check) for check in checks], 2))
    return buffer.getvalue()
