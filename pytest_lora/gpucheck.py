"""``make gpu-check``: one command that proves a GPU run, and says so in one table.

A GPU is lent now and then, for minutes: the run must be right the first time and must show
that it was. This runs the suites on a short GPU matrix (the Llama-3.2-1B shape in bf16 and nf4
at batch 4, the Llama-3.1-8B shape in nf4 at batch 2 with and without gradient checkpointing;
sequence 2048, LoRA r=16 on all linear layers, no dropout: the configs of the H200 reference
figures), then reads the records and checks what a GPU run must hold:

* every base ready in under 1 s (built in its dtype on the device, quantized in place; a
  per-layer ``Params4bit(...).to("cuda")`` loop took 44 s for the 8B nf4 shape), built once;
* the harness's step within 1% of a bare loop of the same step timed with CUDA events;
* the step's peak allocated bytes (less what the process held before the base was built)
  within 5% of the analytic step model, 15% with gradient checkpointing;
* the CUDA-event step time within 1% of the host clock read after waiting for the end event;
* memory back where it was after each config, and no growth before each base's build (64 MiB);
* NVML's device bytes >= torch's reserved >= allocated; within each phase of the step, the peak
  at least what was allocated during it, and the optimizer step's peak below the backward pass's
  (a peak read before its phase's reset breaks these);
* every test passed (an ``oom`` or ``error`` record fails the check), and every run finished;

and prints the H200 reference figures (``pytest_lora.references``) beside ours. The exit code
is 0 only when every check holds. On an offline GPU host: ``bash .gpu/run-on-gpu.sh make
gpu-check OFFLINE=1``.

A lent GPU comes with a time limit, so the run is sized by an estimate (``estimate``: 6 minutes
at most, so that starting the machine, one run and a rerun fit in 15), writes its verdict after
each pytest run (a run stopped at the limit leaves what it finished; the stopped run's records
are in its results log), and with ``--budget-s`` starts a run only when its estimate fits in
what is left.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import references
from .report import catalog
from .report.table import case_cell, format_value, function_name
from .results import store
from .specs import OPTIMIZERS, QUANTIZATIONS

MiB = 2**20
BUILD_LIMIT_S = 1.0
OVERHEAD_LIMIT_PCT = 1.0
PEAK_TOLERANCE, PEAK_TOLERANCE_CKPT = 0.05, 0.15
CLOCK_TOLERANCE = 0.01
LEAK_LIMIT = 64 * MiB
TARGET_S = 360.0  # a cold start (minutes), one run and one rerun in 15 minutes of device time

# One pytest run per entry: the cross product of each is exactly the configs of the reference figures.
# The 1B shape takes AdamW (its H200 figures) and paged 8-bit AdamW (bitsandbytes' 8-bit state and
# paging, under pressure too); the 8B shape AdamW, and only the suites its H200 figures are about.
RUNS = (
    {"name": "llama-3.2-1b", "models": ["llama-3.2-1b"], "quant": ["bf16", "nf4"], "batch": [4], "grad_ckpt": [False],
     "optimizers": ["adamw", "paged_adamw8bit"], "suites": ["params", "memory", "step_time", "merge", "serving"]},
    {"name": "llama-3.1-8b", "models": ["llama-3.1-8b"], "quant": ["nf4"], "batch": [2], "grad_ckpt": [False, True], "optimizers": ["adamw"],
     "suites": ["memory", "step_time"]},
)
COMMON = {"ranks": [16], "alpha": ["2r"], "targets": ["all-linear"], "dropout": [0.0], "variants": ["lora"], "seq_len": [2048], "compile": [False],
          "prompt_len": [512], "new_tokens": [8], "serve_batch": [4]}
STEPS = {"warmup": 2, "rounds": 6}  # the H200 reference's own: the median of 6 steps after 2 warm-up steps
# Tests left out (-k): the published counts and analytic shapes compute on the meta device, the same
# on any machine; the trained-model merge first trains a task model for 600 steps. So does the
# forgetting suite, which no run names: both measure a synthetic task, which the CPU bench runs.
LEFT_OUT = ("published", "trained_model")
NOT_MATRIX = ("name", "suites")


@dataclass(frozen=True)
class Check:
    """One line of the verdict: what was checked, on what, the value, the limit, and whether it held
    (``None``: shown for information, e.g. a reference figure)."""

    name: str
    subject: str
    value: str
    limit: str
    ok: bool | None


# --------------------------------------------------------------------------- running


def matrix_toml(run: dict[str, Any]) -> str:
    """The ``--lora-matrix`` file of one run."""
    lines = []
    for key, value in {**COMMON, **{k: v for k, v in run.items() if k not in NOT_MATRIX}}.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"  # JSON's lists, strings and booleans are TOML's too


def pytest_args(run: dict[str, Any], directory: Path, suites: str | None = None) -> list[str]:
    """The pytest command line of one run (its suites by marker, ``LEFT_OUT`` deselected, the
    reference's warm-up and timed steps); its matrix file and results go under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    matrix = directory / "matrix.toml"
    matrix.write_text(matrix_toml(run), encoding="utf-8")
    args = ["--lora-bench", "--lora-device=cuda", f"--lora-matrix={matrix}", f"--lora-results={directory}", "-p", "no:cacheprovider", "-q",
            f"--lora-warmup={STEPS['warmup']}", f"--lora-rounds={STEPS['rounds']}", "-k", " and ".join(f"not {name}" for name in LEFT_OUT)]
    if "suites" in run:
        args += ["-m", " or ".join(f"lora_{name}" for name in run["suites"])]
    if suites:
        args.insert(0, suites)
    if not _plugin_installed():
        args += ["-p", "pytest_lora.plugin"]  # a checkout on PYTHONPATH (run-on-gpu.sh), not installed
    return args


def _plugin_installed() -> bool:
    return any(entry.value == "pytest_lora.plugin" for entry in metadata.entry_points(group="pytest11"))


def _pytest_main(args: list[str]) -> int:  # pragma: no cover - on a GPU host; tests invoke each run through pytester
    import pytest

    return int(pytest.main(args))


Invoke = Callable[[dict[str, Any], Path], int]


def run_all(directory: Path, extra: Sequence[str] = (), runs: Sequence[dict[str, Any]] = RUNS, budget_s: float | None = None,
            invoke: Invoke | None = None, clock: Callable[[], float] = time.monotonic, estimates: Sequence[float] | None = None) -> list[Check]:
    """Each run in turn (``invoke(run, its directory)`` gives its pytest exit code), the verdict
    rewritten on disk before and after each: a run stopped at a time limit leaves every finished
    run's checks, itself as started and not finished, the rest as not started. With ``budget_s``,
    a run starts only when its estimate fits in what is left; else none starts any more, and the
    verdict says why. ``estimates``: each run's seconds (``run_seconds`` by default)."""
    invoke = invoke or (lambda run, where: _pytest_main(pytest_args(run, where) + list(extra)))
    started = clock()
    estimates = estimates or [run_seconds(run, first=index == 0) for index, run in enumerate(runs)]
    states = [{"name": run["name"], "status": "not started", "estimate_s": round(seconds, 1)} for run, seconds in zip(runs, estimates)]
    records: list[dict[str, Any]] = []
    for index, (run, state) in enumerate(zip(runs, states)):
        left = None if budget_s is None else budget_s - (clock() - started)
        if left is not None and left < state["estimate_s"]:
            for later in states[index:]:
                later.update(status="skipped", reason=f"{left:.0f} s of the {budget_s:g} s budget left when {run['name']} "
                                                       f"was next, its estimate {state['estimate_s']:.0f} s")
            break
        where = directory / run["name"]
        (where / "latest.json").unlink(missing_ok=True)  # an earlier gpu-check's: this run writes its own
        state.update(status="running", directory=str(where))
        write_verdict(directory, states, records, budget_s, clock() - started)
        begun = clock()
        code = invoke(run, where)
        state.update(status="finished", exit_code=int(code), seconds=round(clock() - begun, 1))
        records += run_records(where)
        write_verdict(directory, states, records, budget_s, clock() - started)
    return write_verdict(directory, states, records, budget_s, clock() - started)


def run_records(where: Path) -> list[dict[str, Any]]:
    """A finished run's records (none when it wrote no results: a usage error, a crash)."""
    latest = where / "latest.json"
    return store.load(latest)["records"] if latest.is_file() else []


def run_lines(states: Iterable[dict[str, Any]]) -> list[Check]:
    """One line per run: finished with exit 0, or why not."""
    lines = []
    for state in states:
        status, name = state["status"], state["name"]
        if status == "finished":
            value = f"exit {state['exit_code']} in {state['seconds']:g} s (estimate {state['estimate_s']:g} s)"
            lines.append(Check("run finished", name, value, "exit 0", state["exit_code"] == 0))
        elif status == "running":
            value = f"started, not finished: its records so far are in {state['directory']}/*.jsonl"
            lines.append(Check("run finished", name, value, "exit 0", False))
        elif status == "skipped":
            lines.append(Check("run finished", name, f"not started: {state['reason']}", "fits the budget", False))
        else:
            lines.append(Check("run finished", name, "not started yet", "exit 0", False))
    return lines


def write_verdict(directory: Path, states: list[dict[str, Any]], records: list[dict[str, Any]], budget_s: float | None,
                  elapsed_s: float) -> list[Check]:
    """``verdict.txt`` and ``verdict.json`` from the runs so far, each replaced whole (never half written)."""
    checks = run_lines(states) + verdict(records, expect_records=any(s["status"] == "finished" for s in states))
    document = {"complete": all(s["status"] == "finished" for s in states), "passed": sum(c.ok is True for c in checks),
                "failed": sum(c.ok is False for c in checks), "elapsed_s": round(elapsed_s, 1), "budget_s": budget_s,
                "runs": states, "checks": [asdict(c) for c in checks]}
    store.atomic_write_text(directory / "verdict.txt", render(checks))
    store.atomic_write_json(directory / "verdict.json", document)
    return checks


# --------------------------------------------------------------------------- the verdict


def verdict(records: Iterable[dict[str, Any]], figures: Iterable[references.StepFigure] = references.H200, expect_records: bool = True) -> list[Check]:
    """Every check of a GPU run, from its records (none is a failure where a run has finished)."""
    records = list(records)
    checks: list[Check] = []
    for record in records:
        test = function_name(record)
        check = _CHECKS.get(test)
        if check is not None:
            checks += check(record["metrics"], _subject(record), record.get("workload") or {})
        if record["status"] in ("error", "oom"):
            checks.append(Check("test passed", f"{test} {_subject(record)}", record["status"], "ok", False))
    if not records and expect_records:
        checks.append(Check("records", "the run", "none", "at least one", False))
    return checks + _reference_lines(records, figures)


def _build(metrics: dict[str, Any], subject: str, workload: dict[str, Any]) -> list[Check]:
    seconds, builds = metrics.get("build_time_s"), metrics.get("builds")
    return [
        Check("base ready", subject, _fmt(seconds, "s"), f"<= {BUILD_LIMIT_S:g} s", seconds is not None and seconds <= BUILD_LIMIT_S),
        Check("base built once", subject, _fmt(builds, ""), "== 1", builds == 1),
    ]


def _overhead(metrics: dict[str, Any], subject: str, workload: dict[str, Any]) -> list[Check]:
    pct = metrics.get("harness_overhead_pct")
    return [Check("harness overhead", subject, _fmt(pct, "%"), f"<= {OVERHEAD_LIMIT_PCT:g}%", pct is not None and pct <= OVERHEAD_LIMIT_PCT)]


def _clocks(metrics: dict[str, Any], subject: str, workload: dict[str, Any]) -> list[Check]:
    ratio = metrics.get("event_over_host")
    ok = ratio is not None and abs(ratio - 1) <= CLOCK_TOLERANCE
    return [Check("CUDA events vs host clock", subject, _fmt(ratio, "x"), f"1 +- {CLOCK_TOLERANCE:g}", ok)]


def _memory(metrics: dict[str, Any], subject: str, workload: dict[str, Any]) -> list[Check]:
    checks = []
    ratio = metrics.get("peak_over_analytic")
    tolerance = PEAK_TOLERANCE_CKPT if workload.get("grad_ckpt") else PEAK_TOLERANCE
    checks.append(Check("peak vs analytic step", subject, _fmt(ratio, "x"), f"1 +- {tolerance:g}", ratio is not None and abs(ratio - 1) <= tolerance))
    for name, label in (("leaked_bytes", "released after the config"), ("growth_between_bases_bytes", "no growth between bases")):
        value = metrics.get(name)
        checks.append(Check(label, subject, _fmt_bytes(value), f"<= {LEAK_LIMIT // MiB} MiB", value is not None and value <= LEAK_LIMIT))
    device, reserved, allocated = (metrics.get(n) for n in ("peak_device_bytes", "peak_reserved_bytes", "peak_allocated_bytes"))
    ordered = None not in (device, reserved, allocated) and device >= reserved >= allocated
    checks.append(Check("NVML >= reserved >= allocated", subject, " >= ".join(_fmt_bytes(v) for v in (device, reserved, allocated)), "ordered", ordered))
    problem = _phase_problem(metrics)
    checks.append(Check("phase peaks cover their phase", subject, problem or "yes", "peak >= allocated", problem is None))
    return checks


def _phase_problem(metrics: dict[str, Any]) -> str | None:
    """A phase whose peak is below what was allocated during it, or an optimizer step that peaks
    as high as the backward pass (whose activations it no longer holds): each phase's peak was not
    read after its own reset on the model's device."""
    pairs = (
        ("forward_peak_bytes", "adapter_allocated_bytes"),
        ("forward_peak_bytes", "forward_allocated_bytes"),
        ("backward_peak_bytes", "forward_allocated_bytes"),
        ("optimizer_peak_bytes", "after_step_allocated_bytes"),
    )
    for peak, allocated in pairs:
        if metrics.get(peak) is None or metrics.get(allocated) is None:
            return f"{peak} missing"
        if metrics[peak] < metrics[allocated]:
            return f"{peak} < {allocated}"
    if metrics["optimizer_peak_bytes"] >= metrics["backward_peak_bytes"]:  # the activations are gone by the optimizer step
        return "optimizer_peak_bytes >= backward_peak_bytes"
    return None


_CHECKS = {
    catalog.BASE_BUILD_TIME: _build,
    catalog.HARNESS_OVERHEAD: _overhead,
    catalog.STEP_TIME: _clocks,
    catalog.STEP_PEAK_MEMORY: _memory,
}


def _reference_lines(records: list[dict[str, Any]], figures: Iterable[references.StepFigure]) -> list[Check]:
    """Ours beside the H200 reference, for the configs both have (information, not a check)."""
    lines = []
    for figure in figures:
        for record in records:
            workload = record.get("workload") or {}
            key = (record.get("model"), record.get("quant"), workload.get("batch"), workload.get("grad_ckpt"))
            if key != figure.key:
                continue
            metrics, subject = record["metrics"], _subject(record)
            test = function_name(record)
            if test == catalog.STEP_TIME and metrics.get("step_time_median_s"):
                lines.append(Check("reference: step time", subject, _fmt(metrics["step_time_median_s"] * 1000, "ms"), f"H200 {figure.step_ms:g} ms", None))
            if test == catalog.STEP_PEAK_MEMORY and metrics.get("peak_allocated_bytes"):
                lines.append(Check("reference: peak allocated", subject, _fmt_bytes(metrics["peak_allocated_bytes"]), f"H200 {figure.peak_allocated_gib:g} GiB", None))
    return lines


def _subject(record: dict[str, Any]) -> str:
    """model quant workload, as the results tables write them."""
    parts = [record.get("model"), record.get("quant"), case_cell("workload", record["workload"]) if record.get("workload") else None]
    return " ".join(p for p in parts if p)


def _fmt(value: Any, unit: str) -> str:
    return "missing" if value is None else f"{format_value(value)} {unit}".strip()


def _fmt_bytes(value: Any) -> str:
    return "missing" if value is None else f"{value / 2**30:.3f} GiB" if abs(value) >= 2**30 else f"{value / MiB:.1f} MiB"


def render(checks: list[Check]) -> str:
    """The verdict as a plain-text table, one line per check, failures first."""
    rows = [("", "check", "config", "value", "limit")]
    order = sorted(checks, key=lambda c: {False: 0, True: 1, None: 2}[c.ok])
    rows += [({False: "FAIL", True: "ok", None: "info"}[c.ok], c.name, c.subject, c.value, c.limit) for c in order]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    failed = sum(c.ok is False for c in checks)
    passed = sum(c.ok is True for c in checks)
    lines.append(f"gpu-check: {passed} passed, {failed} failed")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- how long it takes on one H200


@dataclass(frozen=True)
class Figure:
    """A number the estimate uses and where it comes from: ``ref`` is one of the H200 reference
    figures (``pytest_lora.references``, from shared/device/README.md), ``assumed`` says why."""

    value: float
    source: str


REF = "ref"
FIGURES = {
    "imports": Figure(12.0, "assumed: python, torch, transformers, peft, bitsandbytes imported (9.5-10.4 s on this project's 2-core CPU host, rounded up)"),
    "cuda_init": Figure(5.0, "assumed: CUDA context, cuBLAS handles, NVML (no reference figure)"),
    "session": Figure(6.0, "assumed: a pytest session's collection, report, CSV and plots (1.4-1.6 s for one test on the CPU host through the fakes, 6 s taken)"),
    "per_test": Figure(0.5, "assumed: a test's fixtures on a real shape: peft wraps 112-224 layers, gc, the cache emptied"),
    "build": Figure(references.BUILD_S, f"{REF}: the 8B shape in nf4, built in bf16 0.08 s and quantized in place 0.15 s, taken for every base"),
    "first_step": Figure(references.FIRST_STEP_S, f"{REF}: the first step, 2.45 s (library and allocator warm-up), counted once per base (assumed: it may be once per process)"),
    "save_s_per_gib": Figure(references.SAVE_PRETRAINED_S / references.SAVE_PRETRAINED_GIB, f"{REF}: save_pretrained of the 1B shape 4.2 s (its 2.87 GiB of bf16 weights assumed)"),
    "from_pretrained": Figure(references.FROM_PRETRAINED_S, f"{REF}: from_pretrained of the 1B shape in 4-bit 0.53 s"),
    "forward_share": Figure(0.5, "assumed: a forward pass is half a LoRA step (2N of its 4N FLOPs a token, measure.flops), prefill at that rate"),
    "host_pass_s_per_g": Figure(12.0, "assumed: 12 s per 10^9 adapted weights for a float64 check on the host (3 device copies of 8 B a weight, ~5 passes)"),
}
DECODE_TOKEN_S = {  # eager decoding with the KV cache is bound by kernel launches: by the layers, not the FLOPs
    "llama-3.2-1b": Figure(0.04, "assumed: 40 ms a decoded token, 16 layers"),
    "llama-3.1-8b": Figure(0.08, "assumed: 80 ms a decoded token, 32 layers"),
}
MIXED_ADAPTERS = (1, 4, 16)  # suites/test_serving.py's ADAPTER_COUNTS


@dataclass(frozen=True)
class Part:
    """One line of the estimate: a run, what in it takes the time, seconds, and where the figures come from."""

    run: str
    part: str
    seconds: float
    source: str


def estimate(runs: Sequence[dict[str, Any]] = RUNS) -> list[Part]:
    """``make gpu-check``'s wall time on one H200, part by part, from the run plan and ``FIGURES``.
    A config or suite the figures do not cover raises ``KeyError``: add a figure, or an assumption
    that says it is one, before the run grows past ``TARGET_S``."""
    first = runs[0]["name"]
    parts = [Part(first, "imports (once)", FIGURES["imports"].value, FIGURES["imports"].source),
             Part(first, "CUDA init (once)", FIGURES["cuda_init"].value, FIGURES["cuda_init"].source)]
    for run in runs:
        parts += [Part(run["name"], *part) for part in _run_parts({**COMMON, **run})]
    return parts


def run_seconds(run: dict[str, Any], first: bool = False) -> float:
    """One run's estimate; the first also imports and initialises CUDA (one process runs them all)."""
    parts = estimate([run])
    return sum(p.seconds for p in parts if first or "(once)" not in p.part)


def _run_parts(plan: dict[str, Any]) -> list[tuple[str, float, str]]:
    """One run's (part, seconds, source): its session and bases, then each suite it names, whose
    estimator (``_SUITE_PARTS``) gives its parts and how many of its tests use a base."""
    bases = [(model, quant) for model in plan["models"] for quant in plan["quant"]]
    workloads = list(itertools.product(plan["batch"], plan["seq_len"], plan["grad_ckpt"]))
    configs = [(m, q, w, o) for (m, q) in bases for w in workloads for o in plan["optimizers"] for _ in range(_loras(plan)) for _ in plan["compile"]]
    parts = [("pytest session", FIGURES["session"].value, FIGURES["session"].source),
             (f"base builds: {len(bases)}", len(bases) * FIGURES["build"].value, FIGURES["build"].source),
             (f"first steps: {len(bases)} bases", len(bases) * FIGURES["first_step"].value, FIGURES["first_step"].source)]
    tests = 0
    if "suites" not in plan:
        raise KeyError(f"{plan['name']} names no suites: it would run every suite, new ones unestimated")
    for suite in plan["suites"]:
        if suite not in _SUITE_PARTS:
            raise KeyError(f"no estimate for the {suite} suite on a GPU: add one to gpucheck._SUITE_PARTS")
        more, count = _SUITE_PARTS[suite](plan, bases, workloads, configs)
        parts += more
        tests += count
    parts.append((f"fixtures: {tests} tests on a base", tests * FIGURES["per_test"].value, FIGURES["per_test"].source))
    return [part for part in parts if part[1] > 0]


def step_figure(model: str, quant: str, workload: tuple[int, int, bool]) -> Figure:
    """The H200 step of a config: its reference figure, else the same model's scaled by tokens."""
    batch, seq_len, ckpt = workload
    same = [f for f in references.H200 if (f.model, f.grad_ckpt) == (model, ckpt)]
    exact = [f for f in same if (f.quant, f.batch) == (quant, batch)]
    if not same:
        raise KeyError(f"no H200 step figure for {model}{' checkpointed' if ckpt else ''}: add one to the estimate")
    figure = (exact or sorted(same, key=lambda f: -f.step_ms / f.batch))[0]
    scale = batch * seq_len / (figure.batch * 2048)
    how = "" if exact and seq_len == 2048 else f", scaled x{scale:g} by tokens from {figure.quant} b{figure.batch}"
    return Figure(figure.step_ms / 1000 * scale, f"{REF}: {model} {quant} b{batch}{' ckpt' if ckpt else ''} {figure.step_ms:g} ms a step{how}")


def _loras(plan: dict[str, Any]) -> int:
    return len(list(itertools.product(*(plan[key] for key in ("ranks", "alpha", "targets", "dropout", "variants")))))


def _weights_gib(model: str, quant: str) -> float:
    return next(f.weights_gib for f in references.H200 if (f.model, f.quant) == (model, quant))


def _sources(figures: Iterable[Figure]) -> str:
    return "; ".join(dict.fromkeys(f.source for f in figures))


def _steps_per_test() -> int:
    return STEPS["warmup"] + STEPS["rounds"]


def _step_time_parts(plan, bases, workloads, configs):
    n = _steps_per_test()
    steps = [step_figure(m, q, w) for m, q, w, _ in configs]
    harness = [step_figure(m, q, workloads[0]) for m, q in bases]
    return [(f"step_time: {len(configs)} configs x {n} steps", n * sum(f.value for f in steps),
             _sources(steps) + " (AdamW's, assumed for every optimizer)"),
            (f"harness overhead: {len(bases)} bases x 3 x {n} steps", 3 * n * sum(f.value for f in harness), _sources(harness)),
            ], len(configs) + 2 * len(bases)


def _memory_parts(plan, bases, workloads, configs):
    paged = [c for c in configs if OPTIMIZERS[c[3]].paged]
    steps = [step_figure(m, q, w) for m, q, w, _ in configs]
    pressure = [step_figure(m, q, w) for m, q, w, _ in paged]
    return [(f"memory: {len(configs)} configs x 3 steps", 3 * sum(f.value for f in steps), _sources(steps)),
            (f"paged optimizer under pressure: {len(paged)} configs x 6 steps", 6 * sum(f.value for f in pressure), _sources(pressure)),
            ], len(bases) + 2 * len(configs) + len(paged)


def _params_parts(plan, bases, workloads, configs):
    return [], len(bases) * _loras(plan)  # a count on each base and LoRA spec


def _serving_parts(plan, bases, workloads, configs):
    """Prefill at the forward share of the step's rate a token; decode by the token. Latency: base,
    unmerged, merged (and dequantized-merged on a quantized base), warm-up and timed rounds each;
    mixed batches: each adapter alone, the mixed batch, each row alone, then timed rounds twice."""
    n, seconds, figures, tests = _steps_per_test(), 0.0, [FIGURES["forward_share"]], 0
    for (model, quant), prompt, new, batch in itertools.product(bases, plan["prompt_len"], plan["new_tokens"], plan["serve_batch"]):
        step, decode = step_figure(model, quant, workloads[0]), DECODE_TOKEN_S[model]
        figures += [step, decode]
        per_token = FIGURES["forward_share"].value * step.value / (workloads[0][0] * workloads[0][1])
        variants = 4 if QUANTIZATIONS[quant].is_quantized else 3
        seconds += variants * n * (per_token * batch * prompt + new * decode.value)
        for adapters in MIXED_ADAPTERS:
            rows = max(batch, adapters) + -max(batch, adapters) % adapters
            seconds += (adapters + 2 + 2 * n) * per_token * rows * prompt + rows * max(per_token * prompt, decode.value)
        tests += 1 + len(MIXED_ADAPTERS)
    return [(f"serving: {tests} latency and mixed-batch tests", seconds, _sources(figures))], tests + len(bases)


def _merge_parts(plan, bases, workloads, configs):
    """Per base: peft's delta checked in float64 on the host over every adapted weight (the bf16
    weights' count, embeddings included: an overcount), once more for a quantized base's
    re-quantization error; a merged model saved and loaded again."""
    if "trained_model" not in LEFT_OUT:
        raise KeyError(f"no estimate for {catalog.MERGE_TRAINED} (a task model trained 600 steps first)")
    passes, saves, figures, tests = 0.0, 0.0, [FIGURES[name] for name in ("host_pass_s_per_g", "save_s_per_gib", "from_pretrained", "build")], 0
    for model, quant in bases:
        quantized = QUANTIZATIONS[quant].is_quantized
        passes += (2 if quantized else 1) * _loras(plan) * _weights_gib(model, "bf16") * 2**30 / 2 / 1e9 * FIGURES["host_pass_s_per_g"].value
        saves += _weights_gib(model, quant) * FIGURES["save_s_per_gib"].value + FIGURES["from_pretrained"].value
        saves += 2 * FIGURES["build"].value if quantized else 0.0
        tests += _loras(plan) + (1 if quantized else 2)  # a merge per LoRA spec; save_and_reload (and weighted_adapters) on the first
    return [(f"merge: float64 checks of {len(bases)} bases", passes, FIGURES["host_pass_s_per_g"].source),
            ("merge: merged models saved and loaded, bases built again", saves, _sources(figures[1:]))], tests


# suite: (plan, bases, workloads, configs) -> its [(part, seconds, source)], and how many of its tests use a base
_SUITE_PARTS = {"step_time": _step_time_parts, "memory": _memory_parts, "params": _params_parts, "serving": _serving_parts, "merge": _merge_parts}


def estimate_table(parts: Sequence[Part] | None = None) -> str:
    """The estimate as a markdown table: a line per part, a total per run and in all."""
    parts = estimate() if parts is None else parts
    lines = ["| run | part | s | from |", "|---|---|---:|---|"]
    for run in dict.fromkeys(p.run for p in parts):
        mine = [p for p in parts if p.run == run]
        lines += [f"| {run} | {p.part} | {p.seconds:.1f} | {p.source} |" for p in mine]
        lines.append(f"| {run} | **run total** | **{sum(p.seconds for p in mine):.0f}** | |")
    total = sum(p.seconds for p in parts)
    lines.append(f"| all | **total** | **{total:.0f}** ({total / 60:.1f} min) | target: {TARGET_S:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - on a GPU host; tests drive run steps and the verdict
    parser = argparse.ArgumentParser(prog="python -m pytest_lora.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/gpu-check", help="where each run's results go")
    parser.add_argument("--budget-s", type=float, help="start a run only when its estimate fits in what is left of this many seconds")
    parser.add_argument("--estimate", action="store_true", help="print the estimated wall time on one H200 and exit")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments for every run")
    options = parser.parse_args(argv)
    if options.estimate:
        sys.stdout.write(estimate_table())
        return 0
    checks = run_all(Path(options.results), options.pytest_args, budget_s=options.budget_s)
    sys.stdout.write(render(checks))
    return 0 if all(c.ok is not False for c in checks) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
