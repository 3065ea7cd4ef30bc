"""The ``lora_bench`` recorder: what one test measured, on which case, and how it ended.

A test calls ``lora_bench.record("trainable_params", 18874368, "params")``. The case (model,
quantization, LoRA spec, workload) comes from the test's matrix parameters, or from
``lora_bench.describe(...)`` for a test that picks its own. The plugin sets the status from the
test's outcome (``ok``, ``error``, ``oom``, ``skipped``) and hands the record to the results store.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

STATUSES = ("ok", "oom", "skipped", "error")
# How the warning of a busy timing starts. Records written before the record's ``busy`` field
# existed say it only so: an old baseline is read by this prefix.
BUSY_WARNING = "machine busy while timing"


def timed_while_busy(record: dict[str, Any]) -> bool:
    """Whether the record's timings competed for a CPU (``measure.cpu.MachineLoad``): the gate does
    not count a timing measured so, nor take it as a baseline."""
    if "busy" in record:
        return bool(record["busy"])
    return any(str(warning).startswith(BUSY_WARNING) for warning in record.get("warnings") or ())


class Recorder:
    """Metrics of one test, with units, and the case they were measured on."""

    def __init__(self, suite: str, test: str, case: dict[str, Any]):
        self.suite = suite
        self.test = test
        self.case = {"model": None, "quant": None, "lora": None, "workload": None, **case}
        self.metrics: dict[str, float | int | None] = {}
        self.units: dict[str, str] = {}
        self.status = "ok"
        self.error: str | None = None
        self.warnings: list[str] = []
        self.busy = False  # its timings competed for a CPU (``timed_while_busy``)
        self.raw: dict[str, list[float]] = {}
        self.budget: dict[str, Any] | None = None  # a memory budget's check (pytest_lora.budget)
        self.failed_checks: list[str] = []  # what ``check`` found wrong; the test fails once its call ends

    def record(self, metric: str, value: Any, unit: str) -> None:
        """Record one number: a Python or numpy number, or a one-element tensor or array (``.item()``).
        ``None`` means "not measurable here" (e.g. MFU on a CPU), never zero."""
        if not isinstance(metric, str) or not metric.isidentifier():
            raise ValueError(f"metric name {metric!r} must be an identifier such as 'trainable_params'")
        number = None if value is None else _as_number(metric, value)
        if not isinstance(unit, str) or not unit:
            raise ValueError(f"metric {metric!r}: give its unit, e.g. 'bytes', 's', 'params', '%'")
        self.metrics[metric] = number
        self.units[metric] = unit

    def samples(self, metric: str, values: Any) -> None:
        """Keep the raw per-round values behind a recorded statistic (each timed step behind
        ``step_time_median_s``): the gate tests a change for significance on them."""
        if metric not in self.metrics:
            raise ValueError(f"metric {metric!r}: record its value before its samples")
        self.raw[metric] = [_as_number(metric, value) for value in values]

    def check(self, ok: Any, message: str) -> bool:
        """A check that does not stop the test: it fails once the test's body has run, so the metrics
        recorded after a failed check are kept. Returns whether it held."""
        if not ok:
            self.failed_checks.append(str(message))
        return bool(ok)

    def warn(self, text: str) -> None:
        """Say what makes this record's numbers doubtful; shown after the table."""
        self.warnings.append(str(text))

    def timed_while_busy(self, why: str) -> None:
        """Mark the record's timings as measured on a busy machine, saying how busy (``why``)."""
        self.busy = True
        self.warn(f"{BUSY_WARNING}: {why}")

    def describe(self, *, model: str | None = None, quant: str | None = None, lora: Any = None, workload: Any = None) -> None:
        """Name the case for a test that is not parametrized by the matrix."""
        given = {"model": model, "quant": quant, "lora": _as_record(lora), "workload": _as_record(workload)}
        self.case.update({key: value for key, value in given.items() if value is not None})

    def fail(self, status: str, error: str | None) -> None:
        """Mark the record as not ``ok``; the first failure wins (a teardown error doesn't hide an OOM)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}; allowed: {', '.join(STATUSES)}")
        if self.status == "ok":
            self.status, self.error = status, error

    def to_record(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "test": self.test,
            **self.case,
            "status": self.status,
            "metrics": dict(self.metrics),
            "units": dict(self.units),
            "error": self.error,
            "warnings": list(self.warnings),
            "samples": {metric: list(values) for metric, values in self.raw.items()},
            **({"budget": dict(self.budget)} if self.budget else {}),
            **({"busy": True} if self.busy else {}),
        }


NUMBERS = "a finite int or float, a numpy scalar, a 0-d tensor or array, or None"


def _as_number(metric: str, value: Any) -> int | float:
    """``value`` as a Python int or float; anything else is a ``ValueError`` naming what it got."""
    kind = type(value).__module__.split(".")[0] + "." + type(value).__qualname__
    kind = kind.removeprefix("builtins.")
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # a 0-d tensor or numpy array
        value = value.item()
    elif getattr(value, "shape", ()) != ():
        raise ValueError(f"metric {metric!r}: got a {kind} of shape {tuple(value.shape)}; allowed: {NUMBERS}")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"metric {metric!r}: got {kind} {value!r}; allowed: {NUMBERS}")
    if not math.isfinite(value):
        raise ValueError(f"metric {metric!r}: got {value!r}, which is not finite; allowed: {NUMBERS}")
    return int(value) if isinstance(value, Integral) else float(value)


def _as_record(spec: Any) -> Any:
    if spec is None or isinstance(spec, dict):
        return spec
    if hasattr(spec, "as_record"):
        return spec.as_record()
    if hasattr(spec, "to_dict"):  # a peft.LoraConfig
        data = spec.to_dict()
        targets = data.get("target_modules")
        return {
            "r": data.get("r"),
            "alpha": data.get("lora_alpha"),
            "targets": sorted(targets) if isinstance(targets, (set, list)) else targets or "default",
            "dropout": data.get("lora_dropout"),
            "variant": "dora" if data.get("use_dora") else "rslora" if data.get("use_rslora") else "lora",
            "bias": data.get("bias"),
            "modules_to_save": list(data.get("modules_to_save") or []),
        }
    raise TypeError(f"cannot describe {spec!r}; pass a dict, a LoraSpec / WorkloadSpec or a peft.LoraConfig")
