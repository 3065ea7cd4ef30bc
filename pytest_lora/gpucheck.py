"""``make gpu-check``: one command that proves a GPU run, and says so in one table.

A GPU is lent now and then, for minutes: the run must be right the first time and must show
that it was. This runs every suite on a short GPU matrix (the Llama-3.2-1B shape in bf16 and nf4
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
* every test passed (an ``oom`` or ``error`` record fails the check);

and prints the H200 reference figures (``pytest_lora.references``) beside ours. The exit code
is 0 only when every check holds. On an offline GPU host: ``bash .gpu/run-on-gpu.sh make
gpu-check OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from . import references
from .report import catalog
from .report.table import case_cell, format_value, function_name

MiB = 2**20
BUILD_LIMIT_S = 1.0
OVERHEAD_LIMIT_PCT = 1.0
PEAK_TOLERANCE, PEAK_TOLERANCE_CKPT = 0.05, 0.15
CLOCK_TOLERANCE = 0.01
LEAK_LIMIT = 64 * MiB

# One pytest run per entry: the cross product of each is exactly the configs of the reference figures.
RUNS = (  # the small shape takes every optimizer (paging under pressure); the 8B shape AdamW, as its H200 figures
    {"name": "llama-3.2-1b", "models": ["llama-3.2-1b"], "quant": ["bf16", "nf4"], "batch": [4], "grad_ckpt": [False],
     "optimizers": ["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw"]},
    {"name": "llama-3.1-8b", "models": ["llama-3.1-8b"], "quant": ["nf4"], "batch": [2], "grad_ckpt": [False, True], "optimizers": ["adamw"]},
)
COMMON = {"ranks": [16], "alpha": ["2r"], "targets": ["all-linear"], "dropout": [0.0], "variants": ["lora"], "seq_len": [2048], "compile": [False],
          "prompt_len": [512], "new_tokens": [16], "serve_batch": [4]}


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
    for key, value in {**COMMON, **{k: v for k, v in run.items() if k != "name"}}.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"  # JSON's lists, strings and booleans are TOML's too


def pytest_args(run: dict[str, Any], directory: Path, suites: str | None = None) -> list[str]:
    """The pytest command line of one run; its matrix file and results go under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    matrix = directory / "matrix.toml"
    matrix.write_text(matrix_toml(run), encoding="utf-8")
    args = ["--lora-bench", "--lora-device=cuda", f"--lora-matrix={matrix}", f"--lora-results={directory}", "-p", "no:cacheprovider", "-q"]
    if suites:
        args.insert(0, suites)
    if not _plugin_installed():
        args += ["-p", "pytest_lora.plugin"]  # a checkout on PYTHONPATH (run-on-gpu.sh), not installed
    return args


def _plugin_installed() -> bool:
    return any(entry.value == "pytest_lora.plugin" for entry in metadata.entry_points(group="pytest11"))


def run_all(directory: Path, extra: list[str]) -> tuple[int, list[dict[str, Any]]]:  # pragma: no cover - on a GPU host; tests run each step through fakes
    import pytest

    worst, records = 0, []
    for run in RUNS:
        where = directory / run["name"]
        code = pytest.main(pytest_args(run, where) + extra)
        worst = max(worst, int(code))
        latest = where / "latest.json"
        if latest.is_file():
            records += json.loads(latest.read_text(encoding="utf-8"))["records"]
    return worst, records


# --------------------------------------------------------------------------- the verdict


def verdict(records: Iterable[dict[str, Any]], figures: Iterable[references.StepFigure] = references.H200) -> list[Check]:
    """Every check of a GPU run, from its records."""
    records = list(records)
    checks: list[Check] = []
    for record in records:
        test = function_name(record)
        check = _CHECKS.get(test)
        if check is not None:
            checks += check(record["metrics"], _subject(record), record.get("workload") or {})
        if record["status"] in ("error", "oom"):
            checks.append(Check("test passed", f"{test} {_subject(record)}", record["status"], "ok", False))
    if not records:
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


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - on a GPU host; tests drive run steps and the verdict
    parser = argparse.ArgumentParser(prog="python -m pytest_lora.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/gpu-check", help="where each run's results go")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments for every run")
    options = parser.parse_args(argv)
    code, records = run_all(Path(options.results), options.pytest_args)
    checks = verdict(records)
    if code != 0:
        checks.append(Check("pytest exit code", "every run", str(code), "0", False))
    text = render(checks)
    Path(options.results).mkdir(parents=True, exist_ok=True)
    (Path(options.results) / "verdict.txt").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0 if all(c.ok is not False for c in checks) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
