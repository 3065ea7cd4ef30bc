"""Records of xdist workers as they are measured: one append-only journal per worker.

A worker that dies (a segfault in a CUDA kernel, the kernel's OOM killer, a driver reset) sends
nothing at its end, so nothing may wait for the end. Each worker appends every event to its own
file, ``<results>/<run-id>.workers/<worker id>.jsonl``: one JSON object per line, written by one
``write`` call on a file opened for appending and then ``fsync``'d, so what is on disk is every
event before the last one plus, at worst, a torn last line, which readers leave alone.

The events:

- ``started``: a recorded test begins (its xdist node id and its record, case and suite filled);
- ``record``: its record, once it is torn down; a later line for the same test replaces an earlier
  one (a confirming rerun adds its ``confirmation`` to the first run's record);
- ``machine``: the worker's machine section (its GPU, driver, MFU peak), before its first record
  and again when it changes: the controller never touches the GPUs and describes the run by it;
- ``dropped``: a started test leaves no record (skipped outside the bench);
- ``build``: a base model was built (model, quantization, device);
- ``groups``: the group (``shard.group_of``) of every test the worker collected, which xdist's
  scheduler in the controller reads to keep each base's tests on one worker (``scheduling``);
- ``selected``: the tests the worker collected that record (they take ``lora_bench``): the run
  is whole when each has a record or was dropped.

The controller (``Collector``) reads each worker's new lines whenever that worker reports a test,
once more when the worker goes down, and writes them into the run's JSON at once. When xdist says
a worker crashed while running a test, the test's ``started`` line becomes an ``error`` record that
says so. A run killed as a whole leaves its JSON (records up to the last report) and the journals:
``recover`` folds the journals into the document, which ``pytest-lora report`` does for a run that
never finished. A run that ends removes its journals once its JSON holds everything in them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..results.runlog import append_whole, open_for_appending

WORKER_JOURNAL = "lora_journal"  # the workerinput key of a worker's journal path
SUFFIX = ".workers"


def directory_of(results: Path, run_id: str) -> Path:
    """Where the journals of run ``run_id`` go: beside its JSON."""
    return Path(results) / f"{run_id}{SUFFIX}"


def recovery_journal(path: Path) -> Path:
    """Where the worker journaling to ``path`` carries on when that fails: the temporary directory."""
    return Path(tempfile.gettempdir()) / f"pytest-lora-{Path(path).parent.stem}-{Path(path).stem}.jsonl"


class Journal:
    """A worker's side: append one event per line, each on disk before the call returns.

    When an append fails (a full disk, the directory removed), the journal carries on in a
    recovery journal in the temporary directory, ``pytest-lora-<run-id>-<worker id>.jsonl``, and
    calls ``on_failure`` with a sentence that names it: the session stops the worker after its
    test, and xdist stops the run.
    """

    def __init__(self, path: Path, on_failure: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.recovery_path = recovery_journal(self.path)
        self.on_failure = on_failure
        self.failure: str | None = None  # what failed, and where the events went instead
        self._target = self.path
        self._fd: int | None = None
        self._lost = False  # the recovery journal failed too: nothing more can be kept

    def started(self, nodeid: str, record: dict[str, Any]) -> None:
        self._append({"event": "started", "nodeid": nodeid, "record": record})

    def record(self, record: dict[str, Any]) -> None:
        self._append({"event": "record", "record": record})

    def machine(self, machine: dict[str, Any]) -> None:
        self._append({"event": "machine", "machine": machine})

    def dropped(self, nodeid: str) -> None:
        self._append({"event": "dropped", "nodeid": nodeid})

    def groups(self, groups: dict[str, str]) -> None:
        self._append({"event": "groups", "groups": groups})

    def selected(self, nodeids: list[str]) -> None:
        self._append({"event": "selected", "nodeids": nodeids})

    def build(self, base: tuple[str, str, str]) -> None:
        self._append({"event": "build", "base": list(base)})

    def _append(self, event: dict[str, Any]) -> None:
        if self._lost:
            return
        line = (json.dumps(event, allow_nan=False, separators=(",", ":")) + "\n").encode()
        try:
            self._write(line)
        except OSError as error:
            self._fail_over(error, line)

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self._fd = open_for_appending(self._target)
        append_whole(self._fd, line)

    def _fail_over(self, error: OSError, line: bytes) -> None:
        """Carry on in the recovery journal; say what happened (once per change)."""
        from ..results.store import reason

        self.close()
        if self._target == self.path:
            self._target = self.recovery_path
            self.failure = f"cannot append to {self.path} ({reason(error)}): this worker's events from then on are in {self.recovery_path}"
            try:
                self._write(line)
            except OSError as again:
                self.close()
                self._lost = True
                self.failure = (f"cannot append to {self.path} ({reason(error)}), nor to {self.recovery_path} ({reason(again)}): "
                                "this worker's later records are lost")
        else:
            self._lost = True
            self.failure = f"{self.failure}; then that failed too ({reason(error)}): this worker's later records are lost"
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Reader:
    """One journal read as it grows: each call returns the complete lines added since the last."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def new_events(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self.offset)
                data = stream.read()
        except FileNotFoundError:  # the worker has not measured anything yet
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a torn last line waits (or is dropped at recovery)
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


