"""The ``pytest-lora`` console script: work on results files without running anything.

``pytest-lora compare BASE NEW [--fail RULE ...]`` judges a results file against a baseline file
or a history directory with the same rules, defaults and verdicts as ``pytest --lora-compare``
(``gate.compare``), and exits as the in-run gate does: 0 nothing regressed, 1 a regression
(with its table), 4 a bad argument, a missing or corrupt file, a malformed rule.

``pytest-lora report RUN [RUN2 ...] [-o DIR]`` writes a run's report again from its JSON (the same
markdown, CSV and plots the run wrote), or several runs side by side (two GPUs, a library upgrade).

``pytest-lora merge SHARD ... -o RUN.json [--allow-mixed]`` joins the results of ``--lora-shard=K/N``
runs into one run (``results.shards``), refusing what would make it a lie, and writes its report.

``pytest-lora export --format gab RUN -o DIR`` writes github-action-benchmark's two custom formats
(``customSmallerIsBetter.json``, ``customBiggerIsBetter.json``): every gated metric of every config,
for its charts and alerts.

It imports neither torch nor pytest's plugin machinery: it reads JSON. (``pytest-lora fetch MODEL``,
which puts a pretrained model on this machine, is ``pytest_lora.fetch``: ``pytest_lora.console``
sends it there.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from .results import baseline as baseline_module
from .gate import kinds
from .gate import rules as rules_module
from .gate.compare import check_record
from .gate.judge import Gate
from .results.identity import config_name
from .results.shards import MergeError
from .results.store import atomic_write_json
from .specs import whole_number

USAGE_ERROR = 4  # pytest's exit code for a usage error: the same for the in-run gate and this script
REAL_MODELS = ("smollm2-135m",)  # models.real.MODELS, which this script doesn't import (tests/test_real_model.py holds them equal)
GAB_FILES = {+1: "customSmallerIsBetter.json", -1: "customBiggerIsBetter.json"}


class UsageError(Exception):
    """A bad argument; the message says which and what is allowed."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit 2
        raise UsageError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    main = Parser(prog="pytest-lora", description="Compare, gate, report, merge and export pytest-lora results (runs nothing). "
                  "pytest-lora fetch MODEL gets a pretrained model (" + ", ".join(REAL_MODELS) + ").")
    commands = main.add_subparsers(dest="command", required=True, parser_class=Parser)
    comparing = commands.add_parser("compare", help="judge NEW against BASE (a results file or a directory of runs)")
    comparing.add_argument("base", metavar="BASE", help="baseline: a results JSON, or a directory of runs (the history)")
    comparing.add_argument("new", metavar="NEW", help="the run to judge: a results JSON, or a results directory (its latest.json)")
    comparing.add_argument("--fail", action="append", default=[], metavar="RULE", help="METRIC[:STAT]:THRESHOLD, as --lora-fail")
    comparing.add_argument("--history", default="5", type=_runs, metavar="N", help="passed runs of a BASE directory to compare with (default 5)")
    comparing.add_argument("--cross-hardware", action="store_true", help="compare timings measured on other hardware")
    reporting = commands.add_parser("report", help="write the report (markdown, CSV, plots) of one run, or several runs side by side")
    reporting.add_argument("runs", metavar="RUN", nargs="+", help="a results JSON, or a results directory (its latest.json)")
    reporting.add_argument("-o", "--output", metavar="DIR", help="where the files go (default: beside the first RUN)")
    merging = commands.add_parser("merge", help="join the results of --lora-shard=K/N runs into one run")
    merging.add_argument("shards", metavar="SHARD", nargs="+", help="a shard's results JSON, or its results directory (its latest.json)")
    merging.add_argument("-o", "--output", required=True, metavar="RUN.json", help="the joined run; its report, CSV and plots go beside it")
    merging.add_argument("--allow-mixed", action="store_true", help="join shards of different library versions, hardware or commits")
    exporting = commands.add_parser("export", help="write a run's gated metrics for another tool")
    exporting.add_argument("run", metavar="RUN", help="a results JSON, or a results directory (its latest.json)")
    exporting.add_argument("--format", required=True, choices=["gab"], help="gab: github-action-benchmark's custom JSON")
    exporting.add_argument("-o", "--output", default=".", metavar="DIR", help="where the two files go (default: here)")
    return main


