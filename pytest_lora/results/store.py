"""The results store: each record on disk as it is measured, one JSON document per run at its end.

While the run goes, each record is appended to the run's log, ``<dir>/<run-id>.jsonl`` (``runlog``:
one line per record, fsynced, the same cost at record 10,000 as at record 10). When the run ends,
or is interrupted, ``<dir>/<run-id>.json`` and ``<dir>/latest.json`` get the whole document
(its schema: the README's "Results"): run provenance, the machine, and one record per measured
test; then the log goes, and the tables go next to them: the report as markdown (``<run-id>.md``,
``latest.md``), every record as CSV (``<run-id>.csv``, ``latest.csv``) and the plots
(``<run-id>-<plot>.png``). Each of those writes goes to a temporary file in the same directory,
is flushed to disk, then renamed over the target (and the directory fsynced), so a reader only
ever sees a complete document. A run killed before its end leaves its log, which every reader
takes for the document (``load``).

A write that fails (a full disk, a filesystem gone read-only) loses nothing: the log keeps its
complete lines, every record goes to a recovery file in the temporary directory
(``pytest-lora-<run-id>.json``), and ``ResultsNotWritten`` says where each is, so that the run can
stop. Should even the recovery file fail, the records that are on no disk are kept in memory
(``unsaved``) for the terminal to print.

The store is created at the first record: a run that records nothing (a usage error) writes
nothing. A plain test run (no ``--lora-bench``, no results directory set) keeps its records in
memory for the terminal table and writes no file: ``directory`` is ``None``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..specs import shortened
from . import runlog

# Writes a run's report, CSV and plots: (document, directory, file names) -> the paths written.
Publisher = Callable[[dict[str, Any], Path, tuple[str, ...]], list[Path]]

SCHEMA_VERSION = 1


class ResultsStore:
    """Records of one run and the files they are written to."""

    def __init__(self, directory: Path | None, run: dict[str, Any], machine: dict[str, Any], publish: Publisher | None = None):
        self.directory = None if directory is None else Path(directory)
        self.publish = publish  # what writes the report, CSV and plots beside the JSON (``report.publish``)
        self.run = run
        self.machine = machine
        self.records: list[dict[str, Any]] = []
        self._index: dict[str, int] = {}  # each record's test id: its place in ``records`` (kept, not rebuilt per record)
        self.comparison: Any = None  # the gate's gate.compare.Comparison, once the run is judged
        self.log = None if directory is None else runlog.RunLog(self.directory / f"{run['id']}{runlog.SUFFIX}")
        self.saved = 0  # how many records are on disk (in the log, then in the run's JSON)
        self.failure: str | None = None  # why the results directory stopped taking the run's writes
        self.recovery: Path | None = None  # where every record went after that, if it could be written
        self.recovery_failure: str | None = None  # why that failed too

    @property
    def run_path(self) -> Path:
        return self.directory / f"{self.run['id']}.json"

    @property
    def latest_path(self) -> Path:
        return self.directory / "latest.json"

    def document(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "run": self.run, "machine": self.machine, "records": self.records}

    def put(self, *records: dict[str, Any]) -> None:
        """Add records, each replacing an earlier one of its test, and append them to the log at
        once: nothing measured is lost. (A record comes again when a confirming rerun adds to it.)"""
        for record in records:
            if record["test"] in self._index:
                self.records[self._index[record["test"]]] = record
            else:
                self._index[record["test"]] = len(self.records)
                self.records.append(record)
        if not self.writes:
            return
        if self.failure is not None:
            self._save_elsewhere(self._text())
            return
        header = {"schema_version": SCHEMA_VERSION, "run": self.run, "machine": self.machine}
        try:
            self.log.append(header, self.records if self.log.lost() else records)
        except OSError as error:
            self._failed(f"cannot append to {self.log.path.name} in {self.directory} ({reason(error)})")
        self.saved = len(self.records)

    @property
    def writes(self) -> bool:
        return self.directory is not None

    def finish(self, status: str, finished: str) -> None:
        """Write the run's document, then its report, CSV and plots (``publish``). After a
        failed write only the recovery file is brought up to date, and nothing raises: the failure
        was reported when it happened."""
        self.run["status"] = status
        self.run["finished"] = finished
        if not self.writes:
            return
        try:
            self.write()
        except ResultsNotWritten:
            return
        if self.failure is not None or self.publish is None:
            return
        try:
            self.publish(self.document(), self.directory, (self.run["id"], "latest"))
        except OSError as error:
            self.failure = f"the report beside {self.run_path} could not be written ({reason(error)}); the JSON holds every record"

    def write(self) -> None:
        """The whole document into the run's file and ``latest.json``, from one serialization; then
        the log goes. After a failure, into the recovery file only."""
        if not self.writes:
            return
        text = self._text()
        if self.failure is not None:
            self._save_elsewhere(text)
            return
        for path in (self.run_path, self.latest_path):
            try:
                atomic_write_text(path, text)
            except OSError as error:
                self._failed(f"cannot write {path.name} in {path.parent} ({reason(error)})", text)
        self.log.remove()

    def _text(self) -> str:
        return json.dumps(self.document(), indent=1, allow_nan=False) + "\n"

    def _failed(self, failure: str, text: str | None = None) -> None:
        self.failure = failure
        self._save_elsewhere(text or self._text())
        raise ResultsNotWritten(self.whereabouts()) from None

    @property
    def recovery_path(self) -> Path:
        return Path(tempfile.gettempdir()) / f"pytest-lora-{self.run['id']}.json"

    def _save_elsewhere(self, text: str) -> None:
        if self.recovery_failure is not None:
            return
        try:
            atomic_write_text(self.recovery_path, text)
            self.recovery = self.recovery_path
        except OSError as error:
            self.recovery = None
            self.recovery_failure = reason(error)

    @property
    def unsaved(self) -> list[dict[str, Any]]:
        """The records on no disk: those after the log's last line, when the recovery failed too."""
        return [] if self.recovery is not None or self.failure is None else self.records[self.saved:]

    def whereabouts(self) -> str:
        """What failed and where the run's records are now."""
        total = len(self.records)
        if self.saved == total and self.recovery is None and self.recovery_failure is None:
            return self.failure  # the report beside a whole JSON
        if not self.saved:
            kept = f"none of the {total} records reached {self.directory}"
        else:
            share = f"all {total}" if self.saved == total else f"the first {self.saved} of the {total}"
            kept = f"{self.log.path.name} holds {share} records (its complete lines)"
        if self.recovery is not None:
            return f"{self.failure}: {kept}; all {total} are in {self.recovery}"
        lost = total - self.saved
        return (f"{self.failure}: {kept}; the recovery file {self.recovery_path} could not be written either ({self.recovery_failure})"
                + (f": the {lost} record(s) on no disk are printed below, a JSON line each" if lost else ""))


