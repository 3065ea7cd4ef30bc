"""The run's log: every record on disk as it is measured, for the same cost at record 10 and 10,000.

While a run goes, ``<dir>/<run-id>.jsonl`` grows by one line per record, written by one ``write``
on a file opened for appending and then ``fsync``'d: what is on disk is every record before the
last one plus, at worst, a torn last line, which the reader leaves alone. Rewriting the whole
document after each record (what the store did before) cost 16 ms at the first record and 56 ms
at the 600th, and 209 MB of writes for a 387 KB file.

The lines:

- ``{"header": {"schema_version": 1, "run": {...}, "machine": {...}}}``: first, and again
  whenever the run's section or the machine changes (a base built, a GPU seen); the last wins;
- ``{"record": {...}}``: a record; a later line for the same test replaces an earlier one (a
  confirming rerun adds its ``confirmation`` to the first run's record).

The JSON document (``store``) is assembled from memory when the run ends or is interrupted, and
the log is then removed. A run killed before that leaves its log, which every reader (``pytest-lora
report`` and ``compare``, the gate's baseline and history) reads as the document it would have been.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

SUFFIX = ".jsonl"


class RunLog:
    """The append side. The file is made at the first append (a run that records nothing writes nothing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._header = ""  # the header as last appended

    def append(self, header: dict[str, Any], records: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> None:
        """The header (when it changed) and ``records``, on disk when this returns; ``OSError`` if not."""
        lines = []
        text = json.dumps(header, allow_nan=False, separators=(",", ":"))
        if text != self._header:
            lines.append('{"header":' + text + "}")
        lines += [json.dumps({"record": record}, allow_nan=False, separators=(",", ":")) for record in records]
        data = ("\n".join(lines) + "\n").encode()
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = open_for_appending(self.path)
            fsync_directory(self.path.parent)  # the new file's name is on disk too
        append_whole(self._fd, data)
        self._header = text

    def lost(self) -> bool:
        """Whether the log was removed under the run (a cleanup job deleted the directory): appends
        would go to a file with no name. The caller starts it again with every record."""
        if self._fd is None or os.fstat(self._fd).st_nlink > 0:
            return False
        self.close()
        self._header = ""
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Once the run's JSON holds everything: the log goes."""
        self.close()
        self.path.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any]:
    """The document a log stands for: the last header's sections, each test's last record (in the
    order tests first appeared). ``ValueError`` when a line before the last is not JSON, or there
    is no header."""
    header: dict[str, Any] | None = None
    records: dict[str, dict[str, Any]] = {}
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number >= len(lines) - 1:  # a torn last line: a kill mid-write
                break
            raise ValueError(f"line {number} is not JSON") from None
        if "header" in entry:
            header = entry["header"]
        elif "record" in entry:
            records[entry["record"]["test"]] = entry["record"]
    if header is None:
        raise ValueError("no header line")
    return {**header, "records": list(records.values())}


def open_for_appending(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)


def append_whole(handle: int, data: bytes) -> None:
    """``data`` at the end of a file opened for appending, on disk when this returns: one write
    (with O_APPEND it lands whole at the end), then fsync. ``OSError`` when the disk took less
    (a full disk: the readers skip the torn line)."""
    written = os.write(handle, data)
    if written != len(data):
        raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes")
    os.fsync(handle)


def fsync_directory(directory: Path) -> None:
    """Put a directory's entries (a rename, a new file) on disk, where the filesystem allows it."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory handles
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover - a filesystem that refuses fsync on directories
        pass
    finally:
        os.close(handle)
