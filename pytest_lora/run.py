"""The run's records, from each test (or each xdist worker's journal) to the results store, and
the run's end: the gate's verdict, the run's status and the last write.

A test's record goes to the store at once (``results.store``), or, on an xdist worker, to its
journal (``dist.journal``), which the controller reads as the worker reports each test. At the
end the gate judges the records, the status says whether every selected test left its record,
and the JSON is written whole; a failed write stops the run, keeping what was measured.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest

from .dist.interrupts import Interrupts
from .gate.judge import Gate
from .results import provenance
from .results.store import ResultsStore, UnusableDirectory, check_directory


class Run:
    """The records of one pytest run, its base builds, its workers' journals and its end."""

    def __init__(self, config: pytest.Config, settings: dict[str, Any], gate: Gate, shard: tuple[int, int] | None,
                 machine: Callable[[], dict[str, Any]]):
        """``machine``: the results' machine section, as the session knows it when asked."""
        self.config, self.settings, self.gate, self.shard, self.machine = config, settings, gate, shard, machine
        self.id = provenance.new_run_id()
        self.started = provenance.now()
        self.builds: Counter[tuple[str, str, str]] = Counter()
        self.build_seconds: dict[tuple[str, str, str], float] = {}
        self.store: ResultsStore | None = None
        self.journal: Any = None  # an xdist worker's journal.Journal: its records, as measured
        self._collector: Any = None  # the xdist controller's journal.Collector
        self._machine_sent: dict[str, Any] | None = None  # a worker's machine as last journaled
        self.worker_errors: dict[str, str] = {}  # why each worker that went down early did
        self.reruns = 0  # configs run again to confirm a timing regression (--lora-confirm)
        self.session: pytest.Session | None = None  # set when the session starts (the gate sets its exit status)
        self.stopped_by: str | None = None  # why the run was stopped early (a results write failed)
        self.interrupts = Interrupts()  # SIGINT and SIGTERM while the session runs
        self.unfinished: list[Path] = []  # logs of earlier runs that never finished, found at the start
        self.recording: set[str] = set()  # node ids of the selected tests that record (take lora_bench)
        self.dropped: set[str] = set()  # of those, the ones that recorded nothing by design (skipped outside the bench)

    @property
    def records_wanted(self) -> bool:
        """Whether results are written: under the bench, or when a results directory is set."""
        return bool(self.settings["bench"].value) or self.settings["results"].is_set

    def check_results_directory(self) -> None:
        """Before anything runs: the results directory can be written (an xdist worker writes
        nothing there; its controller checked)."""
        if not self.records_wanted or hasattr(self.config, "workerinput"):
            return
        try:
            check_directory(self.settings["results"].path(), self.settings["results"].describe())
        except UnusableDirectory as error:
            raise pytest.UsageError(str(error)) from None

    def tidy_results_directory(self) -> None:
        """At the start of a run: remove the temporary files a killed write left (ours, by name,
        stale), and note the runs that never finished, for the summary."""
        if not self.records_wanted or hasattr(self.config, "workerinput"):
            return
        directory = self.settings["results"].path()
        if directory.is_dir():
            from .results.store import remove_stale_temporaries, unfinished_runs

            remove_stale_temporaries(directory)
            self.unfinished = unfinished_runs(directory)

    def note_build(self, base: tuple[str, str, str], seconds: float) -> None:
        """A base (model, quantization, device) was built: counted for the run (``builds`` in its JSON)."""
        self.build_seconds[base] = seconds
        self.builds[base] += 1
        if self.journal is not None:
            self.journal.build(base)

    def builds_summary(self) -> list[dict[str, Any]]:
        """The run's base builds: each base once, unless a test asked for it after it was released."""
        return [{"model": model, "quant": quant, "device": device, "count": count} for (model, quant, device), count in self.builds.items()]

    def deliver(self, record: dict[str, Any]) -> None:
        """A test's record: to the worker's journal under xdist, else to the store. A record
        delivered again (with a confirming rerun's result in it) replaces the first."""
        if self.journal is not None:
            machine = self.machine()
            if machine != self._machine_sent:  # the controller describes the workers' device, not its own
                self.journal.machine(machine)
                self._machine_sent = dict(machine)
            self.journal.record(record)
        else:
            self.add_records(record)

    # ----------------------------------------------------------------- xdist workers' journals

    def collector(self) -> Any:
        """The controller's reader of its workers' journals, made when the first worker starts."""
        if self._collector is None:
            import tempfile

            from .dist import journal

            if self.records_wanted:
                self._collector = journal.Collector(journal.directory_of(self.settings["results"].path(), self.id))
            else:  # no results directory: the journals live as long as the run
                self._collector = journal.Collector(Path(tempfile.mkdtemp(prefix="pytest-lora-")))
        return self._collector

    def collect(self, worker_id: str) -> None:
        """Take worker ``worker_id``'s new records and builds into the run (written at once)."""
        if self._collector is None:
            return
        arrivals = self._collector.collect(worker_id)
        if arrivals.machine is not None:  # the controller never touches the GPUs its workers measure on
            self.machine().update(arrivals.machine)
        self.builds.update(arrivals.builds)
        if arrivals.records or arrivals.builds:
            self.add_records(*arrivals.records)

    def test_groups(self) -> dict[str, str]:
        """Each collected test's group, as the workers named them (read by ``dist.scheduling``)."""
        if self._collector is not None and not self._collector.groups:
            for worker_id in list(self._collector.readers):
                self.collect(worker_id)
        return self._collector.groups if self._collector is not None else {}

    def worker_crashed(self, worker_id: str, nodeid: str) -> None:
        """xdist says worker ``worker_id`` died while running ``nodeid``: its config is an ``error``."""
        if self._collector is None:
            return
        self.collect(worker_id)
        why = f"worker {worker_id} died while running this config ({self.worker_errors.get(worker_id, 'no reason given')})"
        record = self._collector.interrupted(nodeid, why)
        if record is not None:
            self.add_records(record)

    def add_records(self, *records: dict[str, Any]) -> None:
        if self.store is None:
            argv = ["pytest", *self.config.invocation_params.args]
            run = provenance.run_info(self.id, self.started, argv, self.config.rootpath)
            if self.shard is not None:
                run["shard"] = f"{self.shard[0]}/{self.shard[1]}"
            directory = self.settings["results"].path() if self.records_wanted else None
            self.store = ResultsStore(directory, run, self.machine(), publish=publish_report)
        self.machine()
        self.store.run["builds"] = self.builds_summary()
        self._keep(self.store.put, *records)

    def _keep(self, write: Any, *records: dict[str, Any]) -> None:
        """Write records; when the results directory fails, stop the run after this test (the
        store has kept the records elsewhere and says where)."""
        from .results.store import ResultsNotWritten

        try:
            write(*records)
        except ResultsNotWritten as error:
            self.stop_run(f"{self.settings['results'].describe()}: {error}")

    def stop_run(self, reason: str) -> None:
        """End the run after the test in progress, as pytest's ``-x`` does: serially through the
        session, under xdist through its controller (which stops its workers; a worker's own
        stop reaches the controller when the worker finishes)."""
        if hasattr(self.config, "workerinput"):
            reason = f"{self.config.workerinput.get('workerid', 'a worker')}: {reason}"
        self.stopped_by = reason
        if self.session is not None:
            self.session.shouldstop = reason
        dsession = self.config.pluginmanager.getplugin("dsession")
        if dsession is not None:
            dsession.shouldstop = reason

    def finish(self, exitstatus: int) -> int:
        """Judge the run with the gate, write its status; the exit status, 1 if the gate failed it."""
        if self._collector is not None:  # the workers' last lines, and the configs they were in when stopped
            for worker_id in list(self._collector.readers):
                self.collect(worker_id)
            stopped = self._collector.unfinished("the run stopped while this config ran (interrupted)")
            if stopped:
                self.add_records(*stopped)
        if self.store is None:
            return exitstatus
        comparison = self.gate.decide(self.store.records, self.store.machine)
        if comparison is not None:
            self.store.run["gate"] = comparison.summary()
            self.store.comparison = comparison
            comparison.annotate(self.store.records)
            if comparison.regressions and exitstatus == 0:
                exitstatus = 1
        self.store.run["builds"] = self.builds_summary()
        if self.stopped_by is not None:  # the last test's write may fail after xdist's last check to stop
            exitstatus = exitstatus or int(pytest.ExitCode.INTERRUPTED)
        dsession = self.config.pluginmanager.getplugin("dsession")
        stopped_by = self.stopped_by or self.interrupts.first or (getattr(dsession, "shouldstop", None) if dsession is not None else None)
        if stopped_by:  # by us, a signal, or a worker (its journal failed; -x)
            self.store.run["stopped_by"] = str(stopped_by)
        tests = self.store.run["tests"] = self.test_counts()
        if tests["recorded"] + tests["dropped"] < tests["selected"] and exitstatus == 0:  # a record went missing: say so
            exitstatus = int(pytest.ExitCode.INTERRUPTED)
        self.store.finish(run_status(exitstatus, tests), provenance.now())
        if self.store.failure is not None and exitstatus == 0:  # the JSON is whole; the tables beside it are not
            exitstatus = int(pytest.ExitCode.INTERRUPTED)
        if self._collector is not None and self.store.failure is None:
            self._collector.remove()  # after the final write: the JSON holds every journal's records
        return exitstatus

    def fail_run(self, reason: str) -> None:
        """A plugin failed the run after it was written (pytest-benchmark's compare-fail): say so."""
        if self.session is not None and self.session.exitstatus == 0:
            self.session.exitstatus = 1
        if self.store is not None:
            self.store.run.setdefault("failed_by", []).append(reason)
            self.store.finish("failed", provenance.now())


    def test_counts(self) -> dict[str, int]:
        """How many selected tests record, how many did, and how many recorded nothing by design
        (skipped outside the bench): the workers' counts under xdist."""
        selected, dropped = self.recording, self.dropped
        if self._collector is not None:
            selected, dropped = self._collector.selected, self._collector.dropped
        return {"selected": len(selected), "recorded": len(self.store.records), "dropped": len(dropped)}


def run_status(exitstatus: int, tests: dict[str, int] | None = None) -> str:
    """``passed`` only when pytest says so and every selected test left its record;
    ``interrupted`` when the run stopped or a record is missing; else ``failed``."""
    whole = tests is None or tests["recorded"] + tests["dropped"] >= tests["selected"]
    if exitstatus == 2 or not whole:
        return "interrupted"
    return "passed" if exitstatus == 0 else "failed"


def publish_report(document: dict[str, Any], directory: Path, names: tuple[str, ...]) -> list[Path]:
    """``report.publish.write_report``, imported when a run ends (markdown and plots cost a plain
    pytest run's start 75 ms)."""
    from .report.publish import write_report

    return write_report(document, directory, names)