class ResultsNotWritten(Exception):
    """A write of the run's results failed: the message says why and where the records are."""


def reason(error: OSError) -> str:
    """``No space left on device`` rather than ``[Errno 28] No space left on device: '/path'``."""
    return error.strerror or str(error) or type(error).__name__


class UnusableDirectory(ValueError):
    """The results directory cannot hold the results: the message says where, what and why."""


def check_directory(path: Path, where: str) -> None:
    """That ``path`` is, or can be made, a directory this process can write a file into: a probe
    file is written, flushed to disk and removed. Directories made for the check are removed
    again, so a run refused later leaves nothing behind."""
    created: list[Path] = []
    try:
        missing = [directory for directory in (path, *path.parents) if not directory.exists()]
        for directory in reversed(missing):
            directory.mkdir()
            created.append(directory)
        if not path.is_dir():
            raise NotADirectoryError(0, "it is a file, not a directory")
        handle, probe = tempfile.mkstemp(prefix=".pytest-lora-probe.", dir=path)
        try:
            os.write(handle, b"probe")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        raise UnusableDirectory(f"{where}: {shortened(repr(str(path)))} cannot hold the results ({reason(error)}); "
                                "allowed: a writable directory, or a path where one can be made") from None
    finally:
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:  # pragma: no cover - emptied by us; another process may have written there meanwhile
                pass


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so that ``path`` holds either the old document or the new one, never a part."""
    _atomic_write(path, lambda stream: (json.dump(data, stream, indent=1, allow_nan=False), stream.write("\n")))


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda stream: stream.write(text))


def _atomic_write(path: Path, write: Any) -> None:
    """Write to a temporary file in the same directory, flush it to disk, rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the results from the user's group
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    runlog.fsync_directory(path.parent)  # the rename is on disk too


TEMPORARY = re.compile(r"\.(.+\.[A-Za-z0-9_]{8}\.tmp|pytest-lora-probe\.[A-Za-z0-9_]{8})")  # _atomic_write's and the probe's names
STALE_AFTER_S = 60.0  # older than any write of ours takes: another run's write in progress is left alone


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """The temporary files a killed write left in ``directory`` (ours only, by their names); those removed."""
    removed = []
    for path in Path(directory).glob(".*"):
        try:
            if TEMPORARY.fullmatch(path.name) and path.is_file() and time.time() - path.stat().st_mtime > STALE_AFTER_S:
                path.unlink()
                removed.append(path)
        except OSError:  # pragma: no cover - gone meanwhile
            continue
    return removed


def unfinished_runs(directory: Path) -> list[Path]:
    """The logs of runs that never wrote their JSON: killed, or still running elsewhere."""
    return sorted(path for path in Path(directory).glob(f"*{runlog.SUFFIX}") if not path.with_suffix(".json").exists())


def current_umask() -> int:
    """The process's umask (read by setting it, then setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load(path: Path) -> dict[str, Any]:
    """Read a results document (or the log of a run that never finished), checking its schema version."""
    path = Path(path)
    document = runlog.read(path) if path.suffix == runlog.SUFFIX else json.loads(path.read_text(encoding="utf-8"))
    if document.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {document.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return document
