"""Everything a run publishes beside its JSON: the markdown report, the CSV and the plots.

One function for the run's end (``ResultsStore.finish``) and for ``pytest-lora report``, so
both write the same files from the same document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import markdown, plots, spreadsheet
from ..results.store import atomic_write_text


def write_report(document: dict[str, Any], directory: Path, names: tuple[str, ...]) -> list[Path]:
    """``<name>.md`` and ``<name>.csv`` for each name (a run id, ``latest``), and the run's plots
    (``<run-id>-<plot>.png``, linked from the markdown); the paths written."""
    report, table = markdown.render_run(document), spreadsheet.render(document)
    written = []
    for name in names:
        for path, text in ((directory / f"{name}.md", report), (directory / f"{name}.csv", table)):
            atomic_write_text(path, text)
            written.append(path)
    return written + plots.write(document, directory)
