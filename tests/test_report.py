"""The published report of a run, read as its readers read it.

The markdown is parsed with a GFM parser (markdown-it-py with the table extension, as GitHub
renders), never matched as text: a cell that breaks its table shows up as a row of the wrong
width. Each headline number is traced back to the records it comes from, and each reduction or
change is recomputed here from the records. The source is the session's run of every suite on
a small matrix (conftest's ``bench_run``), so these tests read exactly what ``pytest --lora-bench``
publishes; a few small documents, built here, check what is left out.
"""

from __future__ import annotations

import ast
import copy
import csv
import io
import json
import os
import re
import stat
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from conftest import BENCH_MATRIX, TINY
from pytest_lora import cli, matrix
from pytest_lora.report import catalog, headline, markdown, plots, spreadsheet, table, terminal
from pytest_lora.models import formats
from pytest_lora.specs import QUANTIZATIONS

# the matrix of the session's run: the default CPU matrix with conftest's BENCH_MATRIX in place of its dimensions
RUN_MATRIX = {**matrix.load_toml(matrix.DEFAULT_MATRIX_FILE, "default")["cpu"], **BENCH_MATRIX}
BASES = len(RUN_MATRIX["models"]) * len(RUN_MATRIX["quant"])  # its models x its formats
LORA_SPECS = len(RUN_MATRIX["ranks"]) * len(RUN_MATRIX["targets"])
STEP_CONFIGS = BASES * LORA_SPECS  # x its LoRA specs
OPTIMIZED = STEP_CONFIGS * len(RUN_MATRIX["optimizers"])  # the memory and step-time suites also take every optimizer
FULL_PRECISION = ("bf16", "none", "fp32", "fp16")  # the reference, the first of these the run measured
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


# ----------------------------------------------------------------- reading markdown as GitHub does


