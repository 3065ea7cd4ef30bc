"""The plugin's state for one pytest session, kept in ``config.stash``: its settings, its device
and its matrix.

It resolves the device and the matrix lazily: a pytest run that never touches a LoRA fixture or
the bench never imports torch. The run's records, their store and the run's end are its ``run``
(``run.Run``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from . import budget, data, options
from . import matrix as matrix_module
from .dist import shard, workers
from .gate.judge import Gate
from .markers import short, suite_markers
from .matrix import Matrix, MatrixError, RawValue
from .results import provenance
from .run import Run
from .specs import whole_number

MATRIX_OPTIONS = ("models", "quant", "ranks", "targets", "optimizers", "learning_rates", "inits", "full_learning_rates")


class LoraSession:
    """Settings, device and matrix of one pytest session, and its run (``run``)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.settings = options.resolve(config)
        self.allocated_before_build: list[int] = []  # CUDA bytes allocated before each base build
        self._gpu: Any = "unresolved"
        self._layers: dict[str | None, list[dict[str, RawValue]]] = {}
        self._matrix: Matrix | None = None
        self._suite_matrices: dict[str, Matrix] = {}
        self._peak: float | None | str = "unresolved"
        self.peak_source: str | None = None
        self.tests_total = 0  # selected tests, and how many have started: for the progress line
        self.tests_started = 0
        self.current_test = ""
        self.load_at_start = provenance.load_average()
        self.targets_unchecked = False  # a --co listing without the models' module names in the cache
        self._machine: dict[str, Any] | None = None
        self._visible: list[str] | None = None
        self.shard = shard.parse(self.settings["shard"])  # (K, N) or None
        self.gpus_per_worker = workers.gpus_per_worker(self.settings["gpus_per_worker"])
        self.matrix_file = self._read_matrix_file()
        gate_table = None if self.matrix_file is None else self.matrix_file.gate
        gate_where = "" if self.matrix_file is None else f"{self.matrix_file.where} ({self.matrix_file.path.name}) [gate]"
        self.gate = Gate.of_settings(self.settings, gate_table, gate_where)
        self.memory_limit = budget.option_limit(self.settings["limit_memory"])
        self.run = Run(config, self.settings, self.gate, self.shard, self.machine_section)  # records, store, journals, the end
        self.run.check_results_directory()

    # ----------------------------------------------------------------- options

    @property
    def bench(self) -> bool:
        return bool(self.settings["bench"].value)

    @property
    def configured(self) -> bool:
        """Whether the user asked for pytest-lora at all (bench or any option of the matrix)."""
        names = (*MATRIX_OPTIONS, "matrix", "device", "forget_data", "learn_data")
        return self.bench or any(self.settings[name].is_set for name in names)

    def path_setting(self, name: str) -> Path:
        """A path option, relative to where it was written (``options.Setting.base_dir``)."""
        return self.settings[name].path()

    # ----------------------------------------------------------------- timing

    def steps(self, name: str) -> int:
        """Timed rounds or warm-up steps: the option, else 10 / 3 on a GPU and 5 / 1 on the CPU."""
        value = self.settings[name].value
        if value is not None:
            return whole_number(value)
        return {"rounds": 10, "warmup": 3}[name] if self.gpu is not None else {"rounds": 5, "warmup": 1}[name]

    def peak_flops(self) -> float | None:
        """The device's dense bf16 FLOP/s for MFU (``None`` on the CPU), resolved once per session;
        ``peak_source`` says where it came from (``measure.timing.resolve_peak``)."""
        if self._peak == "unresolved":
            self._peak, self.peak_source = None, None
            if self.gpu is not None:
                from .measure import timing

                self._peak, self.peak_source = timing.resolve_peak(self.gpu, str(self.settings["peak"].value), self.settings["peak"].describe())
        return self._peak

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

    def data_checkpoint(self) -> str | None:
        """The checkpoint the user's forget / learn data go with (``None`` for the synthetic tasks)."""
        return data.checkpoint(self.settings, self.matrix)

    def forgetting_options(self) -> dict[str, Any]:
        """The forgetting experiment's sizes and learning rates the user set (``--lora-forget-*``)."""
        return data.experiment_options(self.settings)

    def pretrained_checkpoint(self) -> Any:
        """The matrix's first checkpoint with a tokenizer (a ``ModelSpec``), or ``None``."""
        return data.pretrained_checkpoint(self.matrix)

    # ----------------------------------------------------------------- device

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

    def layers(self, suite: str | None = None) -> list[dict[str, RawValue]]:
        """Default matrix for the device, then the --lora-matrix file, then single options; for a
        suite, each layer's table for it (``[quality]``) right after that layer."""
        if suite not in self._layers:
            layers = [matrix_module.default_layer(self.device_kind)]
            if suite is not None:
                layers.append(matrix_module.default_layer(self.device_kind, suite))
            if self.matrix_file is not None:
                layers.append(self.matrix_file.layer)
                if suite is not None:
                    layers.append(self.matrix_file.suite_layer(suite))
            singles = {
                name: (str(self.settings[name].value), self.settings[name].describe(), self.settings[name].base_dir)
                for name in MATRIX_OPTIONS
                if self.settings[name].is_set
            }
            layers.append(matrix_module.option_layer(singles))
            self._layers[suite] = layers
        return self._layers[suite]

    def _read_matrix_file(self) -> matrix_module.MatrixFile | None:
        """The ``--lora-matrix`` file, read once: the matrix's keys and the gate's rules."""
        setting = self.settings["matrix"]
        if not setting.value:
            return None
        path = self.path_setting("matrix")
        if not path.exists() and str(setting.value) in matrix_module.EMBEDDED_MATRICES:  # --lora-matrix=real
            path = matrix_module.EMBEDDED_MATRICES[str(setting.value)]
        try:
            found = matrix_module.read_file(path, setting.describe())
            matrix_module.check_suite_tables(found, (short(marker) for marker in suite_markers()))
            return found
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

    def matrix_for(self, suite: str | None) -> Matrix:
        """The matrix of one suite's tests: the session's, with the layers' tables for the suite;
        a bad value is a ``pytest.UsageError``."""
        if suite is None or not self.has_suite_table(suite):
            return self.matrix
        if suite not in self._suite_matrices:
            self._suite_matrices[suite] = self.build_matrix(suite=suite)
        return self._suite_matrices[suite]

    def has_suite_table(self, suite: str) -> bool:
        """Whether the default matrix or the ``--lora-matrix`` file gives ``suite`` keys of its own."""
        in_file = self.matrix_file is not None and suite in self.matrix_file.suites
        return in_file or bool(matrix_module.default_layer(self.device_kind, suite))

    def build_matrix(self, overrides: dict[str, Any] | None = None, where: str = "", base_dir: Path | None = None,
                     suite: str | None = None) -> Matrix:
        """The session's matrix (a suite's, with ``suite``), with some keys replaced (a test's
        ``lora_matrix`` marker, whose relative paths are relative to the test's file: ``base_dir``)."""
        try:
            layers = list(self.layers(suite))
            if overrides:
                layers.append(matrix_module.mapping_layer(overrides, where, base_dir))
            return matrix_module.build(layers, base_dir=self.config.invocation_params.dir, narrowed=bool(overrides))
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
