"""A run's report as GitHub-flavoured markdown: what ran where, the headline, then every table.

The report is a pure function of the results document (``render_run``), so the run's own
``<run-id>.md`` and ``pytest-lora report RUN.json`` are the same text. It opens with the machine,
the library versions, the git state and how many configs ended how; then the headline sections
(``report.headline``) with their plots; then the regression gate's verdict, when the run was
compared; then the full tables, one per suite and test, with skipped records and columns no
record fills left out. Every cell is escaped, so a unit such as ``max|W-W0|/max|W0|`` stays in
its cell.

Several runs (``render_runs``) go side by side: one column per run for each headline number of
each config, and the change of the last run from the first.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable

from . import catalog, grid, headline, plots
from .table import REGRESSION_HEADER, by_suite, config_label, format_change, format_value, regression_row, error_notes, row_notes, rows

STATUS_ORDER = ("ok", "oom", "error", "skipped")


def escape(cell: Any) -> str:
    """A table cell's text that GFM reads as text: pipes, newlines, emphasis and HTML escaped."""
    text = str(cell).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return text.replace("*", "\\*").replace("<", "&lt;").replace("`", "\\`")


def table(header: list[str], body: list[list[str]], text_columns: int) -> list[str]:
    """A GFM table: text columns left-aligned, numbers right-aligned."""
    lines = ["| " + " | ".join(escape(name) for name in header) + " |"]
    lines.append("|" + "|".join("---:" if i >= text_columns else "---" for i in range(len(header))) + "|")
    lines.extend("| " + " | ".join(escape(cell) for cell in row) + " |" for row in body)
    return lines


def status_counts(records: Iterable[dict[str, Any]]) -> str:
    counts = Counter(record["status"] for record in records)
    return ", ".join(f"{counts[status]} {status}" for status in STATUS_ORDER if counts[status] or status == "ok")


def machine_line(machine: dict[str, Any]) -> str:
    device = machine.get("gpu_name") or machine.get("cpu") or machine.get("device")
    extra = f", driver {machine['driver']}, CUDA {machine['cuda']}" if machine.get("driver") else ""
    threads = f"; steps timed on {machine['cpu_threads']} thread(s)" if machine.get("cpu_threads") else ""
    return f"{machine.get('device')}: {device}{extra}{threads}"


def versions_line(machine: dict[str, Any]) -> str:
    names = ("torch", "transformers", "peft", "bitsandbytes")
    return ", ".join(f"{name} {machine.get(name)}" for name in names) + f", Python {machine.get('python')}"


def git_line(run: dict[str, Any]) -> str:
    git = run.get("git") or {}
    if not git.get("commit"):
        return "not a git checkout"
    return f"{git['commit'][:12]}" + (" with uncommitted changes" if git.get("dirty") else " (clean)")


def run_line(run: dict[str, Any]) -> str:
    if run.get("finished") is None:
        return f"{run.get('status')}, started {run.get('started')}, not finished: the records measured until it was stopped or killed"
    line = f"{run.get('status')}, {run.get('started')} to {run.get('finished')}"
    tests = run.get("tests")
    if run.get("status") == "interrupted" and tests:  # how far it got
        line += f"; {tests['recorded']} of {tests['selected']} selected tests recorded" + (f" (stopped by {run['stopped_by']})" if run.get("stopped_by") else "")
    return line


def builds_line(builds: list[dict[str, Any]]) -> str:
    """How many base models the run built: each base once, or which were built again (a base
    released and asked for later, e.g. a test order that interleaves bases, costs a build)."""
    total = sum(build["count"] for build in builds)
    again = [f"{b['model']} {b['quant']} on {b['device']} x{b['count']}" for b in builds if b["count"] > 1]
    text = f"{total} for {len(builds)} base{'s' * (len(builds) != 1)}"
    return text + (f"; built more than once: {', '.join(again)}" if again else ", each built once")


def provenance(document: dict[str, Any]) -> list[str]:
    run, machine = document["run"], document["machine"]
    skipped = sum(r["status"] == "skipped" for r in document["records"])
    lines = [
        f"- **Machine**: {machine_line(machine)}",
        f"- **Versions**: {versions_line(machine)}",
        f"- **Code**: {git_line(run)}; run `{' '.join(run.get('argv') or [])}`",
        f"- **Run**: {run_line(run)}",
        f"- **Records**: {status_counts(document['records'])}" + (" (skipped: measurements this device can't make)" if skipped else ""),
    ]
    if run.get("builds"):
        lines.append(f"- **Base builds**: {builds_line(run['builds'])}")
    if run.get("failed_by"):
        lines.append(f"- **Failed by**: {'; '.join(run['failed_by'])}")
    return lines


