"""pytest-lora's hooks, and nothing else: options, markers, parametrization from the matrix,
collection, recording and the terminal summary (an xdist controller's hooks are ``dist.controller``'s).
The work lives in ``options``, ``bench`` (what ``--lora-bench`` runs), ``markers``, ``session``,
``fixtures``, ``matrix``, ``models``, ``measure`` and ``report``.

Importing this module (pytest does it in every project where pytest-lora is installed) imports
neither torch nor transformers; they load when a test first needs a model.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import pytest

from . import bench, data, hooks, markers, options, quiet, specs, summary
from . import budget
from .gate import confirm
from .dist import controller, journal, shard, workers
from .fixtures import (  # noqa: F401  (fixtures are found by pytest through this module)
    base_build,
    base_copy,
    base_model,
    lora_batch,
    lora_bench,
    lora_config,
    lora_device,
    lora_gpu,
    lora_matrix,
    lora_model,
    lora_session,
    quant_format,
    new_recorder,
)
from .keys import RECORD_KEY, RECORDER_KEY, SESSION_KEY
from .markers import suite_of
from .models import heap
from .session import LoraSession

MARKERS_KEY = pytest.StashKey[markers.SuiteMarkers]()
DIMENSIONS = {"model_spec": "models", "quant_spec": "quants", "lora_spec": "loras", "workload_spec": "workloads",
              "optimizer_spec": "optimizers", "serve_spec": "serving", "fine_tune_spec": "fine_tunes",
              "full_fine_tune_spec": "full_fine_tunes"}
SESSION_SCOPED = ("model_spec", "quant_spec")  # the base model's key: one build per value pair
# Fixtures that build or measure on the device: before them, nothing of a failed test may be alive.
LORA_FIXTURES = frozenset({"base_model", "lora_model", "lora_bench", "lora_gpu"})


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hooks)
    if not pluginmanager.is_registered(controller):
        pluginmanager.register(controller, "pytest_lora.dist.controller")  # the xdist controller's hooks


@pytest.hookimpl(trylast=True)
def pytest_lora_gpu(config: pytest.Config) -> Any:
    """The current CUDA device, when torch sees one."""
    from .measure import gpu

    return gpu.cuda_gpu()


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """``--lora-bench`` with no path runs the suites (``bench.suite_paths``).

    They become the run's paths here, before pytest loads the conftests of its ``testpaths``: a
    bench run in a project doesn't import that project's test setup.
    """
    namespace = early_config.known_args_namespace
    if namespace.file_or_dir or namespace.help or namespace.version:
        return
    settings = options.resolve(early_config, namespace)
    if settings["bench"].value:
        paths = [str(path) for path in bench.suite_paths(settings["suites"])]
        args.extend(paths)
        namespace.file_or_dir = paths


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: its own GPUs, before anything starts CUDA
        workers.pin(config.workerinput)
        workers.share_cpus(config.workerinput)
    config.stash[MARKERS_KEY] = markers.SuiteMarkers(config)
    config.addinivalue_line("markers", budget.MARKER_LINE)
    for line in quiet.WARNING_FILTERS:
        config.addinivalue_line("filterwarnings", line)
    lora = LoraSession(config)
    config.stash[SESSION_KEY] = lora
    if journal.WORKER_JOURNAL in getattr(config, "workerinput", {}):
        lora.run.journal = journal.Journal(config.workerinput[journal.WORKER_JOURNAL], on_failure=lora.run.stop_run)
    if lora.shard is not None:
        config.pluginmanager.register(shard.Sharding(*lora.shard), "lora-shard")
    if lora.configured:
        lora.matrix  # noqa: B018  (a bad value stops the run here, before collection: exit code 4)
        for marker in markers.suite_markers():
            lora.matrix_for(markers.short(marker))
        data.check(lora.settings, lora.matrix)


def pytest_sessionstart(session: pytest.Session) -> None:
    lora = session.config.stash[SESSION_KEY]
    lora.run.session = session
    lora.run.interrupts.install()
    lora.run.tidy_results_directory()


def pytest_unconfigure(config: pytest.Config) -> None:
    lora = config.stash.get(SESSION_KEY, None)
    if lora is not None:
        lora.run.interrupts.restore()


@pytest.hookimpl(wrapper=True)
def pytest_report_header(config: pytest.Config) -> Any:
    """Ours, each value with its source; under the bench every header line fits 120 columns
    (pytest-benchmark's one line of its defaults, which the bench's own timing does not use, is
    176: it is wrapped, not dropped)."""
    found = yield
    lora = config.stash[SESSION_KEY]
    if lora.bench:
        found = [summary.wrapped(lines) for lines in found]
    return [*found, options.header_lines(lora.settings)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that asks for a spec (directly or through a fixture) by the matrix."""
    wanted = [name for name in DIMENSIONS if name in metafunc.fixturenames]
    if not wanted:
        return
    lora = metafunc.config.stash[SESSION_KEY]
    marker = metafunc.definition.get_closest_marker("lora_matrix")
    keys = dict(marker.kwargs) if marker is not None else {}
    quantized = keys.pop("quantized", None)  # keep only quantized (True) or full-precision (False) bases
    if keys:
        where = f"lora_matrix marker of {metafunc.definition.nodeid}"
        matrix = lora.build_matrix(keys, where=where, base_dir=metafunc.definition.path.parent, suite=suite_of(metafunc.definition))
    else:
        matrix = lora.matrix_for(suite_of(metafunc.definition))
    for name in wanted:
        values = getattr(matrix, DIMENSIONS[name])
        if name == "quant_spec" and quantized is not None:
            values = tuple(q for q in values if q.is_quantized == quantized)
        scope = "session" if name in SESSION_SCOPED else "function"
        metafunc.parametrize(name, values, ids=[value.id for value in values], scope=scope)