def _runs(text: str) -> int:
    """A number of runs of a history: an integer >= 1."""
    number = whole_number(text)
    if number is None or number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of runs; allowed: an integer >= 1")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    try:
        arguments = parser().parse_args(argv)
        if arguments.command == "compare":
            return compare_command(arguments)
        if arguments.command == "report":
            return report_command(arguments)
        if arguments.command == "merge":
            return merge_command(arguments)
        return export_command(arguments)
    except (UsageError, baseline_module.BaselineError, rules_module.RuleError, MergeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR


def _run_file(path: str, where: str) -> dict[str, Any]:
    target = Path(path)
    if target.is_dir():
        target = target / "latest.json"
    if not target.is_file():
        raise UsageError(f"{where}: {path!r} is not a results file or a results directory with a latest.json")
    return baseline_module.read(target, where)


def compare_command(arguments: argparse.Namespace) -> int:
    from .gate.verdict import gate_lines
    from .report import terminal

    new = _run_file(arguments.new, "NEW")
    base = baseline_module.load(Path(arguments.base), "BASE", arguments.history)
    if base.is_history:  # a results directory holds the new run too: it is never its own baseline
        base.runs = [run for run in base.runs if run["run"].get("id") != new["run"].get("id")]
    rules = rules_module.merged([[rules_module.parse(text, "--fail") for text in arguments.fail]])
    comparison = Gate(rules, base, arguments.cross_hardware).judge(new["records"], new["machine"])
    for text, _ in gate_lines(comparison):
        print(f"pytest-lora: {text}")
    if comparison.regressions:
        checks = [check_record(check) for check in comparison.regressions]
        print(terminal.render_regressions_terminal("regressions", checks, 1000, sys.stdout.isatty()), end="")
    return 1 if comparison.regressions else 0


def report_command(arguments: argparse.Namespace) -> int:
    """One run: the same report, CSV and plots the run wrote, from its JSON. Several: a side-by-side
    markdown, ``runs-<first id>-<last id>.md``, and its tokens/s plot (``-speed.png``)."""
    from .report import markdown, plots
    from .report.publish import write_report
    from .results.store import atomic_write_text

    documents = [_run_file(path, "RUN") for path in arguments.runs]
    for path, document in zip(arguments.runs, documents):
        _recover(document, Path(path))
    first = Path(arguments.runs[0])
    directory = Path(arguments.output) if arguments.output else (first if first.is_dir() else first.parent)
    if len(documents) == 1:
        written = write_report(documents[0], directory, (documents[0]["run"]["id"],))
    else:
        stem = f"runs-{documents[0]['run']['id']}-{documents[-1]['run']['id']}"
        plot = directory / f"{stem}-speed.png"
        atomic_write_text(directory / f"{stem}.md", markdown.render_runs(documents, plot.name))
        drawn = plots.write_runs(documents, plot, markdown.run_labels(documents))
        written = [directory / f"{stem}.md", *([plot] if drawn else [])]
    for path in written:
        print(f"pytest-lora: wrote {path}")
    return 0


def _recover(document: dict[str, Any], path: Path) -> None:
    """A run that never finished: its xdist workers' journals may hold records its JSON lacks."""
    from .dist.journal import recover

    gained = recover(document, path if path.is_dir() else path.parent)
    if gained:
        print(f"pytest-lora: run {document['run']['id']} did not finish; {gained} record(s) taken from its workers' journals")


def merge_command(arguments: argparse.Namespace) -> int:
    """The shards joined (``results.shards``) into RUN.json, with its report, CSV and plots beside it."""
    from .report.publish import write_report
    from .results.shards import merge

    documents = [_run_file(path, "SHARD") for path in arguments.shards]
    output = Path(arguments.output)
    if output.suffix != ".json":
        raise UsageError(f"-o: {arguments.output!r} is not a .json path; allowed: e.g. -o results/run.json")
    joined = merge(documents, list(arguments.shards), arguments.allow_mixed)
    atomic_write_json(output, joined)
    written = [output, *write_report(joined, output.parent, (output.stem,))]
    print(f"pytest-lora: {len(joined['records'])} records of {len(documents)} shard(s), status {joined['run']['status']}")
    for path in written:
        print(f"pytest-lora: wrote {path}")
    return 0


def export_command(arguments: argparse.Namespace) -> int:
    document = _run_file(arguments.run, "RUN")
    entries = gab_entries(document)
    directory = Path(arguments.output)
    for direction, name in GAB_FILES.items():
        atomic_write_json(directory / name, entries[direction])
        print(f"pytest-lora: {len(entries[direction])} metrics in {directory / name}")
    return 0


def gab_entries(document: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """github-action-benchmark entries (name, unit, value, range, extra) by bad direction: +1
    smaller is better, -1 bigger is better. Every metric with a default rule of a kind that moves
    (timings, memory, correctness); counts are exact and not charted."""
    entries: dict[int, list[dict[str, Any]]] = {+1: [], -1: []}
    run, machine = document["run"], document["machine"]
    hardware = machine.get("gpu_name") or machine.get("cpu") or machine.get("device")
    for record in document["records"]:
        if record.get("status") != "ok":
            continue
        for metric, value in record["metrics"].items():
            unit = record.get("units", {}).get(metric)
            rule = rules_module.default_rule(metric, unit)
            if value is None or rule is None or not kinds.kind_of(metric, unit).export:
                continue
            entry = {"name": f"{config_name(record)} {metric}", "unit": unit or "", "value": value,
                     "extra": f"run {run.get('id')} on {hardware}, commit {(run.get('git') or {}).get('commit')}"}
            spread = record["metrics"].get("step_time_iqr_s") if metric == "step_time_median_s" else None
            if spread is not None:
                entry["range"] = f"IQR {spread:.4g}"
            entries[rules_module.bad_direction(metric)].append(entry)
    return entries


if __name__ == "__main__":  # python -m pytest_lora.cli
    sys.exit(main())