def section(part: headline.Section, level: str = "###") -> list[str]:
    out = [f"{level} {part.title}", ""]
    for note in part.notes:
        out.extend([note, ""])
    if part.header:
        out.extend(table(part.header, part.rows, part.text_columns))
        out.append("")
    return out


def render_run(document: dict[str, Any]) -> str:
    """The whole report of one run."""
    run, records = document["run"], document["records"]
    drawn = plots.available(records)
    out = [f"# pytest-lora run {run['id']}", "", *provenance(document), ""]
    parts = headline.sections(records)
    if parts:
        out.extend(["## Headline", ""])
    for part in parts:
        out.extend(section(part))
        if part.key in drawn:  # a section and its plot share a name
            out.extend([f"![{plots.TITLES[part.key]}]({plots.file_name(run['id'], part.key)})", ""])
    if run.get("gate"):
        out.extend(gate(run["gate"]))
    out.extend(full_tables(records))
    return "\n".join(out).rstrip("\n") + "\n"


README_START = "<!-- published headline: generated by `make publish` from results/published; do not edit -->"
README_END = "<!-- end of published headline -->"


# The real model's published run leads the README; the tiny models' run follows it
REAL_README_START = ("<!-- published headline of the pretrained model: generated by `make publish-real` from results/published/real; "
                     "do not edit -->")
REAL_README_END = "<!-- end of the pretrained model's published headline -->"
MARKERS = {"tiny": (README_START, README_END), "real": (REAL_README_START, REAL_README_END)}


def published_headline(document: dict[str, Any], directory: str, which: str = "tiny") -> str:
    """The compact headline of a published run, with one plot, for a README: ``directory`` is
    where the run's files are, relative to the README; ``which`` run of the two it is."""
    run = document["run"]
    start, end = MARKERS[which]
    out = [start, "", f"- **Machine**: {machine_line(document['machine'])}; {versions_line(document['machine'])}",
           f"- **Run**: [{run['id']}]({directory}/{run['id']}.md) ({status_counts(document['records'])}), "
           f"[CSV]({directory}/{run['id']}.csv)", ""]
    for part in headline.sections(document["records"], compact=True):
        out.extend(section(part, "####"))
    drawn = plots.available(document["records"])
    if "forgetting" in drawn:
        out.extend([f"![{plots.TITLES['forgetting']}]({directory}/{plots.file_name(run['id'], 'forgetting')})", ""])
    out.append(end)
    return "\n".join(out)


def with_published_headline(readme: str, block: str) -> str:
    """``readme`` with the generated block of ``block``'s run replaced by it; the real model's,
    where the README has none yet, goes before the tiny models' (it leads)."""
    which = next(name for name, (start, _) in MARKERS.items() if block.startswith(start))
    start_marker, end_marker = MARKERS[which]
    if start_marker not in readme:
        at = readme.index(README_START)
        return readme[:at] + block + "\n\n" + readme[at:]
    start, end = readme.index(start_marker), readme.index(end_marker) + len(end_marker)
    return readme[:start] + block + readme[end:]


def gate(summary: dict[str, Any]) -> list[str]:
    """The regression gate's section, from what the results file keeps of its decision."""
    out = ["## Regression gate", ""]
    out.extend(f"- {line}" for line in summary.get("lines", ()))
    out.append("")
    if summary.get("regressions"):
        out.extend(table(REGRESSION_HEADER, [regression_row(check) for check in summary["regressions"]], 2))
        out.append("")
    return out


def full_tables(records: list[dict[str, Any]]) -> list[str]:
    groups = by_suite(records, skipped=False)
    if not groups:
        return []
    out = ["## Every record", "", "One table per suite and test; configs this device can't measure (skipped) and columns no "
           "record fills are left out. Units in the headers.", ""]
    for suite, suite_records in groups.items():
        header, body, text_columns = rows(suite_records)
        out.extend([f"### {suite}", ""])
        out.extend(table(header, body, text_columns))
        out.append("")
        out.extend(line for note in row_notes(suite_records) + error_notes(suite_records) for line in (escape(note), ""))
    return out