@dataclass
class Arrivals:
    """What a read of the journals brought: records (new or replacing), and base builds."""

    records: list[dict[str, Any]] = field(default_factory=list)
    builds: list[tuple[str, str, str]] = field(default_factory=list)  # (model, quantization, device) of each build
    machine: dict[str, Any] | None = None  # the worker's machine section, as it last described it


class Collector:
    """The controller's side: the journals of every worker of one run."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.readers: dict[str, Reader] = {}
        self.recovered: dict[str, Reader] = {}  # the recovery journal of each worker
        self.started: dict[str, dict[str, Any]] = {}  # xdist node id: the record it started
        self.recorded: set[str] = set()  # test ids with a record
        self.groups: dict[str, str] = {}  # xdist node id: its group, as the workers collected them
        self.selected: set[str] = set()  # the node ids of the tests that record, as the workers collected them
        self.dropped: set[str] = set()  # tests that recorded nothing (skipped outside the bench)

    def path(self, worker_id: str) -> Path:
        return self.directory / f"{worker_id}.jsonl"

    def expect(self, worker_id: str) -> Path:
        """The journal worker ``worker_id`` will write, read from now on."""
        self.readers.setdefault(worker_id, Reader(self.path(worker_id)))
        return self.path(worker_id)

    def collect(self, worker_id: str) -> Arrivals:
        """The events worker ``worker_id`` wrote since the last call: in its journal, then in its
        recovery journal (written once the journal failed)."""
        reader = self.readers.setdefault(worker_id, Reader(self.path(worker_id)))
        recovery = self.recovered.setdefault(worker_id, Reader(recovery_journal(self.path(worker_id))))
        return self._take([*reader.new_events(), *recovery.new_events()])

    def collect_all(self) -> Arrivals:
        """Every worker's new events, the journals on disk included (a run's recovery)."""
        for path in sorted(self.directory.glob("*.jsonl")):
            self.readers.setdefault(path.stem, Reader(path))
        arrivals = Arrivals()
        for worker_id in sorted(self.readers):
            more = self.collect(worker_id)
            arrivals.records += more.records
            arrivals.builds += more.builds
        return arrivals

    def _take(self, events: Iterable[dict[str, Any]]) -> Arrivals:
        arrivals = Arrivals()
        for event in events:
            if event["event"] == "started":
                self.started[event["nodeid"]] = event["record"]
            elif event["event"] == "dropped":
                self.started.pop(event["nodeid"], None)
                self.dropped.add(event["nodeid"])
            elif event["event"] == "selected":
                self.selected.update(event["nodeids"])
            elif event["event"] == "record":
                self.recorded.add(event["record"]["test"])
                arrivals.records.append(event["record"])
            elif event["event"] == "build":
                arrivals.builds.append(tuple(event["base"]))
            elif event["event"] == "machine":
                arrivals.machine = event["machine"]
            elif event["event"] == "groups":
                self.groups.update(event["groups"])
        return arrivals

    def interrupted(self, nodeid: str, why: str) -> dict[str, Any] | None:
        """The ``error`` record of a test its worker did not finish; ``None`` if it recorded
        nothing (not a bench test) or its record arrived after all."""
        started = self.started.get(nodeid)
        if started is None or started["test"] in self.recorded:
            return None
        self.recorded.add(started["test"])
        return {**started, "status": "error", "error": why}

    def unfinished(self, why: str) -> list[dict[str, Any]]:
        """The ``error`` records of every started test without a record (a run killed as a whole)."""
        records = [self.interrupted(nodeid, why) for nodeid in list(self.started)]
        return [record for record in records if record is not None]

    def remove(self) -> None:
        """Drop the journals: the run's JSON holds everything they hold."""
        shutil.rmtree(self.directory, ignore_errors=True)
        for reader in self.recovered.values():
            reader.path.unlink(missing_ok=True)


KILLED = "the run ended while this config ran (killed before it finished)"


def recover(document: dict[str, Any], results: Path) -> int:
    """Fold the journals of a run that never finished into its document; how many records it gained.

    The JSON of a killed run holds the records up to the last one the controller wrote; its workers'
    journals may hold later ones, and say which configs were running: those become ``error``.
    """
    run = document["run"]
    directory = directory_of(results, run["id"])
    if run.get("finished") is not None or not directory.is_dir():
        return 0
    collector = Collector(directory)
    arrivals = collector.collect_all()
    by_test = {record["test"]: index for index, record in enumerate(document["records"])}
    gained = 0
    for record in [*arrivals.records, *collector.unfinished(KILLED)]:
        if record["test"] in by_test:  # the journal's line is the record's last word
            document["records"][by_test[record["test"]]] = record
            continue
        by_test[record["test"]] = len(document["records"])
        document["records"].append(record)
        gained += 1
    return gained