def parse(text: str) -> list[dict]:
    """The document as sections: heading, paragraphs, tables (header and rows of cell text), images."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    sections = [{"heading": "", "paragraphs": [], "tables": [], "images": []}]
    row: list[str] | None = None
    table: list[list[str]] | None = None
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            sections.append({"heading": inline_text(tokens[index + 1]), "level": int(token.tag[1]), "paragraphs": [], "tables": [], "images": []})
        elif token.type == "table_open":
            table = []
        elif token.type == "table_close":
            sections[-1]["tables"].append(table)
            table = None
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close":
            table.append(row)
        elif token.type == "inline" and row is not None and tokens[index - 1].type in ("th_open", "td_open"):
            row.append(inline_text(token))
        elif token.type == "inline" and tokens[index - 1].type == "paragraph_open":
            sections[-1]["paragraphs"].append(inline_text(token))
            sections[-1]["images"].extend(child.attrGet("src") for child in token.children if child.type == "image")
    return sections


def inline_text(token) -> str:
    return "".join(child.content for child in token.children or () if child.type in ("text", "code_inline", "softbreak"))


def section(sections: list[dict], heading: str) -> dict:
    (found,) = [s for s in sections if s["heading"] == heading]
    return found


def as_dicts(table: list[list[str]]) -> list[dict[str, str]]:
    header, *body = table
    return [dict(zip(header, row)) for row in body]


def number(text: str) -> float:
    return float(text.replace(",", ""))


def bytes_and_change(cell: str) -> tuple[float, str]:
    """``968 KiB (-10.0%)`` -> (991232.0, '-10.0%')."""
    match = re.fullmatch(r"([\d.]+) (B|KiB|MiB|GiB) \((.*)\)", cell)
    assert match, cell
    return float(match[1]) * UNITS[match[2]], match[3]


def change(value: float, reference: float) -> float:
    return (value - reference) / reference


def percent(text: str) -> float:
    return float(text.rstrip("%")) / 100


@pytest.fixture(scope="module")
def report(bench_run) -> list[dict]:
    run_id = bench_run.document["run"]["id"]
    text = (bench_run.results / f"{run_id}.md").read_text()
    assert text == (bench_run.results / "latest.md").read_text()
    return parse(text)


def records_of(document: dict, test: str) -> list[dict]:
    return [r for r in document["records"] if r["test"].split("[", 1)[0].rsplit("::", 1)[-1] == test]


def lora_label(record: dict) -> str:
    lora = record["lora"]
    return f"r{lora['r']} a{lora['alpha']:.4g} {lora['targets'] if isinstance(lora['targets'], str) else ','.join(lora['targets'])}"


def step_label(record: dict) -> str:
    """A training-step config as the tables name it: the spec and, with two optimizers, the workload."""
    workload = record["workload"]
    optimizer = "" if workload["optimizer"] == "adamw" else f" {workload['optimizer']}"
    return f"{lora_label(record)}, {workload['batch']}x{workload['seq_len']}{optimizer}"


def reference_of(records: list[dict], record: dict) -> dict:
    for quant in FULL_PRECISION:
        for other in records:
            if (other["model"], other["quant"], other["lora"], other["workload"]) == (record["model"], quant, record["lora"], record["workload"]):
                return other
    raise AssertionError(f"no full-precision base for {record['test']}")


# ----------------------------------------------------------------- structure


# The quality suite's full fine-tuning has no learning rate by default: an empty parameter set.
EMPTY = 1


def ok_records(run) -> int:
    """Every record of the session's run is ok but the GPU-only ones (peak memory and paging
    under pressure, one per step config and optimizer) and the empty full fine-tuning."""
    records = run.document["records"]
    assert sum(r["status"] == "skipped" for r in records) == 2 * OPTIMIZED + EMPTY
    return len(records) - 2 * OPTIMIZED - EMPTY


def test_the_report_opens_with_machine_versions_and_code_then_the_headline(report, bench_run):
    assert report[1]["heading"] == f"pytest-lora run {bench_run.document['run']['id']}"
    text = (bench_run.results / "latest.md").read_text()
    head = text.split("## Headline", 1)[0]
    machine = bench_run.document["machine"]
    for fact in ("**Machine**", machine["cpu"], f"torch {machine['torch']}", f"peft {machine['peft']}", f"bitsandbytes {machine['bitsandbytes']}",
                 "**Code**", (bench_run.document["run"]["git"]["commit"] or "not a git checkout")[:12], "**Records**", f"{ok_records(bench_run)} ok",
                 f"{2 * OPTIMIZED + EMPTY} skipped"):
        assert fact in head, fact
    headings = [s["heading"] for s in report if s.get("level") in (2, 3)]
    assert headings[:9] == ["Headline", "Memory", "Speed", "Serving", "Merge fidelity", "Forgetting", "Quality", "Trainable parameters",
                            "Published counts"]
    assert "Every record" in headings


def test_every_table_renders_as_a_table_with_every_row_as_wide_as_its_header(report, bench_run):
    tables = [table for s in report for table in s["tables"]]
    text = (bench_run.results / "latest.md").read_text()
    assert len(tables) == sum(1 for line in text.splitlines() if re.fullmatch(r"\|(-+:?\|)+", line))
    for table in tables:
        assert all(len(row) == len(table[0]) for row in table), table[0]
    drift = as_dicts(section(report, "merge: test_merge_full_precision")["tables"][0])[0]
    assert "merge_drift_k1 [max|W-W0|/max|W0|]" in drift  # a unit with pipes stays one header cell
    assert float(drift["merge_drift_k1 [max|W-W0|/max|W0|]"]) >= 0


def test_the_full_tables_leave_out_skipped_configs_and_empty_columns(report, bench_run):
    headings = [s["heading"] for s in report]
    assert "memory: test_step_peak_memory" not in headings  # all skipped on a CPU
    for s in report[headings.index("Every record"):]:
        for row in as_dicts(s["tables"][0]) if s["tables"] else ():
            assert row.get("status") != "skipped"
    step = as_dicts(section(report, "step_time: test_step_time")["tables"][0])
    assert len(step) == OPTIMIZED and "mfu [fraction]" not in step[0] and "tokens_per_s [tokens/s]" in step[0]


# ----------------------------------------------------------------- headline numbers


def test_memory_grid_is_the_measured_step_with_its_change_from_the_full_precision_base(report, bench_run):
    steps = [r for r in records_of(bench_run.document, "test_step_memory") if r["status"] == "ok"]
    weights = {(r["model"], r["quant"]): r["metrics"]["weight_bytes"] for r in records_of(bench_run.document, "test_weight_storage")}

    def measured(record: dict) -> int:
        m = record["metrics"]
        return weights[record["model"], record["quant"]] + m["adapter_bytes"] + m["gradient_bytes"] + m["optimizer_state_bytes"] + m["activation_bytes"]

    rows = {(row["model"], row["quant"]): row for row in as_dicts(section(report, "Memory")["tables"][0])}
    assert len(rows) == BASES and len(steps) == OPTIMIZED
    for record in steps:
        shown, shown_change = bytes_and_change(rows[record["model"], record["quant"]][step_label(record)])
        assert abs(shown - measured(record)) <= 0.005 * measured(record)  # three significant figures
        reference = reference_of(steps, record)
        if reference is record:
            assert shown_change == "ref"
        elif measured(record) == measured(reference):
            assert shown_change == "="
        else:
            assert abs(percent(shown_change) - change(measured(record), measured(reference))) <= 0.0005
    # quantization shrinks the base: on every model and spec nf4 is below its bf16 reference
    assert all(percent(bytes_and_change(cell)[1]) < 0 for (model, quant), row in rows.items() if quant == "nf4"
               for column, cell in row.items() if column not in ("model", "quant"))


def test_speed_table_gives_each_config_its_tokens_per_second_and_change_from_the_base(report, bench_run):
    timed = records_of(bench_run.document, "test_step_time")
    rows = as_dicts(section(report, "Speed")["tables"][0])
    assert len(rows) == len(timed) == OPTIMIZED
    shown = {(row["model"], row["quant"], row["lora"]): row for row in rows}
    for record in timed:
        row = shown[record["model"], record["quant"], step_label(record)]
        metrics = record["metrics"]
        assert number(row["tokens/s"]) == round(metrics["tokens_per_s"])
        assert float(row["step time [s]"]) == pytest.approx(metrics["step_time_median_s"], rel=5e-4)
        assert float(row["IQR [s]"]) == pytest.approx(metrics["step_time_iqr_s"], rel=5e-4)
        assert metrics["tokens_per_s"] == pytest.approx(record["workload"]["batch"] * record["workload"]["seq_len"] / metrics["step_time_median_s"])
        reference = reference_of(timed, record)
        if reference is record:
            assert row["vs base"] == "ref"
        else:
            assert percent(row["vs base"]) == pytest.approx(change(metrics["tokens_per_s"], reference["metrics"]["tokens_per_s"]), abs=5e-4)
    assert "MFU" not in rows[0]  # no MFU on a CPU: the column is left out


def test_merge_fidelity_gives_each_strategy_per_quantization_and_names_the_best(report, bench_run):
    trained = {r["quant"]: r["metrics"] for r in records_of(bench_run.document, "test_merge_on_a_trained_model")}
    part = section(report, "Merge fidelity")
    rows = {row["quant"]: row for row in as_dicts(part["tables"][0])}
    assert set(rows) == set(trained)
    best_of = {}
    for quant, metrics in trained.items():
        suffixes = {"peft merge": "_requantize", "dequantized": "_dequantize", "original": "_original"} if "merge_kl_requantize" in metrics else {"peft merge": ""}
        for strategy, suffix in suffixes.items():
            assert float(rows[quant][f"{strategy} KL [nats]"]) == pytest.approx(metrics[f"merge_kl{suffix}"], rel=0.05)
            assert percent(rows[quant][f"{strategy} top-1"]) == pytest.approx(metrics[f"merge_top1{suffix}"], abs=5e-4)
        if len(suffixes) > 1:
            best_of[quant] = min(suffixes, key=lambda s: metrics[f"merge_kl{suffixes[s]}"])
    best = max(set(best_of.values()), key=list(best_of.values()).count)
    verdict = part["paragraphs"][0]
    assert verdict.startswith(f"On a quantized base use the {best} merge")
    assert f"on {list(best_of.values()).count(best)} of {len(best_of)} formats" in verdict


def test_serving_table_shows_each_variants_latency_from_the_records(report, bench_run):
    timed = records_of(bench_run.document, "test_serving_latency")
    rows = as_dicts(section(report, "Serving")["tables"][0])
    assert len(rows) == len(timed) == STEP_CONFIGS  # every base and LoRA spec, one serving workload
    shown = {(row["model"], row["quant"], row["lora"]): row for row in rows}
    for record in timed:
        row, metrics = shown[record["model"], record["quant"], lora_label(record)], record["metrics"]
        for column, metric in (("prefill base [ms]", "base_prefill_median_s"), ("decode/token base [ms]", "base_decode_token_median_s")):
            assert float(row[column]) == pytest.approx(1000 * metrics[metric], rel=5e-3)
        assert percent(row["unmerged vs merged"]) == pytest.approx(metrics["unmerged_over_merged_decode_token_pct"] / 100, abs=0.005)
        assert metrics["unmerged_over_merged_decode_token_pct"] == pytest.approx(
            100 * (metrics["unmerged_decode_token_median_s"] / metrics["merged_decode_token_median_s"] - 1))
        assert ("dequantized_merged_prefill_median_s" in metrics) == QUANTIZATIONS[record["quant"]].is_quantized


def test_forgetting_sets_lora_beside_full_finetuning_with_the_spread_over_seeds(report, bench_run):
    methods = records_of(bench_run.document, "test_forgetting_lora") + records_of(bench_run.document, "test_forgetting_full_finetuning")
    rows = as_dicts(section(report, "Forgetting")["tables"][0])
    assert len(rows) == len(methods) == LORA_SPECS + 2  # a LoRA run per spec, full fine-tuning at two learning rates
    for row, record in zip(rows, methods):
        metrics = record["metrics"]
        for column, metric in (("learning [nats]", "learning_delta_loss"), ("forgetting [nats]", "forgetting_delta_loss")):
            mean, spread = row[column].split(" ± ")
            assert float(mean) == pytest.approx(metrics[metric], rel=5e-3)
            assert float(spread) == pytest.approx(metrics[f"{metric}_std"], rel=5e-2)
        assert int(row["seeds"]) == metrics["seeds"] == 2  # the run's --lora-seeds
    assert sum(row["method"].startswith("full fine-tuning") for row in rows) == 2


def test_parameter_counts_per_config_and_the_published_counts_reproduced(report, bench_run):
    counted = records_of(bench_run.document, "test_trainable_parameters")
    rows = as_dicts(section(report, "Trainable parameters")["tables"][0])
    assert len(rows) == len(RUN_MATRIX["models"]) * LORA_SPECS  # every quantization counts the same
    for record in counted:  # peft's own total: equal where peft counts the format's weights, short of HQQ's packed ones
        peft_total, total = record["metrics"]["peft_total_params"], record["metrics"]["total_params"]
        assert peft_total == total if formats.of(QUANTIZATIONS[record["quant"]]).peft_counts_weights else peft_total < total
    for row in rows:
        matching = [r for r in counted if r["model"] == row["model"] and lora_label(r) == row["lora"]]
        assert row["quant"] == "all" and len(matching) == len(RUN_MATRIX["quant"])
        assert {(r["metrics"]["trainable_params"], r["metrics"]["total_params"]) for r in matching} == {(number(row["trainable"]), number(row["total"]))}
        assert float(row["trainable [%]"]) == pytest.approx(100 * number(row["trainable"]) / number(row["total"]), rel=5e-3)
    published = section(report, "Published counts")
    assert published["paragraphs"][0].startswith("6 of 6 published counts reproduced exactly")
    flan = next(row for row in as_dicts(published["tables"][0]) if row["model"] == "flan-t5-xxl")
    assert (flan["trainable"], flan["published"], flan["total"], flan["reproduced"]) == ("18,874,368", "18,874,368", "11,154,206,720", "yes")


# ----------------------------------------------------------------- plots, CSV, report command


def test_every_plot_is_written_linked_and_captioned(report, bench_run):
    run_id = bench_run.document["run"]["id"]
    images = [image for s in report for image in s["images"]]
    assert images == [f"{run_id}-{name}.png" for name in ("memory", "speed", "merge", "forgetting", "quality")]
    for image in images:
        assert (bench_run.results / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = bench_run.document["machine"]
    assert plots.caption(bench_run.document) == (f"cpu: {machine['cpu']}; torch {machine['torch']}, peft {machine['peft']}, "
                                                    f"bitsandbytes {machine['bitsandbytes']}; run {run_id}")


def test_the_speed_plots_whiskers_are_the_quartiles_of_the_steps(bench_run):
    import statistics

    record = next(r for r in records_of(bench_run.document, "test_step_time") if r["status"] == "ok")
    samples = sorted(record["samples"]["tokens_per_s"])
    bars = plots.speed_bars(bench_run.document["records"])[record["model"]][step_label(record)][record["quant"]]
    low, _, high = statistics.quantiles(samples, n=4, method="inclusive")  # numpy's linear interpolation
    assert bars == (record["metrics"]["tokens_per_s"], pytest.approx(low), pytest.approx(high)) and low <= high


def small_document(records: list[dict]) -> dict:
    return {"schema_version": 1, "run": {"id": "20260101-000000-abcdef", "git": {}, "argv": []},
            "machine": {"device": "cpu", "cpu": "test"}, "records": records}


def test_a_plot_with_nothing_to_show_is_not_written(bench_run, tmp_path):
    counts = [r for r in bench_run.document["records"] if "test_trainable_parameters" in r["test"]]
    assert plots.write(small_document(counts), tmp_path) == [] and list(tmp_path.iterdir()) == []
    forgetting = [r for r in bench_run.document["records"] if r["suite"] == "forgetting"]
    written = plots.write(small_document(forgetting), tmp_path)
    assert [path.name for path in written] == ["20260101-000000-abcdef-forgetting.png"] and len(list(tmp_path.iterdir())) == 1
    text = markdown.render_run(small_document(counts))
    assert ".png" not in text and "### Memory" not in text and "### Trainable parameters" in text
    skipped = [r for r in bench_run.document["records"] if "test_step_peak_memory" in r["test"]]
    assert plots.available(skipped) == [] and headline.sections(skipped) == []


def test_csv_has_one_row_per_record_equal_to_the_json(bench_run):
    document = bench_run.document
    rows = list(csv.DictReader(io.StringIO((bench_run.results / "latest.csv").read_text(), newline="")))
    assert len(rows) == len(document["records"])
    for row, record in zip(rows, document["records"]):
        assert (row["run_id"], row["test"], row["model"], row["quant"], row["status"]) == (
            document["run"]["id"], record["test"], record["model"] or "", record["quant"] or "", record["status"])
        if record["lora"] and record["lora"]["r"] is not None:
            assert int(row["lora_r"]) == record["lora"]["r"] and float(row["lora_alpha"]) == record["lora"]["alpha"]
        workload = record["workload"]
        if workload and "seq_len" in workload:  # a training step's
            assert (int(row["batch"]), int(row["seq_len"]), row["optimizer"]) == (workload["batch"], workload["seq_len"], workload.get("optimizer", ""))
        elif workload:  # a serving workload
            assert (int(row["batch"]), int(row["prompt_len"]), int(row["new_tokens"])) == (workload["batch"], workload["prompt_len"], workload["new_tokens"])
        for metric, value in record["metrics"].items():
            cell = row[f"{metric} [{record['units'][metric]}]"]
            assert (cell == "" if value is None else ast.literal_eval(cell) == value), (metric, cell, value)
        shown = {name for name, cell in row.items() if "[" in name and cell != ""}
        assert shown == {f"{m} [{record['units'][m]}]" for m, v in record["metrics"].items() if v is not None}


def test_report_command_writes_the_same_report_from_the_saved_run(bench_run, tmp_path):
    run_id = bench_run.document["run"]["id"]
    assert cli.main(["report", str(bench_run.latest), "-o", str(tmp_path)]) == 0
    assert (tmp_path / f"{run_id}.md").read_text() == (bench_run.results / f"{run_id}.md").read_text()
    assert (tmp_path / f"{run_id}.csv").read_text() == (bench_run.results / f"{run_id}.csv").read_text()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in bench_run.results.glob(f"{run_id}-*.png"))


def test_report_command_sets_several_runs_side_by_side(bench_run, tmp_path):
    other = copy.deepcopy(bench_run.document)
    other["run"]["id"] = "20990101-000000-ffffff"
    other["machine"].update(device="cuda", gpu_name="NVIDIA H200", torch="2.11.0")
    for record in other["records"]:
        if record["metrics"].get("tokens_per_s"):
            record["metrics"]["tokens_per_s"] *= 2
        if record["metrics"].get("quality_loss"):
            record["metrics"]["quality_loss"] += 0.5
    (tmp_path / "gpu.json").write_text(json.dumps(other))
    assert cli.main(["report", str(bench_run.latest), str(tmp_path / "gpu.json"), "-o", str(tmp_path)]) == 0
    written = tmp_path / f"runs-{bench_run.document['run']['id']}-20990101-000000-ffffff.md"
    sections = parse(written.read_text())
    rows = as_dicts(section(sections, "tokens/s")["tables"][0])
    assert len(rows) == OPTIMIZED
    first = next(r for r in records_of(bench_run.document, "test_step_time"))
    assert rows[0]["config"] == f"{first['model']} {first['quant']} {lora_label(first)} 2x64"
    header = list(rows[0])
    assert header[1].startswith("run 1: ") and header[2] == "run 2: NVIDIA H200, torch 2.11.0" and rows[0]["change"] == "+100.0%"
    memory = as_dicts(sections[2]["tables"][0])  # the step memory the headline grid shows, per run
    step = next(r for r in records_of(bench_run.document, "test_step_memory"))
    weights = next(r for r in records_of(bench_run.document, "test_weight_storage") if (r["model"], r["quant"]) == (step["model"], step["quant"]))
    measured = weights["metrics"]["weight_bytes"] + sum(step["metrics"][m] for m in ("adapter_bytes", "gradient_bytes", "optimizer_state_bytes", "activation_bytes"))
    assert sections[2]["heading"].startswith("step memory in bytes") and number(memory[0][header[1]]) == measured and memory[0]["change"] == "="
    quality = as_dicts(section(sections, "held-out loss after fine-tuning (nats), LoRA")["tables"][0])
    lora = next(r for r in records_of(bench_run.document, "test_quality_lora") if r["status"] == "ok")
    assert number(quality[0][header[1]]) == pytest.approx(lora["metrics"]["quality_loss"], abs=1e-3)
    assert number(quality[0][header[2]]) == pytest.approx(lora["metrics"]["quality_loss"] + 0.5, abs=1e-3)
    plot = written.with_name(written.stem + "-speed.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sections[0]["images"] + sections[1]["images"] == [plot.name]
    assert plots.runs_speed([bench_run.document, other])[rows[0]["config"]] == [first["metrics"]["tokens_per_s"], 2 * first["metrics"]["tokens_per_s"]]
    counts_only = [r for r in bench_run.document["records"] if "test_trainable_parameters" in r["test"]]
    assert not plots.write_runs([small_document(counts_only)] * 2, tmp_path / "none.png", ["a", "b"]) and not (tmp_path / "none.png").exists()
    assert cli.main(["report", str(tmp_path / "missing.json")]) == cli.USAGE_ERROR


# ----------------------------------------------------------------- terminal


def test_the_bench_runs_terminal_summary_fits_a_screen(bench_run):
    summary = bench_run.stdout.split("pytest-lora results", 1)[1].splitlines()[1:]
    summary = summary[:next(i for i, line in enumerate(summary) if re.search(r"\d+ passed", line))]
    assert 20 < len(summary) < 80, "\n".join(summary)
    assert max(len(line) for line in summary) <= 120
    text = "\n".join(summary)
    for title in ("Memory:", "Speed:", "Serving:", "Merge fidelity:", "Forgetting:", "Quality:", "Trainable parameters:", "Published counts:"):
        assert title in text
    assert f"{ok_records(bench_run)} ok, {2 * OPTIMIZED + EMPTY} skipped" in text and "latest.json" in text
    assert "warnings summary" not in bench_run.stdout  # library noise the harness causes is filtered


def test_full_tables_with_the_report_option_or_verbose(pytester, suite):
    suite()
    compact = pytester.runpytest("--lora-bench", *TINY, "-p", "no:cacheprovider")
    compact.stdout.fnmatch_lines(["*pytest-lora params: test_count*"])  # a user's own test has no headline: its table shows
    for flag in ("--lora-report=full", "-v"):
        pytester.runpytest("--lora-bench", *TINY, flag).stdout.fnmatch_lines(["*pytest-lora params: test_count*", "*r8 a16 q_proj,v_proj*"])
    bad = pytester.runpytest("--lora-bench", *TINY, "--lora-report=everything")
    assert bad.ret == 4
    bad.stderr.fnmatch_lines(["*--lora-report: 'everything' is not a report; allowed: summary, full*"])


def test_wide_tables_are_cut_into_column_groups_that_fit(bench_run):
    from pytest_lora.report import table

    merged = [r for r in bench_run.document["records"] if "test_merge_quantized" in r["test"]]
    text = terminal.render_full_terminal(merged, 120, False)
    assert max(len(line) for line in text.splitlines()) <= 120
    groups = re.findall(r"pytest-lora merge: test_merge_quantized \((\d)/(\d)\)", text)
    assert len(groups) >= 2 and all(total == str(len(groups)) for _, total in groups)
    llama_rows = sum(r["model"] == "llama-3.2-1b-tiny" for r in merged)  # its quantized formats x the LoRA specs
    assert llama_rows == LORA_SPECS * sum(QUANTIZATIONS[q].is_quantized for q in RUN_MATRIX["quant"])
    assert text.count("llama-3.2-1b-tiny") == len(groups) * llama_rows  # every row in every group


def test_results_files_are_created_with_the_users_permissions(pytester, suite):
    suite()
    mask = os.umask(0o027)
    try:
        pytester.runpytest("--lora-bench", *TINY).assert_outcomes(passed=1)
    finally:
        os.umask(mask)
    for path in (pytester.path / "results").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


def suite_tests() -> dict[str, str]:
    """Each test function of suites/ -> the marker of its module (``pytestmark``)."""
    found = {}
    for path in (Path(__file__).parent.parent / "suites").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        marker = next(node.value.attr for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "pytestmark")
        found.update({node.name: marker for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")})
    return found


def test_the_catalog_lists_every_suite_test_under_its_marker():
    assert {test: suite.marker for suite in catalog.SUITES for test in suite.tests} == suite_tests()


def test_no_suite_test_is_named_outside_the_suites_and_the_catalog():
    """The report's parts name a suite's test through ``catalog`` only: a string literal elsewhere
    would be a second place to change when a suite changes."""
    names = set(suite_tests())
    package = Path(catalog.__file__).parents[1]
    found = [f"{path.relative_to(package)}:{node.lineno} {node.value}" for path in package.rglob("*.py") if path.name != "catalog.py"
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and any(name in node.value for name in names)]
    assert found == []


def test_a_cell_is_escaped_for_github():
    text = "\n".join(markdown.table(["unit [a|b]", "n"], [["x*y <b> `c` \\ d\ne", "1"]], 1))
    (table,) = parse(text)[0]["tables"]
    assert table == [["unit [a|b]", "n"], ["x*y <b> `c` \\ d e", "1"]]


def test_the_spreadsheet_keeps_floats_exactly():
    document = small_document([{"suite": "s", "test": "t::test_x", "model": None, "quant": None, "lora": None, "workload": None,
                                "status": "ok", "metrics": {"v": 0.1 + 0.2, "n": 3, "missing": None}, "units": {"v": "s", "n": "n", "missing": "s"},
                                "error": None}])
    (row,) = csv.DictReader(io.StringIO(spreadsheet.render(document)))
    assert float(row["v [s]"]) == 0.1 + 0.2 and row["n [n]"] == "3" and row["missing [s]"] == ""


@pytest.mark.parametrize("directory, which", [("results/published", "tiny"), ("results/published/real", "real")])
def test_the_readme_shows_the_published_runs_headline(directory, which):
    """The README's headline blocks are the compact headlines of the runs committed under
    results/published/ (the tiny models) and results/published/real/ (the pretrained model), the
    pretrained model's first."""
    root = Path(__file__).parent.parent
    (published,) = (root / directory).glob("*.json")
    document = json.loads(published.read_text())
    readme = (root / "README.md").read_text()
    block = markdown.published_headline(document, directory, which)
    assert block in readme
    assert readme.index(markdown.REAL_README_START) < readme.index(markdown.README_START)
    assert document["run"]["status"] == "passed" and not document["run"]["git"]["dirty"]
    for name in ("md", "csv"):
        written = published.with_suffix(f".{name}").read_bytes().decode("utf-8")  # as written: the CSV's lines end in \r\n
        assert written == (markdown.render_run(document) if name == "md" else spreadsheet.render(document))
    for image in re.findall(r"\]\((results/published/[^)]+\.png)\)", block):
        assert (root / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_new_headline_block_replaces_its_own_and_the_pretrained_models_leads():
    tiny = "\n".join([markdown.README_START, "tiny", markdown.README_END])
    real = "\n".join([markdown.REAL_README_START, "real", markdown.REAL_README_END])
    readme = f"# title\n\n{tiny}\n\nrest\n"
    first = markdown.with_published_headline(readme, real)
    assert first == f"# title\n\n{real}\n\n{tiny}\n\nrest\n"
    again = markdown.with_published_headline(first, real.replace("real\n", "real again\n"))
    assert again == first.replace("real\n", "real again\n")
    assert markdown.with_published_headline(again, tiny.replace("tiny\n", "tiny 2\n")) == again.replace("\ntiny\n", "\ntiny 2\n")


def record(test: str, quant: str, metrics: dict, status: str = "ok", dropout: float = 0.05, model: str = "llama-3.1-8b") -> dict:
    units = {name: "bytes" if name.endswith("bytes") else "x" for name in metrics}
    return {"suite": "s", "test": f"suites/t.py::{test}[{quant}-{dropout}]", "model": model, "quant": quant,
            "lora": {"r": 16, "alpha": 32, "targets": "all-linear", "dropout": dropout, "variant": "lora", "bias": "none", "modules_to_save": []},
            "workload": {"batch": 2, "seq_len": 2048, "grad_ckpt": False, "compile": False}, "status": status,
            "metrics": metrics, "units": units, "error": None, "warnings": []}


def test_on_a_gpu_the_grid_is_the_peak_an_oom_says_so_and_mfu_is_shown():
    """What a GPU run's records give: the step's peak, an OOM cell, MFU as a percentage (records as the GPU suites write them)."""
    gib = 2**30
    records = [record("test_step_peak_memory", "bf16", {"peak_allocated_bytes": 57 * gib}),
               record("test_step_peak_memory", "nf4", {"peak_allocated_bytes": 47 * gib}),
               record("test_step_peak_memory", "int8", {"peak_allocated_bytes": 140 * gib}, status="oom"),
               record("test_step_time", "bf16", {"step_time_median_s": 2.0, "step_time_iqr_s": 0.01, "tokens_per_s": 2048.0, "mfu": 0.41}),
               record("test_step_time", "nf4", {"step_time_median_s": 2.5, "step_time_iqr_s": 0.02, "tokens_per_s": 1638.4, "mfu": 0.33})]
    memory = headline.memory_section(records)
    assert memory.notes[0].startswith("peak allocated bytes in one training step")
    cells = {row[1]: row[2] for row in memory.rows}
    assert cells == {"bf16": "57 GiB (ref)", "nf4": f"47 GiB ({(47 - 57) / 57:+.1%})", "int8": "oom"}
    speed = as_dicts([headline.speed_section(records).header, *headline.speed_section(records).rows])
    assert [(row["quant"], row["vs base"], row["MFU"]) for row in speed] == [("bf16", "ref", "41.0%"), ("nf4", "-20.0%", "33.0%")]
    assert "total" in plots.memory_bars(records + [record("test_step_memory", "nf4", {"adapter_bytes": 1, "gradient_bytes": 1,
                                                                                          "optimizer_state_bytes": 2, "activation_bytes": 5})])["llama-3.1-8b"]["r16 a32 all-linear"]["nf4"]


def test_specs_that_differ_only_in_dropout_get_columns_of_their_own():
    steps = [record("test_step_time", quant, {"step_time_median_s": 1.0, "step_time_iqr_s": 0.0, "tokens_per_s": tokens}, dropout=dropout)
             for quant, dropout, tokens in (("bf16", 0.0, 100.0), ("bf16", 0.1, 80.0), ("nf4", 0.0, 50.0), ("nf4", 0.1, 60.0))]
    rows = headline.speed_section(steps).rows
    assert [(row[1], row[2], row[-1]) for row in rows] == [("bf16", "r16 a32 all-linear, dropout 0.0", "ref"), ("bf16", "r16 a32 all-linear, dropout 0.1", "ref"),
                                                          ("nf4", "r16 a32 all-linear, dropout 0.0", "-50.0%"), ("nf4", "r16 a32 all-linear, dropout 0.1", "-25.0%")]


def test_the_memory_headline_says_when_an_8bit_optimizers_state_is_fp32():
    """An ``adamw8bit`` row whose adapter tensors are all under min_8bit_size holds fp32 moments:
    the memory section says how much of its state is 8-bit; a fully 8-bit state needs no note."""
    def step(share: float, test: str = catalog.STEP_MEMORY) -> dict:
        return {"suite": "memory", "test": f"suites/test_memory.py::{test}[x]", "model": "m", "quant": "bf16", "lora": None,
                "workload": {"batch": 2, "seq_len": 64, "optimizer": "adamw8bit"}, "status": "ok",
                "metrics": {"optimizer_8bit_share": share, "adapter_bytes": 1}, "units": {}, "warnings": [], "samples": {}}

    assert headline.eight_bit_notes([step(0.0), step(0.96, catalog.STEP_MEMORY_8BIT)]) == [
        "adamw8bit: 0.0% to 96.0% of the trainable parameters have 8-bit moments (tensors under bitsandbytes' min_8bit_size, "
        "4,096 elements, keep fp32 moments)"]
    assert headline.eight_bit_notes([step(1.0)]) == []


def test_the_forgetting_headline_names_its_model_reads_exact_match_and_gives_no_spread_of_one_seed():
    def method(test: str, lora: dict, seeds: int, diverged: int = 0) -> dict:
        return {"suite": "forgetting", "test": f"suites/test_forgetting.py::{test}[x]", "model": "smollm2-135m: prose -> addition",
                "quant": None, "lora": lora, "workload": None, "status": "ok", "units": {}, "warnings": [], "samples": {},
                "metrics": {"learning_delta_loss": 0.69, "learning_delta_loss_std": 0.0 if seeds == 1 else 0.01, "forgetting_delta_loss": 0.42,
                            "forgetting_delta_loss_std": 0.0 if seeds == 1 else 0.02, "learn_exact_match_after": 0.4688, "seeds": seeds,
                            "diverged": diverged}}

    lora = {"r": 8, "alpha": 16, "targets": "default", "variant": "lora"}
    full = {"r": None, "targets": "all parameters", "variant": "full fine-tuning, lr 0.001"}
    section = headline.forgetting_section([method(catalog.FORGETTING_LORA, lora, 1), method(catalog.FORGETTING_FULL, full, 2, diverged=1)])
    assert section.header == ["method", "learning [nats]", "forgetting [nats]", "exact match", "seeds"]
    assert section.rows[0][1:] == ["0.69", "0.42", "46.9%", "1"]  # one seed: no "± 0"
    assert section.rows[1][1:3] == ["0.69 ± 0.01", "0.42 ± 0.02"]
    assert section.notes[0].startswith("On smollm2-135m: prose -> addition. ")
    assert "Diverged (loss on the new task went up in a seed), never LoRA's reference: full fine-tuning, lr 0.001." in section.notes


def test_the_merge_headline_leads_with_the_model_measured_on_text_and_names_each_source():
    def merged(test: str, model: str, text: int | None = None) -> dict:
        metrics = {"merge_kl_dequantize": 1e-4, "merge_top1_dequantize": 0.9, **({"text_inputs": text} if text is not None else {})}
        return {"suite": "merge", "test": f"suites/test_merge.py::{test}[x]", "model": model, "quant": "nf4", "lora": None,
                "workload": None, "status": "ok", "metrics": metrics, "units": {}, "warnings": [], "samples": {}}

    trained = merged(catalog.MERGE_TRAINED, "llama-3.2-1b-tiny (trained on A)")
    toys = [merged(catalog.MERGE_QUANTIZED, "gpt2-medium-tiny", 0), merged(catalog.MERGE_QUANTIZED, "llama-3.2-1b-tiny", 0)]
    real = merged(catalog.MERGE_QUANTIZED, "smollm2-135m", 1)
    chosen, what = headline.merge_source([trained, *toys, real])
    assert chosen == [real] and what.startswith("smollm2-135m, on held-out prose")
    chosen, what = headline.merge_source([trained, *toys])
    assert chosen == [trained] and what.startswith("llama-3.2-1b-tiny (trained on A)")
    assert headline.merge_source(toys)[1].startswith("median over the matrix's random-weight configs of gpt2-medium-tiny, llama-3.2-1b-tiny")
    assert "smollm2-135m, on held-out prose" in headline.merge_section([real], compact=True).notes[1]


def test_the_merge_headline_says_what_each_merge_keeps_of_a_fine_tune_that_has_answers():
    """On a task with answers (addition on a pretrained checkpoint) the merge section says the
    exact match of the unmerged adapter and of each strategy, per format in the matrix's order,
    beside the base's before fine-tuning; a task without answers adds no note."""
    def trained(quant: str, **exact: float) -> dict:
        metrics = {"merge_kl_dequantize": 1e-3, "merge_top1_dequantize": 0.99, "base_exact_b": 0.026, **exact}
        return {"suite": "merge", "test": f"suites/test_merge.py::{catalog.MERGE_TRAINED}[{quant}]", "model": "smollm2-135m (LoRA on addition)",
                "quant": quant, "lora": None, "workload": None, "status": "ok", "metrics": metrics, "units": {}, "warnings": [], "samples": {}}

    nf4 = trained("nf4", unmerged_exact_b=0.573, merged_exact_b_requantize=0.042, merged_exact_b_dequantize=0.573, merged_exact_b_original=0.615)
    bf16 = trained("bf16", unmerged_exact_b=0.594, merged_exact_b=0.604)
    [note] = headline.fine_tune_kept_notes([nf4, bf16])
    assert note == ("What each merge keeps of a fine-tune (smollm2-135m (LoRA on addition), test_merge_on_a_trained_model): exact match on "
                    "the task's held-out problems, 2.6% before fine-tuning; bf16 unmerged 59.4%, peft merge 60.4%; nf4 unmerged 57.3%, "
                    "peft merge 4.2%, dequantized 57.3%, original 61.5%.")
    assert note in headline.merge_section([nf4, bf16]).notes
    without_answers = {**bf16, "metrics": {"merge_kl_dequantize": 1e-3, "merge_top1_dequantize": 0.99, "unmerged_loss_b": 1.2}}
    assert headline.fine_tune_kept_notes([without_answers]) == []


def test_the_full_tables_say_what_went_wrong_under_a_table_with_an_errored_row():
    def row(status: str, error: str | None) -> dict:
        return {"suite": "serving", "test": f"suites/test_serving.py::test_x[{status}]", "model": "smollm2-135m", "quant": "bf16",
                "lora": None, "workload": None, "status": status, "metrics": {"n": 1}, "units": {"n": "n"}, "warnings": [], "samples": {},
                "error": error}

    records = [row("ok", None), row("error", "AssertionError: rows [2] of the mixed batch differ\nTraceback ..."), row("oom", "x" * 400)]
    lines = markdown.full_tables(records)
    assert "error: smollm2-135m bf16: AssertionError: rows [2] of the mixed batch differ" in lines
    [oom] = [line for line in lines if line.startswith("oom: ")]
    assert oom == "oom: smollm2-135m bf16: " + "x" * 297 + "..."
    assert table.error_notes([row("ok", None)]) == []


def test_the_merge_headline_says_when_the_models_logits_differ_in_spread():
    """T5's random output layer gives logits 47x a random Llama's: its KLs are not comparable with
    Llama's, and the merge section says so, naming each model's spread."""
    def merged(model: str, std: float) -> dict:
        return {"suite": "merge", "test": f"suites/test_merge.py::{catalog.MERGE_QUANTIZED}[x]", "model": model, "quant": "nf4",
                "lora": None, "workload": None, "status": "ok", "metrics": {"reference_logit_std": std, "merge_kl_dequantize": 1e-6},
                "units": {}, "warnings": [], "samples": {}}

    apart = headline.logit_scale_notes([merged("t5", 8.2), merged("llama", 0.17), merged("gpt2", 0.17)])
    assert apart and "t5 8.2 (48x), llama 0.17 (1x), gpt2 0.17 (1x)" in apart[0]
    assert headline.logit_scale_notes([merged("llama", 0.17), merged("gpt2", 0.6)]) == []
    assert headline.logit_scale_notes([merged("llama", 0.17)]) == []


def test_the_full_tables_mark_the_rows_whose_kls_cant_be_set_beside_the_others_and_say_why():
    """The rows of a model whose logits spread more than 10x wider carry a mark, and the reason is
    printed under the table, in markdown and on the terminal; models within 10x are not marked."""
    def merged(model: str, std: float, kl: float) -> dict:
        return {"suite": "merge", "test": f"suites/test_merge.py::{catalog.MERGE_QUANTIZED}[{model}]", "model": model, "quant": "nf4",
                "lora": None, "workload": None, "status": "ok", "metrics": {"reference_logit_std": std, "merge_kl_dequantize": kl},
                "units": {"reference_logit_std": "logits", "merge_kl_dequantize": "nats"}, "warnings": [], "samples": {}}

    records = [merged("t5", 8.4, 1e-4), merged("llama", 0.17, 4e-7), merged("gpt2", 0.17, 3e-7)]
    header, body, _ = table.rows(records)
    assert [row[header.index("model")] for row in body] == ["t5 †", "llama", "gpt2"]
    [note] = table.row_notes(records)
    assert note.startswith("† logits spread wider than llama's (0.17") and "t5 8.4 (49x)" in note and "square" in note
    assert "_init_weights" in note  # the library's line that makes a random T5's logits wide
    assert note in markdown.full_tables(records)
    assert "t5 8.4 (49x)" in " ".join(terminal.render_full_terminal(records, 120, False).split())
    close = [merged("llama", 0.17, 4e-7), merged("gpt2", 1.6, 3e-7)]
    assert table.row_notes(close) == [] and all("†" not in cell for row in table.rows(close)[1] for cell in row)