@pytest.hookimpl(tryfirst=True)  # before xdist's: it reads the dist mode there
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Under ``-n`` the bench distributes by base (``--dist loadgroup``) unless the user chose a
    mode. Without workers a ``--dist`` (from a project's addopts) distributes nothing, but
    pytest-benchmark would read it as xdist and disable its timings: the bench drops it."""
    if not options.resolve(config)["bench"].value:
        return
    quiet_benchmark_table(config)
    chosen = any(arg == "--dist" or arg.startswith("--dist=") or arg == "-d" for arg in config.invocation_params.args)
    workers = getattr(config.option, "numprocesses", None) or getattr(config.option, "tx", None)
    if workers and not chosen:
        config.option.dist = "loadgroup"
    elif not workers and getattr(config.option, "dist", "no") != "no":
        config.option.dist = "no"


BENCHMARK_TABLE_OPTIONS = ("--benchmark-columns", "--benchmark-sort", "--benchmark-group-by", "--benchmark-name", "--benchmark-histogram",
                           "--benchmark-verbose", "--benchmark-cprofile")


def quiet_benchmark_table(config: pytest.Config) -> None:
    """Under the bench, pytest-benchmark's own table (a row of 218 columns per timed config) is
    left out: the bench's step-time table shows the same timings, and its JSON, compare and
    compare-fail work as before. Any option of that table brings it back."""
    if not any(arg.startswith(BENCHMARK_TABLE_OPTIONS) for arg in config.invocation_params.args) and hasattr(config.option, "benchmark_quiet"):
        config.option.benchmark_quiet = True


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lora = config.stash[SESSION_KEY]
    config.stash[MARKERS_KEY].mark(items)
    budget.check_markers(items)
    if not lora.bench:
        skip = pytest.mark.skip(reason="benchmark suite: run it with --lora-bench")
        for item in items:
            if suite_of(item):
                item.add_marker(skip)
    _check_targets(lora, [item for item in items if lora.bench or not suite_of(item)])


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    """Say so when ``-m`` names a short suite name that selects the project's own marker instead,
    and when a listing (``--co``) left the target check to the run."""
    lines = config.stash[MARKERS_KEY].notes(config.getoption("markexpr", "") or "")
    if config.stash[SESSION_KEY].targets_unchecked:
        lines.append("lora: target modules not checked in this listing (the models' module names are not cached yet); "
                     "a run checks them before any test")
    return lines


def _check_targets(lora: LoraSession, items: list[pytest.Item]) -> None:
    """Every (model, LoRA spec) that will run must name modules the model has: exit code 4 if not."""
    pairs: dict[tuple[Any, Any], set[str]] = {}  # (model, LoRA spec) -> the quality suite's inits of it
    quality_model = None
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "lora_spec" in params and "fine_tune_spec" in params:  # the quality suite: its model is not a dimension
            quality_model = quality_model or data.quality_model(lora.matrix, lora.device_kind)
            pairs.setdefault((quality_model, params["lora_spec"]), set()).add(params["fine_tune_spec"].init)
        elif "model_spec" in params and "lora_spec" in params:
            pairs.setdefault((params["model_spec"], params["lora_spec"]), set())
    if not pairs:
        return
    from .models import validate

    cache = getattr(lora.config, "cache", None)  # pytest's cache, unless -p no:cacheprovider
    models = dict.fromkeys(model for model, _ in pairs)
    if lora.config.option.collectonly and not all(validate.is_cached(model, cache) for model in models):
        lora.targets_unchecked = True  # a listing doesn't import transformers to build the models
        return
    architectures = {model: _architecture(lora, validate, model, cache) for model in models}  # once per model
    found = [problem for (model, spec), inits in pairs.items()
             for problem in validate.problems(model, spec, architectures[model], tuple(sorted(inits)))]
    by_source: dict[str, list[str]] = {}  # each problem under the option or file that set its key
    for problem in dict.fromkeys(found):
        key = "modules_to_save" if problem.startswith("modules_to_save ") else "inits" if problem.startswith("init ") else "targets"
        by_source.setdefault(lora.where_of(key), []).append(problem)
    if by_source:
        raise pytest.UsageError("\n".join(f"{where}: " + "\n  ".join(problems) for where, problems in by_source.items()))


def _architecture(lora: LoraSession, validate: Any, model: Any, cache: Any) -> Any:
    """The model's module names; a config.json that our checks or transformers refuse is a usage
    error naming the file and its field."""
    try:
        return validate.architecture(model, cache)
    except validate.ConfigProblem as error:
        raise pytest.UsageError(f"{lora.where_of('models')}: {model.path}: {error}") from None
    except Exception as error:  # transformers' own checks (ValueError) and huggingface_hub's field types (StrictDataclassError)
        reason = specs.shortened(" ".join(str(error).split()) or type(error).__name__, limit=300)
        raise pytest.UsageError(f"{lora.where_of('models')}: {model.path}: transformers refuses this config.json ({reason})") from None


@pytest.hookimpl(tryfirst=True)  # an xdist worker: before it tells the controller what it collected
def pytest_collection_finish(session: pytest.Session) -> None:
    lora = session.config.stash[SESSION_KEY]
    lora.tests_total = len(session.items)
    lora.run.recording = {item.nodeid for item in session.items if "lora_bench" in getattr(item, "fixturenames", ())}
    if lora.run.journal is not None:
        lora.run.journal.selected(sorted(lora.run.recording))
    if lora.run.journal is not None and lora.bench:
        lora.run.journal.groups({item.nodeid: shard.group_of(item) for item in session.items})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    lora = item.config.stash[SESSION_KEY]
    lora.tests_started += 1
    lora.current_test = specs.without_group(item.nodeid).rsplit("/", 1)[-1]
    if LORA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        _forget_last_failure()
    if "lora_bench" in getattr(item, "fixturenames", ()):
        item.stash[RECORDER_KEY] = new_recorder(item)
        if lora.run.journal is not None:  # the controller's record of this config if the worker dies in it
            lora.run.journal.started(item.nodeid, item.stash[RECORDER_KEY].to_record())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """A test with a GPU memory budget has its peak reserved bytes read around its call; a test
    whose ``lora_bench.check`` found something wrong fails once its body has recorded everything."""
    with budget.peak_watch(item, item.config.stash[SESSION_KEY]):
        result = yield
    recorder = item.stash.get(RECORDER_KEY, None)
    if recorder is not None and recorder.failed_checks:
        raise AssertionError("; ".join(recorder.failed_checks))
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Any:
    """``--lora-confirm``: once every test ran, the configs whose timing regressed run again.
    Where the suites run (not in an xdist controller), what is alive before the first test is
    out of the cycle collector's sight until the last (``models.heap``)."""
    lora = session.config.stash[SESSION_KEY]
    runs_here = lora.bench and (hasattr(session.config, "workerinput") or not getattr(session.config.option, "numprocesses", None))
    with heap.long_lived_frozen() if runs_here else contextlib.nullcontext():
        result = yield
        if lora.gate.confirm and not (session.shouldfail or session.shouldstop):
            confirm.rerun_regressed(session.items, lora)
    return result


def _forget_last_failure() -> None:
    """Drop the previous test's exception before this test's fixtures build and measure.

    pytest keeps a failed test's exception in ``sys.last_value`` / ``sys.last_exc`` (and its
    traceback, with every frame's tensors) until the next test's *call* starts, after that test's
    setup. A test that ran out of memory would otherwise keep its activations allocated while the
    next base is built and its "before" bytes are read, and could make it run out of memory too.
    """
    if not any(hasattr(sys, name) for name in ("last_value", "last_exc", "last_traceback")):
        return
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    import gc

    gc.collect()  # the traceback and its frames form cycles


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Give the test's record its status, and hand it to the store once the test is torn down."""
    report = yield
    recorder = item.stash.get(RECORDER_KEY, None)
    if recorder is None:
        return report
    if report.when == "call" and report.passed:
        over = budget.exceeded(item, recorder, item.config.stash[SESSION_KEY])
        if over:
            report.outcome, report.longrepr = "failed", over
    if report.failed and _is_oom(call.excinfo):
        recorder.fail("oom", _error_line(call.excinfo))
        _report_as_skipped(report, item, f"out of memory: {_error_line(call.excinfo)}")
    elif report.failed:
        recorder.fail("error", _error_line(call.excinfo) or str(report.longrepr).splitlines()[0])
    elif report.skipped:
        recorder.fail("skipped", _skip_reason(report))
    if report.when == "teardown":
        _deliver(item, recorder)
    return report


def _is_oom(excinfo: pytest.ExceptionInfo[BaseException] | None) -> bool:
    if excinfo is None:
        return False
    from .measure.gpu import is_out_of_memory

    return is_out_of_memory(excinfo.value)


def _report_as_skipped(report: pytest.TestReport, item: pytest.Item, reason: str) -> None:
    """A config that does not fit is a result (status ``oom``), not a broken test: the run goes on green."""
    if report.when in ("setup", "call"):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: {reason}")


def _error_line(excinfo: pytest.ExceptionInfo[BaseException] | None) -> str | None:
    """``TypeName: first line of the message``, for the record's ``error`` field."""
    if excinfo is None:
        return None
    message = str(excinfo.value).strip()
    return f"{excinfo.typename}: {message.splitlines()[0]}" if message else excinfo.typename


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


def _deliver(item: pytest.Item, recorder: Any) -> None:
    """Store the record; a test skipped before it ran records nothing unless the bench is on.
    A confirming rerun's record goes into its first run's record (``confirmation``)."""
    config = item.config
    lora = config.stash[SESSION_KEY]
    if recorder.status == "skipped" and not lora.bench:
        lora.run.dropped.add(item.nodeid)
        if lora.run.journal is not None:
            lora.run.journal.dropped(item.nodeid)
        return
    record = recorder.to_record()
    first = confirm.first_run(item)
    if first is not None:  # the first run's record is already with the store or the controller
        first["confirmation"] = confirm.confirmation_of(record)
        lora.run.deliver(first)
        return
    item.stash[RECORD_KEY] = record
    lora.run.deliver(record)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    lora = session.config.stash[SESSION_KEY]
    if lora.run.journal is not None:
        lora.run.journal.close()
    elif not hasattr(session.config, "workerinput"):
        with lora.run.interrupts.writing():  # a second Ctrl-C or SIGTERM must not cut the results
            session.exitstatus = lora.run.finish(int(session.exitstatus))


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> Any:
    """The results tables and the gate's verdict, after every other plugin's summary.

    pytest-benchmark's ``--benchmark-compare-fail`` fails a run by raising from its summary, after
    the results were written as passed: the run becomes ``failed`` in the results, with a line
    instead of a traceback, and exit status 1.
    """
    lora = config.stash[SESSION_KEY]
    try:
        result = yield
    except Exception as error:
        if type(error).__name__ != "PerformanceRegression":
            raise
        lora.run.fail_run("pytest-benchmark --benchmark-compare-fail: performance has regressed")
        terminalreporter.write_line("pytest-benchmark: performance has regressed (--benchmark-compare-fail); the run failed", red=True)
        result = None
    summary.write(terminalreporter, config, lora)
    return result