# ----------------------------------------------------------------- several runs

def metric_of(test: str, metric: str) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Each config's ``metric`` of ``test`` (its status when it did not end ok)."""
    def values(records: list[dict[str, Any]]) -> dict[str, Any]:
        return {config_label(r): r["metrics"].get(metric) if r["status"] == "ok" else r["status"] for r in grid.of_test(records, test)}
    return values


def step_memory_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each config's step memory as the headline's grid has it (GPU peak, or measured on the CPU)."""
    found = headline.step_memory(records)
    if found is None:
        return {}
    _, configs, value_of = found
    return {config_label(r): value_of(r) if r["status"] == "ok" else r["status"] for r in configs.records}


SIDE_BY_SIDE = (  # (what, each config's value in one run's records)
    ("step memory in bytes (GPU: peak allocated; CPU: weights + training state + activations, measured)", step_memory_of),
    ("tokens/s", metric_of(catalog.STEP_TIME, "tokens_per_s")),
    ("median step time (s)", metric_of(catalog.STEP_TIME, "step_time_median_s")),
    ("MFU", metric_of(catalog.STEP_TIME, "mfu")),
    ("merge KL (nats), trained model, peft's merge", metric_of(catalog.MERGE_TRAINED, "merge_kl")),
    ("merge KL (nats), trained model, peft's merge into a quantized base", metric_of(catalog.MERGE_TRAINED, "merge_kl_requantize")),
    ("forgetting (nats), LoRA", metric_of(catalog.FORGETTING_LORA, "forgetting_delta_loss")),
    ("forgetting (nats), full fine-tuning", metric_of(catalog.FORGETTING_FULL, "forgetting_delta_loss")),
    ("held-out loss on the old skill before training (nats), per format", metric_of(catalog.BASE_QUALITY, "base_loss_a")),
    ("held-out loss after fine-tuning (nats), LoRA", metric_of(catalog.QUALITY_LORA, "quality_loss")),
    ("held-out loss after fine-tuning minus 16-bit LoRA's (nats)", metric_of(catalog.QUALITY_LORA, "quality_minus_reference")),
    ("trainable parameters", metric_of(catalog.TRAINABLE_PARAMETERS, "trainable_params")),
)


def run_label(document: dict[str, Any], index: int) -> str:
    machine = document["machine"]
    device = machine.get("gpu_name") or machine.get("cpu") or machine.get("device")
    return f"{index + 1}: {device}, torch {machine.get('torch')}"


def run_labels(documents: list[dict[str, Any]]) -> list[str]:
    return [run_label(document, index) for index, document in enumerate(documents)]


def render_runs(documents: list[dict[str, Any]], plot: str | None = None) -> str:
    """Several runs side by side: for each headline number, one row per config, one column per run;
    ``plot``, the file name of their tokens/s plot (``plots.write_runs``), linked when it has data."""
    labels = run_labels(documents)
    out = ["# pytest-lora runs side by side", ""]
    for label, document in zip(labels, documents):
        out.append(f"- **Run {label}**: `{document['run']['id']}`, {document['run'].get('status')}; {machine_line(document['machine'])}; "
                   f"{versions_line(document['machine'])}; code {git_line(document['run'])}; {status_counts(document['records'])}")
    out.append("")
    if plot is not None and plots.runs_speed(documents):
        out.extend([f"![Training throughput, run by run]({plot})", ""])
    for what, values in SIDE_BY_SIDE:
        body = side_by_side_rows([values(document["records"]) for document in documents])
        if body:
            out.extend([f"### {what}", "", "change: the last run against the first.", ""])
            out.extend(table(["config", *(f"run {label}" for label in labels), "change"], body, 1))
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def side_by_side_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """One row per config of any run: its value in each run, and the change from the first to the last."""
    names = list(dict.fromkeys(name for values in runs for name in values))
    body = []
    for name in names:
        row = [values.get(name) for values in runs]
        if all(value is None for value in row):
            continue
        first, last = row[0], row[-1]
        numbers = isinstance(first, (int, float)) and isinstance(last, (int, float))
        body.append([name, *(format_value(value) for value in row), format_change(last, first) if numbers else "-"])
    return body
