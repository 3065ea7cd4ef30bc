"""Tables of records: one per suite, one row per measured case, one column per metric, as rows
of text cells; ``report.terminal`` prints them with rich, ``report.markdown`` as GitHub-flavoured
markdown for the published ``results/*.md``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

CASE_COLUMNS = ("model", "quant", "lora", "workload", "status")


def by_suite(records: Iterable[dict[str, Any]], skipped: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by ``suite: test function``: each group has one set of metric columns."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if skipped or record["status"] != "skipped":
            groups[f"{record['suite']}: {function_name(record)}"].append(record)
    return dict(groups)


def function_name(record: dict[str, Any]) -> str:
    """The test function's name, without module or parameters."""
    return record["test"].split("[", 1)[0].rsplit("::", 1)[-1]


def metric_columns(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(metric, unit) in first-seen order across the records."""
    columns: dict[str, str] = {}
    for record in records:
        for metric, unit in record["units"].items():
            columns.setdefault(metric, unit)
    return list(columns.items())


def rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], int]:
    """Header, cells and the number of leading text columns of one suite's table.

    Case columns that no record fills (no workload in the parameter suite) and metrics that no
    record has a value for are left out. A record compared with a baseline (its
    ``baseline_metrics``) has each number's change from the baseline beside it.
    """
    metrics = [(metric, unit) for metric, unit in metric_columns(records) if any(r["metrics"].get(metric) is not None for r in records)]
    case_columns = [c for c in CASE_COLUMNS if c == "status" or any(r.get(c) is not None for r in records)]
    header = [*case_columns, *(f"{metric} [{unit}]" for metric, unit in metrics)]
    marked = models_apart(records)
    body = []
    for record in records:
        case = [case_cell(column, record.get(column)) + (LOGIT_MARK if column == "model" and record.get(column) in marked else "")
                for column in case_columns]
        before = record.get("baseline_metrics") or {}
        body.append([*case, *(with_change(record["metrics"].get(metric), before.get(metric)) for metric, _ in metrics)])
    return header, body, len(case_columns)


# ----------------------------------------------------------------- models whose KLs can't be set side by side

LOGIT_SCALES_APART = 10  # models whose logits' spreads differ by more than this have KLs that can't be set side by side
LOGIT_MARK = " †"


def logit_spreads(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """model -> the largest standard deviation of its unmerged logits (``reference_logit_std``) in
    the records: the scale that a merge's KL grows with the square of."""
    spreads: dict[str, float] = {}
    for record in records:
        std = (record.get("metrics") or {}).get("reference_logit_std")
        if std:
            spreads[record["model"]] = max(std, spreads.get(record["model"], 0.0))
    return spreads


def models_apart(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The models whose logits spread more than ``LOGIT_SCALES_APART`` times the narrowest model's,
    with how many times: their rows are marked, and ``row_notes`` says why."""
    spreads = logit_spreads(records)
    if len(spreads) < 2:
        return {}
    smallest = min(spreads.values())
    return {model: std / smallest for model, std in spreads.items() if std > LOGIT_SCALES_APART * smallest}


def row_notes(records: list[dict[str, Any]]) -> list[str]:
    """The reason beside each marked row of a table (printed under it).

    A random T5's output layer is drawn with standard deviation 1.0 (transformers' T5
    ``_init_weights``), a random Llama's or GPT-2's with 0.02: T5's logits spread about 50x
    wider, the same bf16 rounding of the merged weights moves them as much relative to that
    scale, and KL, which grows with the square of the scale, comes out about 100x larger."""
    apart = models_apart(records)
    if not apart:
        return []
    spreads = logit_spreads(records)
    narrowest = min(spreads, key=spreads.__getitem__)
    listed = ", ".join(f"{model} {spreads[model]:.2g} ({times:.0f}x)" for model, times in sorted(apart.items(), key=lambda item: -item[1]))
    return [f"{LOGIT_MARK.strip()} logits spread wider than {narrowest}'s ({spreads[narrowest]:.2g}, standard deviation of the "
            f"unmerged logits): {listed}. KL grows with the square of that spread, so these rows' KLs are larger for the same "
            "rounding and are compared with their own model's, not across models (merge_max_abs_err / reference_logit_std is). "
            "A random T5's output layer is drawn with std 1.0 (transformers' T5 _init_weights), a random Llama's with 0.02."]


ERROR_NOTE_CHARS = 300  # an error's message under its table: its first line, shortened


def error_notes(records: list[dict[str, Any]]) -> list[str]:
    """What went wrong, under a table whose rows say ``error`` or ``oom``: each such record's
    config and the first line of its message (the traceback stays in pytest's output)."""
    notes = []
    for record in records:
        if record.get("status") in ("error", "oom") and record.get("error"):
            first = str(record["error"]).strip().splitlines()[0]
            if len(first) > ERROR_NOTE_CHARS:
                first = first[: ERROR_NOTE_CHARS - 3] + "..."
            notes.append(f"{record['status']}: {config_label(record)}: {first}")
    return notes


def config_label(record: dict[str, Any]) -> str:
    """A config in a few words: ``llama-3.2-1b-tiny nf4 r8 a16 all-linear 2x64``."""
    parts = [record.get("model"), record.get("quant")]
    parts += [case_cell(column, record[column]) for column in ("lora", "workload") if record.get(column) is not None]
    return " ".join(str(part) for part in parts if part is not None) or function_name(record)


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # a status
        return value
    if isinstance(value, int):
        return f"{value:,d}"
    return f"{value:.4g}"


def with_change(value: Any, baseline: Any) -> str:
    """A value and, when there is a baseline value, its change: ``1.25 (+4.1%)``."""
    text = format_value(value)
    if not isinstance(value, (int, float)) or not isinstance(baseline, (int, float)):
        return text
    return f"{text} ({format_change(value, baseline)})"


def format_change(value: float, baseline: float) -> str:
    if value == baseline:
        return "="
    if baseline == 0:
        return f"{value - baseline:+.3g}"
    return f"{(value - baseline) / abs(baseline):+.1%}"


def case_cell(column: str, value: Any) -> str:
    """How a record's model, quant, lora, workload or status reads in a table cell."""
    if value is None:
        return "-"
    if column == "lora":
        if value.get("r") is None:  # not an adapter: full fine-tuning
            return str(value.get("variant") or value.get("targets"))
        targets = value["targets"] if isinstance(value["targets"], str) else ",".join(value["targets"])
        variant = "" if value.get("variant") in (None, "lora") else f" {value['variant']}"
        return f"r{value['r']} a{format_value(value['alpha'])} {targets}{variant}"
    if column == "workload":
        if "prompt_len" in value:  # a serving workload
            return f"{value['batch']}x{value['prompt_len']}+{value['new_tokens']}"
        optimizer = value.get("optimizer")
        return (f"{value['batch']}x{value['seq_len']}" + (" ckpt" if value.get("grad_ckpt") else "")
                + (f" {optimizer}" if optimizer not in (None, "adamw") else ""))
    return str(value)


REGRESSION_HEADER = ["metric", "config", "baseline", "now", "change", "rule", "p-value", "rerun", "note"]


def regression_row(check: dict[str, Any]) -> list[str]:
    """A regression as the results file keeps it (``gate.compare.check_record``), as a table row."""
    change = "-" if check.get("change") is None else format_change(check["now"], check["baseline"])
    p_value = "-" if check.get("p_value") is None else f"{check['p_value']:.2g}"
    rule = check["rule"] + ("" if check.get("rule_from") in (None, "default") else f" ({check['rule_from']})")
    return [check["metric"], check["config"], format_value(check["baseline"]), format_value(check["now"]), change, rule, p_value,
            format_value(check.get("rerun")), check.get("note") or ""]
