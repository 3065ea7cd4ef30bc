"""Records of one test as a grid: by model, quantization, LoRA spec and workload, each set against
its full-precision reference, and the cells' formats. The headline's sections and the plots are
built on these."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from ..specs import QUANTIZATIONS
from .table import case_cell, format_change, function_name

QUANT_ORDER = tuple(QUANTIZATIONS)  # the format table's order: unquantized, then each backend's
FULL_PRECISION = ("bf16", "none", "fp32", "fp16")  # the reference of a config, the first one measured


def ok_records(records: Iterable[dict[str, Any]], test: str) -> list[dict[str, Any]]:
    return [r for r in records if function_name(r) == test and r["status"] == "ok"]


def of_test(records: Iterable[dict[str, Any]], test: str) -> list[dict[str, Any]]:
    """Records of one test function that say something: skipped ones (GPU-only on a CPU) don't."""
    return [r for r in records if function_name(r) == test and r["status"] != "skipped"]


def lora_label(record: dict[str, Any], workloads: int = 1) -> str:
    """The LoRA spec, with the workload when the run had more than one."""
    label = case_cell("lora", record.get("lora"))
    return f"{label}, {case_cell('workload', record.get('workload'))}" if workloads > 1 else label


def format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def with_reference(text: str, value: Any, reference: Any, is_reference: bool) -> str:
    """A cell and its change from the full-precision reference: ``1.2 MiB (-42.1%)``, ``(ref)``."""
    if is_reference:
        return f"{text} (ref)"
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)):
        return text
    return f"{text} ({format_change(value, reference)})"


def status_cell(record: dict[str, Any]) -> str | None:
    """What a config that did not finish shows instead of its number."""
    return None if record["status"] == "ok" else record["status"]


def quant_order(quant: str) -> tuple[int, str]:
    return (QUANT_ORDER.index(quant) if quant in QUANT_ORDER else len(QUANT_ORDER), str(quant))


def in_matrix_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records by model (first seen), quantization (wider to narrower), then as they ran."""
    models = list(dict.fromkeys(r.get("model") for r in records))
    return sorted(records, key=lambda r: (models.index(r.get("model")), quant_order(r.get("quant"))))


class Configs:
    """Records of one test by (model, quant, LoRA spec, workload), with the full-precision reference."""

    def __init__(self, records: list[dict[str, Any]]):
        self.records = records
        self.workloads = len({case_cell("workload", r.get("workload")) for r in records})
        self.extra = distinguishing_fields(records, self.workloads)
        self.by_key = {self.key(r): r for r in records}

    def label(self, record: dict[str, Any]) -> str:
        """The spec as a column or row names it: rank, alpha and targets, and whatever else the
        matrix varied (dropout, bias, ...) when those alone would name two specs alike."""
        extra = [f"{name} {(record.get('lora') or {}).get(name)}" for name in self.extra]
        return ", ".join([lora_label(record, self.workloads), *extra])

    def key(self, record: dict[str, Any], quant: str | None = None) -> tuple[str, str, str]:
        return (record.get("model"), quant or record.get("quant"), self.label(record))

    def reference(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The same model, spec and workload on its full-precision base, if the run measured it."""
        for quant in FULL_PRECISION:
            found = self.by_key.get(self.key(record, quant))
            if found is not None and found["status"] == "ok":
                return found
        return None

    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.records))

    def quants(self) -> list[str]:
        return sorted(dict.fromkeys(r["quant"] for r in self.records), key=quant_order)

    def columns(self) -> list[str]:
        return list(dict.fromkeys(self.label(r) for r in self.records))


def distinguishing_fields(records: list[dict[str, Any]], workloads: int) -> list[str]:
    """LoRA fields beyond rank, alpha, targets and variant that tell apart specs the short label
    names alike (a matrix of two dropouts)."""
    specs: dict[tuple, set[str]] = {}
    for record in records:
        short = (record.get("model"), record.get("quant"), lora_label(record, workloads))
        specs.setdefault(short, set()).add(json.dumps(record.get("lora"), sort_keys=True))
    clashing = [[json.loads(spec) or {} for spec in found] for found in specs.values() if len(found) > 1]
    fields = {name for group in clashing for spec in group for name in spec if len({json.dumps(s.get(name)) for s in group}) > 1}
    return sorted(fields)


def grid(configs: Configs, cell: Callable[[dict[str, Any]], str], compact: bool) -> tuple[list[str], list[list[str]], int]:
    """A model x quantization x LoRA-spec grid. Full: one row per model and quantization, one column
    per spec. Compact: one row per quantization, one column per model, for the first spec."""
    columns = configs.columns()
    if compact:
        first = columns[0]
        header = ["quant", *configs.models()]
        rows = [[quant, *(_cell(configs.by_key.get((model, quant, first)), cell) for model in configs.models())] for quant in configs.quants()]
        return header, rows, 1
    header = ["model", "quant", *columns]
    rows = []
    for model in configs.models():
        for quant in configs.quants():
            found = [configs.by_key.get((model, quant, column)) for column in columns]
            if any(found):
                rows.append([model, quant, *(_cell(record, cell) for record in found)])
    return header, rows, 2


def _cell(record: dict[str, Any] | None, cell: Callable[[dict[str, Any]], str]) -> str:
    if record is None:
        return "-"
    return status_cell(record) or cell(record)
