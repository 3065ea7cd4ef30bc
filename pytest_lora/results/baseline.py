"""What a run is compared with: one earlier results file, or a directory of them (the history).

A directory holds the runs a CI job kept (``--lora-results`` pointed at it run after run). Its
history is the runs whose status is ``passed`` (a run the gate failed is not a baseline), newest
last, at most ``window`` of them; ``latest.json`` is a copy of one of them and is skipped. A
missing path, unreadable JSON or a document of another schema is a ``BaselineError`` whose
message names the file and what is allowed; the plugin turns it into a usage error (exit code 4)
before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import runlog
from .store import SCHEMA_VERSION, unfinished_runs

DEFAULT_WINDOW = 5
ALLOWED = f"a pytest-lora results JSON (schema_version {SCHEMA_VERSION}) or a directory of them"


class BaselineError(ValueError):
    """A baseline that can't be used; the message says which file and why."""


@dataclass
class Baseline:
    """The runs to compare with, oldest first, and what was left out of a directory."""

    path: Path | None  # None: no baseline, only bounds are checked
    runs: list[dict[str, Any]]
    left_out: list[str] = field(default_factory=list)

    @property
    def is_history(self) -> bool:
        return self.path is not None and self.path.is_dir()

    @property
    def machine(self) -> dict[str, Any]:
        return self.runs[-1]["machine"] if self.runs else {}

    def describe(self) -> str:
        if self.path is None:
            return "no baseline (bounds only)"
        if not self.is_history:
            return f"{self.path} (run {self.runs[0]['run'].get('id')})"
        return f"{self.path}: {len(self.runs)} passed run(s)" + (f", {len(self.left_out)} left out" if self.left_out else "")


def load(path: Path, where: str, window: int = DEFAULT_WINDOW) -> Baseline:
    """The baseline at ``path``: a results file, or the newest ``window`` passed runs of a directory."""
    path = Path(path)
    if path.is_dir():
        return _history(path, where, window)
    if not path.exists():
        raise BaselineError(f"{where}: {str(path)!r} does not exist; allowed: {ALLOWED}")
    return Baseline(path, [read(path, where)])


def _history(directory: Path, where: str, window: int) -> Baseline:
    runs, left_out = [], []
    finished = sorted(directory.glob("*.json"))
    for path in finished + unfinished_runs(directory):  # a killed run's log: left out below, and said so
        if path.name == "latest.json" or path.name.startswith("."):
            continue
        document = read(path, where)
        if document["run"].get("status") == "passed":
            runs.append(document)
        else:
            left_out.append(f"{path.name} ({document['run'].get('status')})")
    runs.sort(key=lambda document: (str(document["run"].get("started")), str(document["run"].get("id"))))
    return Baseline(directory, runs[-window:] if window else runs, left_out)


def read(path: Path, where: str) -> dict[str, Any]:
    """A results document, checked for what the gate reads; a ``BaselineError`` otherwise."""
    try:
        if Path(path).suffix == runlog.SUFFIX:  # a run that never finished: its log
            document = runlog.read(Path(path))
        else:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise BaselineError(f"{where}: {str(path)!r} is not readable JSON ({error}); allowed: {ALLOWED}") from None
    if not isinstance(document, dict):
        raise BaselineError(f"{where}: {str(path)!r} is not a results document (a JSON {type(document).__name__}); allowed: {ALLOWED}")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise BaselineError(f"{where}: {str(path)!r} has schema_version {document.get('schema_version')!r}; allowed: {ALLOWED}")
    problem = _shape_problem(document)
    if problem:
        raise BaselineError(f"{where}: {str(path)!r} is not a results document ({problem}); allowed: {ALLOWED}")
    return document


def _shape_problem(document: dict[str, Any]) -> str | None:
    if not isinstance(document.get("run"), dict) or not isinstance(document.get("machine"), dict):
        return "no 'run' or 'machine' object"
    records = document.get("records")
    if not isinstance(records, list):
        return "no 'records' list"
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict) or "test" not in record:
            return f"record {index} has no 'test' and 'metrics'"
    return None
