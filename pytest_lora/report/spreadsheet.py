"""Every record of a run as CSV, next to its JSON: one row per record, for spreadsheets and pandas.

The case is spread over plain columns (``lora_r``, ``seq_len``, ...), and each metric is a column
named with its unit (``step_time_median_s [s]``), so ``pandas.read_csv`` gives a frame to group
and pivot at once. An empty cell is a metric the record does not have (or could not measure).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

CASE = (
    ("run_id", lambda run, record: run.get("id")),
    ("suite", lambda run, record: record.get("suite")),
    ("test", lambda run, record: record.get("test")),
    ("model", lambda run, record: record.get("model")),
    ("quant", lambda run, record: record.get("quant")),
    *((f"lora_{key}", (lambda key: lambda run, record: _field(record.get("lora"), key))(key)) for key in ("r", "alpha", "targets", "dropout", "variant")),
    *((key, (lambda key: lambda run, record: _field(record.get("workload"), key))(key)) for key in ("batch", "seq_len", "grad_ckpt", "optimizer",
                                                                                                   "prompt_len", "new_tokens")),
    ("status", lambda run, record: record.get("status")),
    ("error", lambda run, record: record.get("error")),
)


def _field(part: dict[str, Any] | None, key: str) -> Any:
    value = (part or {}).get(key)
    return ",".join(value) if isinstance(value, list) else value


def metric_column(metric: str, unit: str) -> str:
    return f"{metric} [{unit}]"


def header(records: list[dict[str, Any]]) -> list[str]:
    metrics: dict[str, None] = {}
    for record in records:
        for metric, unit in record["units"].items():
            metrics.setdefault(metric_column(metric, unit))
    return [name for name, _ in CASE] + list(metrics)


def render(document: dict[str, Any]) -> str:
    """The run's records as CSV text (RFC 4180, ``\\r\\n`` line ends as the csv module writes)."""
    records = document["records"]
    columns = header(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for record in records:
        row = {name: _cell(get(document["run"], record)) for name, get in CASE}
        row.update({metric_column(metric, record["units"][metric]): _cell(value) for metric, value in record["metrics"].items()})
        writer.writerow(row)
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return json.dumps(value)  # the shortest text that reads back as the same float
    return value
