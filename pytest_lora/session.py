"""The plugin's state for one pytest session, kept in ``config.stash``.

It resolves the options, the device and the matrix lazily: a pytest run that never touches a
LoRA fixture or the bench never imports torch. It owns the results store and counts base-model
builds (so that tests can prove each base is built once).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from . import budget
from .dist import shard, workers
from . import summary
from .dist.interrupts import Interrupts
from . import matrix as matrix_module
from . import options
from .matrix import Matrix, MatrixError, RawValue
from .gate.judge import Gate
from .results import provenance
from .results.store import ResultsStore, UnusableDirectory, check_directory
from .specs import whole_number

MATRIX_OPTIONS = ("models", "quant", "ranks", "targets", "optimizers")
DEVICES = ("auto", "cpu", "cuda")


class LoraSession:
    """Options, device, matrix, results store and build counts of one pytest session."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.settings = options.resolve(config)
        self.run_id = provenance.new_run_id()
        self.started = provenance.now()
        self.builds: Counter[tuple[str, str, str]] = Counter()
        self.store: ResultsStore | None = None
        self.journal: Any = None  # an xdist worker's journal.Journal: its records, as measured
        self._collector: Any = None  # the xdist controller's journal.Collector
        self._machine_sent: dict[str, Any] | None = None  # a worker's machine as last journaled
        self.worker_errors: dict[str, str] = {}  # why each worker that went down early did
        self.allocated_before_build: list[int] = []  # CUDA bytes allocated before each base build
        self._gpu: Any = "unresolved"
        self._layers: list[dict[str, RawValue]] | None = None
        self._matrix: Matrix | None = None
        self._peak: float | None | str = "unresolved"
        self.peak_source: str | None = None
        self.build_seconds: dict[tuple[str, str, str], float] = {}
        self.tests_total = 0  # selected tests, and how many have started: for the progress line
        self.tests_started = 0
        self.current_test = ""
        self.load_at_start = provenance.load_average()
        self.targets_unchecked = False  # a --co listing without the models' module names in the cache
        self.reruns = 0  # configs run again to confirm a timing regression (--lora-confirm)
        self.session: pytest.Session | None = None  # set when the session starts (the gate sets its exit status)
        self.stopped_by: str | None = None  # why the run was stopped early (a results write failed)
        self.interrupts = Interrupts()  # SIGINT and SIGTERM while the session runs
        self.unfinished: list[Path] = []  # logs of earlier runs that never finished, found at the start
        self.recording: set[str] = set()  # node ids of the selected tests that record (take lora_bench)
        self.dropped: set[str] = set()  # of those, the ones that recorded nothing by design (skipped outside the bench)
        self._machine: dict[str, Any] | None = None
        self._visible: list[str] | None = None
        self._check_device_name()
        self._check_timing_options()
        self._check_data_options()
        summary.check_report_option(self.settings["report"])
        self.shard = shard.parse(self.settings["shard"])  # (K, N) or None
        self.gpus_per_worker = workers.gpus_per_worker(self.settings["gpus_per_worker"])
        self.matrix_file = self._read_matrix_file()
        gate_table = None if self.matrix_file is None else self.matrix_file.gate
        gate_where = "" if self.matrix_file is None else f"{self.matrix_file.where} ({self.matrix_file.path.name}) [gate]"
        self.gate = Gate(self.settings, gate_table, gate_where)
        self.memory_limit = budget.option_limit(self.settings["limit_memory"])
        self._check_results_directory()

    # ----------------------------------------------------------------- options

    @property
    def bench(self) -> bool:
        return bool(self.settings["bench"].value)

    @property
    def configured(self) -> bool:
        """Whether the user asked for pytest-lora at all (bench or any option of the matrix)."""
        names = (*MATRIX_OPTIONS, "matrix", "device", "forget_data", "learn_data")
        return self.bench or any(self.settings[name].is_set for name in names)

    @property
    def records_wanted(self) -> bool:
        """Whether results are written: under the bench, or when a results directory is set."""
        return self.bench or self.settings["results"].is_set

    def _check_results_directory(self) -> None:
        """Before anything runs: the results directory can be written (an xdist worker writes
        nothing there; its controller checked)."""
        if not self.records_wanted or hasattr(self.config, "workerinput"):
            return
        try:
            check_directory(self.path_setting("results"), self.settings["results"].describe())
        except UnusableDirectory as error:
            raise pytest.UsageError(str(error)) from None

    def tidy_results_directory(self) -> None:
        """At the start of a run: remove the temporary files a killed write left (ours, by name,
        stale), and note the runs that never finished, for the summary."""
        if not self.records_wanted or hasattr(self.config, "workerinput"):
            return
        directory = self.path_setting("results")
        if directory.is_dir():
            from .results.store import remove_stale_temporaries, unfinished_runs

            remove_stale_temporaries(directory)
            self.unfinished = unfinished_runs(directory)

    def path_setting(self, name: str) -> Path:
        """A path option, relative to where it was written (``options.Setting.base_dir``)."""
        return self.settings[name].path()

    # ----------------------------------------------------------------- timing

    def _check_timing_options(self) -> None:
        for name, smallest, what in (("rounds", 1, "step"), ("warmup", 0, "step"), ("seeds", 1, "step"), ("threads", 1, "thread")):
            setting = self.settings[name]
            number = whole_number(setting.value)
            if setting.value is not None and (number is None or number < smallest):
                raise pytest.UsageError(f"{setting.describe()}: {setting.shown} is not a {what} count; allowed: an integer >= {smallest}")
        peak = self.settings["peak"]
        if str(peak.value).lower() not in ("auto", "measure") and not _positive_float(peak.value):
            raise pytest.UsageError(f"{peak.describe()}: {peak.shown} is not a peak; allowed: auto, measure or TFLOP/s as a finite positive number")

    def steps(self, name: str) -> int:
        """Timed rounds or warm-up steps: the option, else 10 / 3 on a GPU and 5 / 1 on the CPU."""
        value = self.settings[name].value
        if value is not None:
            return whole_number(value)
        return {"rounds": 10, "warmup": 3}[name] if self.gpu is not None else {"rounds": 5, "warmup": 1}[name]

    def peak_flops(self) -> float | None:
        """The device's dense bf16 FLOP/s for MFU (``None`` on the CPU), resolved once per session."""
        if self._peak == "unresolved":
            self._peak = self._resolve_peak()
        return self._peak

    def _resolve_peak(self) -> float | None:
        """The option's number, the data sheet of a known GPU, or a measured bf16 matrix product;
        ``peak_source`` says which."""
        if self.gpu is None:
            return None
        from .measure import timing

        choice = str(self.settings["peak"].value).lower()
        if _positive_float(choice):
            self.peak_source = f"{self.settings['peak'].describe()}"
            return float(choice) * 1e12
        known = timing.table_peak(self.gpu.name) if choice == "auto" else None
        if known:
            self.peak_source = f"data sheet, dense bf16: {timing.gpu_model(self.gpu.name)}"
            return known
        self.peak_source = "measured: bf16 8192^3 matrix product"
        return timing.measured_peak(self.gpu)

    def progress(self, label: str, total: int) -> Any:
        """A progress line for a long task of the current test: ``with ... as step: step(done)``."""
        from .progress import Progress

        return Progress(self.config, self.current_test, label, total, max(self.tests_total - self.tests_started, 0))

    def visible_devices(self) -> list[str]:
        """The GPUs this run may hand to xdist workers (``workers.visible_devices``), read once."""
        if self._visible is None:
            self._visible = workers.visible_devices(os.environ, workers.nvml_device_count)
        return self._visible

    def waiting(self, label: str) -> Any:
        """A line for one long call of the current test (a base's build), shown if it takes seconds."""
        from .progress import Waiting

        return Waiting(self.progress(label, 1))

    def timing_threads(self) -> int | None:
        """torch's thread count while timing steps: the option, else 1 on the CPU (a steady median
        on a shared machine), else ``None`` (torch's own count; host work is light on a GPU)."""
        value = self.settings["threads"].value
        if value is not None:
            return int(value)
        return 1 if self.gpu is None else None

    # ----------------------------------------------------------------- the forgetting experiment's data

    def _check_data_options(self) -> None:
        forget, learn = self.settings["forget_data"], self.settings["learn_data"]
        if bool(forget.value) != bool(learn.value):
            given, missing = (forget, learn) if forget.value else (learn, forget)
            raise pytest.UsageError(f"{given.describe()}: {given.shown} needs {missing.option.cli} too; allowed: both or neither")
        for setting in (forget, learn):
            if setting.value and not self.path_setting(setting.option.name).is_file():
                raise pytest.UsageError(f"{setting.describe()}: {setting.shown} does not exist; allowed: a text or JSONL file")

    def data_checkpoint(self) -> str | None:
        """The checkpoint the user's forget / learn data go with (``None`` for the synthetic tasks)."""
        if not self.settings["forget_data"].value:
            return None
        checkpoints = [m for m in self.matrix.models if m.kind == "checkpoint"]
        if len(checkpoints) != 1:
            setting = self.settings["forget_data"]
            raise pytest.UsageError(f"{setting.describe()}: the data need one local checkpoint in --lora-models (its tokenizer "
                                    f"reads them); found {len(checkpoints)}; allowed: exactly one checkpoint directory")
        return checkpoints[0].path

    def check_data(self) -> None:
        """The forget and learn files, read and tokenised as the experiment will: an empty, binary
        or too short file, or JSONL without ``text``, is a usage error before any test runs."""
        checkpoint = self.data_checkpoint()
        if checkpoint is None:
            return
        from .measure import forgetting

        forget, learn = self.settings["forget_data"], self.settings["learn_data"]
        try:
            forgetting.data_blocks(checkpoint, self.path_setting("forget_data"), self.path_setting("learn_data"))
        except forgetting.DataProblem as problem:
            setting, need = (forget, "one block") if problem.path == self.path_setting("forget_data") else \
                (learn, f"{forgetting.LEARN_BLOCKS} blocks (one held out, one to train on)")
            raise pytest.UsageError(f"{setting.describe()}: {setting.shown} {problem}; allowed: UTF-8 text or JSONL with a "
                                    f"\"text\" field, at least {need} of {forgetting.DATA_SEQ_LEN} tokens") from None

    # ----------------------------------------------------------------- device

    def _check_device_name(self) -> None:
        setting = self.settings["device"]
        if str(setting.value).lower() not in DEVICES:
            raise pytest.UsageError(f"{setting.describe()}: {setting.shown} is not a device; allowed: {', '.join(DEVICES)}")

    @property
    def gpu(self) -> Any:
        """The GPU the bench measures on (a ``measure.gpu.Gpu``), or ``None`` on the CPU.

        ``auto`` asks the ``pytest_lora_gpu`` hook (the current CUDA device, unless a plugin hands
        another); ``cuda`` requires one; ``cpu`` never asks. This imports torch.
        """
        if self._gpu == "unresolved":
            setting = self.settings["device"]
            wanted = str(setting.value).lower()
            found = None if wanted == "cpu" else self.config.hook.pytest_lora_gpu(config=self.config) or None
            if wanted == "cuda" and found is None:
                raise pytest.UsageError(f"{setting.describe()}: 'cuda' but torch sees no CUDA device; allowed here: auto, cpu")
            self._gpu = found
        return self._gpu

    def capacities(self) -> dict[int, int] | None:
        """The memory of each GPU this process owns, when it owns several (a base too large for one
        is spread over them: ``models.placement``); ``None`` on the CPU or with one GPU."""
        gpu = self.gpu
        return gpu.capacities() if gpu is not None and len(gpu.indices) > 1 else None

    @property
    def device(self) -> str:
        """Where tensors go: ``cuda`` with a GPU (a fake GPU keeps them on the CPU), else ``cpu``."""
        return self.gpu.placement if self.gpu is not None else "cpu"

    @property
    def device_kind(self) -> str:
        """``cuda`` or ``cpu``: which default matrix, which defaults, which measurements."""
        return "cpu" if self.gpu is None else "cuda"

    # ----------------------------------------------------------------- matrix

    def layers(self) -> list[dict[str, RawValue]]:
        """Default matrix for the device, then the --lora-matrix file, then single options."""
        if self._layers is None:
            layers = [matrix_module.default_layer(self.device_kind)]
            if self.matrix_file is not None:
                layers.append(self.matrix_file.layer)
            singles = {
                name: (str(self.settings[name].value), self.settings[name].describe(), self.settings[name].base_dir)
                for name in MATRIX_OPTIONS
                if self.settings[name].is_set
            }
            layers.append(matrix_module.option_layer(singles))
            self._layers = layers
        return self._layers

    def _read_matrix_file(self) -> matrix_module.MatrixFile | None:
        """The ``--lora-matrix`` file, read once: the matrix's keys and the gate's rules."""
        setting = self.settings["matrix"]
        if not setting.value:
            return None
        try:
            return matrix_module.read_file(self.path_setting("matrix"), setting.describe())
        except MatrixError as error:
            raise pytest.UsageError(str(error)) from None

    def where_of(self, key: str) -> str:
        """Where the value of a matrix key came from (the last layer that set it)."""
        wheres = [layer[key].where for layer in self.layers() if key in layer]
        return wheres[-1] if wheres else key

    @property
    def matrix(self) -> Matrix:
        """The session's matrix; a bad value is a ``pytest.UsageError`` (exit code 4)."""
        if self._matrix is None:
            self._matrix = self.build_matrix()
        return self._matrix

    def build_matrix(self, overrides: dict[str, Any] | None = None, where: str = "", base_dir: Path | None = None) -> Matrix:
        """The session's matrix, with some keys replaced (a test's ``lora_matrix`` marker, whose
        relative paths are relative to the test's file: ``base_dir``)."""
        try:
            layers = list(self.layers())
            if overrides:
                layers.append(matrix_module.mapping_layer(overrides, where, base_dir))
            return matrix_module.build(layers, base_dir=self.config.invocation_params.dir)
        except MatrixError as error:
            raise pytest.UsageError(str(error)) from None

    # ----------------------------------------------------------------- results

    @property
    def machine(self) -> dict[str, Any]:
        """The machine section of the results: device, libraries, CPU, threads (once per session)."""
        if self._machine is None:
            gpu = None if self._gpu == "unresolved" else self._gpu
            self._machine = provenance.machine_info(gpu)
            self._machine["load_avg_start"] = self.load_at_start
            self._machine["cpu_threads"] = self.timing_threads()
        return self._machine

    def machine_section(self) -> dict[str, Any]:
        """The machine, with the MFU peak once a GPU's peak was resolved (the dict the store holds)."""
        machine = self.machine
        if self.peak_source is not None:
            machine["mfu_peak_tflops"] = self._peak / 1e12
            machine["mfu_peak_source"] = self.peak_source
        return machine

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
            machine = self.machine_section()
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
                self._collector = journal.Collector(journal.directory_of(self.path_setting("results"), self.run_id))
            else:  # no results directory: the journals live as long as the run
                self._collector = journal.Collector(Path(tempfile.mkdtemp(prefix="pytest-lora-")))
        return self._collector

    def collect(self, worker_id: str) -> None:
        """Take worker ``worker_id``'s new records and builds into the run (written at once)."""
        if self._collector is None:
            return
        arrivals = self._collector.collect(worker_id)
        if arrivals.machine is not None:  # the controller never touches the GPUs its workers measure on
            self.machine.update(arrivals.machine)
        self.builds.update(arrivals.builds)
        if arrivals.records or arrivals.builds:
            self.add_records(*arrivals.records)

    def test_groups(self) -> dict[str, str]:
        """Each collected test's group, as the workers named them (read by ``scheduling``)."""
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
            run = provenance.run_info(self.run_id, self.started, argv, self.config.rootpath)
            if self.shard is not None:
                run["shard"] = f"{self.shard[0]}/{self.shard[1]}"
            directory = self.path_setting("results") if self.records_wanted else None
            self.store = ResultsStore(directory, run, self.machine_section(), publish=publish_report)
        self.machine_section()
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


def _positive_float(value: Any) -> bool:
    """A finite number above 0 (``inf`` and ``1e400`` would make every MFU read 0.0)."""
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def publish_report(document: dict[str, Any], directory: Path, names: tuple[str, ...]) -> list[Path]:
    """``report.publish.write_report``, imported when a run ends (markdown and plots cost a plain
    pytest run's start 75 ms)."""
    from .report.publish import write_report

    return write_report(document, directory, names)
