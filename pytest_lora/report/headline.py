"""The headline of a run: the answers a reader looks for, each a small table.

What does quantization save (memory), what does it cost (speed and serving), which merge to use
(fidelity), how much does LoRA forget against full fine-tuning, does a quantized base fine-tune
as well as a 16-bit one (quality: verdicts first, ``report.quality``), and how many parameters
does it train. Each section is built from the records alone, so the run's report and
``pytest-lora report`` on its JSON give the same tables. The markdown report shows the full sections (every config); the
terminal shows the compact ones (one LoRA spec and workload per grid) that fit 120 columns.

Reductions and changes are set against the full-precision base of the same model, LoRA spec and
workload: bf16 when the run measured it, else the model's own dtype (``none``), fp32, fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..gate.stats import median
from . import catalog, quality
from .grid import Configs, format_bytes, format_pct, format_rate, grid, in_matrix_order, of_test, ok_records, quant_order, status_cell, with_reference
from .table import case_cell, format_change, format_value, function_name, logit_spreads, models_apart

STRATEGIES = {  # merge strategy -> the metric suffix the merge suite records it under, and what it is
    "peft merge": ("_requantize", "merge_and_unload: W + sBA, re-quantized on a quantized base"),
    "dequantized": ("_dequantize", "the base dequantized to the compute dtype, then merged"),
    "original": ("_original", "merged into the full-precision weights the base was quantized from"),
}


@dataclass
class Section:
    """One headline table: a title, lines that say what it shows, and its cells as text."""

    key: str
    title: str
    header: list[str]
    rows: list[list[str]]
    text_columns: int
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------- memory


def step_memory(records: list[dict[str, Any]]) -> tuple[str, Configs, Callable[[dict[str, Any]], Any]] | None:
    """What the memory grid shows, its configs, and each config's bytes.

    On a GPU: the peak allocated bytes of one training step. On the CPU, which has no allocator
    peak: the bytes the memory suite measured in the step, summed: the base's weights, the adapter
    with its gradients and AdamW state, and the activations saved for backward (not measured with
    gradient checkpointing: ``-``). The analytic model covers these for every architecture but
    activations only for Llama-style decoders, so the measured sum is the figure every model has.
    """
    peaks = of_test(records, catalog.STEP_PEAK_MEMORY)
    if any("peak_allocated_bytes" in r["metrics"] for r in peaks if r["status"] == "ok"):
        return ("peak allocated bytes in one training step (torch's allocator, GPU)", Configs(peaks),
                lambda record: record["metrics"].get("peak_allocated_bytes"))
    steps = [r for r in of_test(records, catalog.STEP_MEMORY) if r["status"] != "ok" or "adapter_bytes" in r["metrics"]]
    if not steps:
        return None
    weights = {(r["model"], r["quant"]): r["metrics"].get("weight_bytes") for r in ok_records(records, catalog.WEIGHT_STORAGE)}

    def measured(record: dict[str, Any]) -> int | None:
        parts = [weights.get((record["model"], record["quant"])), *(record["metrics"].get(name) for name in STEP_PARTS)]
        return None if any(part is None for part in parts) else sum(parts)

    return ("bytes of one training step, measured on the CPU: the base's weights + the adapter, its gradients and AdamW "
            "state + the activations saved for backward", Configs(steps), measured)


STEP_PARTS = ("adapter_bytes", "gradient_bytes", "optimizer_state_bytes", "activation_bytes")


def memory_section(records: list[dict[str, Any]], compact: bool = False) -> Section | None:
    found = step_memory(records)
    if found is None:
        return None
    what, configs, value_of = found

    def cell(record: dict[str, Any]) -> str:
        value, reference = value_of(record), configs.reference(record)
        before = None if reference is None else value_of(reference)
        return with_reference(format_bytes(value), value, before, reference is record)

    header, rows, text = grid(configs, cell, compact)
    notes = [f"{what}; in brackets, the change from the full-precision base of the same model, spec and workload."]
    if compact:
        notes = [f"{what}; LoRA {configs.columns()[0]}; (change from the full-precision base)."]
    return Section("memory", "Memory", header, rows, text, notes + eight_bit_notes(records))


def eight_bit_notes(records: list[dict[str, Any]]) -> list[str]:
    """What an 8-bit optimizer's state really is: bitsandbytes keeps fp32 moments for tensors
    under its min_8bit_size, so an "adamw8bit" row of small adapters holds an fp32 state."""
    shares: dict[str, set[float]] = {}
    for record in ok_records(records, catalog.STEP_MEMORY) + ok_records(records, catalog.STEP_MEMORY_8BIT):
        optimizer, share = (record.get("workload") or {}).get("optimizer") or "", record["metrics"].get("optimizer_8bit_share")
        if "8bit" in optimizer and share is not None:
            shares.setdefault(optimizer, set()).add(share)
    return [f"{name}: {format_pct(min(found))} to {format_pct(max(found))} of the trainable parameters have 8-bit moments "
            "(tensors under bitsandbytes' min_8bit_size, 4,096 elements, keep fp32 moments)"
            for name, found in sorted(shares.items()) if min(found) < 1]


# ----------------------------------------------------------------- speed


def speed_section(records: list[dict[str, Any]], compact: bool = False) -> Section | None:
    timed = of_test(records, catalog.STEP_TIME)
    if not any(r["status"] == "ok" for r in timed):
        return None
    configs = Configs(timed)

    def change(record: dict[str, Any], metric: str) -> str:
        reference = configs.reference(record)
        if reference is record:
            return "ref"
        value, before = record["metrics"].get(metric), (reference or {}).get("metrics", {}).get(metric)
        return format_change(value, before) if isinstance(value, (int, float)) and isinstance(before, (int, float)) else "-"

    notes = ["median of the timed steps (warm-up excluded); tokens/s = batch x sequence / median step; MFU = model FLOPs "
             "per step / step time / the device's dense bf16 peak (GPU only); change in tokens/s from the full-precision base."]
    if compact:
        header, rows, text = grid(configs, lambda r: f"{format_rate(r['metrics'].get('tokens_per_s'))} ({change(r, 'tokens_per_s')})", True)
        notes = ["tokens/s, and its change from the full-precision base; " + f"LoRA {configs.columns()[0]}; every config in the report."]
        return Section("speed", "Speed", header, rows, text, notes)
    header = ["model", "quant", "lora", "step time [s]", "IQR [s]", "tokens/s", "vs base", "MFU"]
    rows = []
    for record in in_matrix_order(timed):
        metrics = record["metrics"]
        case = [record["model"], record["quant"], configs.label(record)]
        if status_cell(record):
            rows.append([*case, status_cell(record), "-", "-", "-", "-"])
            continue
        rows.append([*case, format_value(metrics.get("step_time_median_s")), format_value(metrics.get("step_time_iqr_s")),
                     format_rate(metrics.get("tokens_per_s")), change(record, "tokens_per_s"), format_pct(metrics.get("mfu"))])
    header, rows = drop_empty_columns(header, rows, 3)
    return Section("speed", "Speed", header, rows, 3, notes)


def drop_empty_columns(header: list[str], rows: list[list[str]], text_columns: int) -> tuple[list[str], list[list[str]]]:
    """Leave out number columns in which no row has a value (MFU on a CPU)."""
    keep = [i for i in range(len(header)) if i < text_columns or any(row[i] not in ("-", "") for row in rows)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows]


# ----------------------------------------------------------------- merge


def merge_source(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str] | None:
    """The user's model first: the matrix's merges of a model that reads text, measured on
    held-out prose (``text_inputs``); else the trained task model's merges (its logits mean
    something); else the random-weight configs' medians. Each says which model it is."""
    matrix = ok_records(records, catalog.MERGE_QUANTIZED) + ok_records(records, catalog.MERGE_FULL_PRECISION)
    on_text = [record for record in matrix if record["metrics"].get("text_inputs") == 1]
    if on_text:
        models = ", ".join(sorted({record["model"] for record in on_text}))
        return on_text, f"{models}, on held-out prose; median over its configs ({catalog.MERGE_QUANTIZED}, {catalog.MERGE_FULL_PRECISION})"
    trained = ok_records(records, catalog.MERGE_TRAINED)
    if trained:
        return trained, f"{trained[0]['model']}, LoRA-fine-tuned on a second task ({catalog.MERGE_TRAINED})"
    if matrix:
        models = ", ".join(sorted({record["model"] for record in matrix}))
        return matrix, (f"median over the matrix's random-weight configs of {models} "
                        f"({catalog.MERGE_QUANTIZED}, {catalog.MERGE_FULL_PRECISION})")
    return None


def merge_errors(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """quant -> strategy -> (KL, top-1 agreement) against the unmerged adapter's logits; the median
    over the configs of a quantization. A full-precision base has one strategy, peft's merge."""
    found: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for record in records:
        metrics = record["metrics"]
        for strategy, (suffix, _) in STRATEGIES.items():
            for name in (suffix, "") if strategy == "peft merge" else (suffix,):
                if metrics.get(f"merge_kl{name}") is not None:
                    found.setdefault(record["quant"], {}).setdefault(strategy, []).append((metrics[f"merge_kl{name}"], metrics[f"merge_top1{name}"]))
    return {quant: {strategy: (median([v[0] for v in values]), median([v[1] for v in values])) for strategy, values in by.items()}
            for quant, by in found.items()}


def merge_verdict(errors: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Which strategy to use on a quantized base: the one with the lowest KL on most formats."""
    quantized = {quant: by for quant, by in errors.items() if len(by) > 1}
    if not quantized:
        worst = max(kl for by in errors.values() for kl, _ in by.values())
        return f"Full-precision bases only: peft's merge matches the unmerged adapter (KL at most {worst:.2g} nats)."
    winners = {quant: min(by, key=lambda s: by[s][0]) for quant, by in quantized.items()}
    best = max(STRATEGIES, key=lambda s: list(winners.values()).count(s))
    won = [quant for quant, strategy in winners.items() if strategy == best]
    kls = [by[best][0] for by in quantized.values() if best in by]
    return (f"On a quantized base use the {best} merge: the lowest KL against the unmerged adapter on {len(won)} of "
            f"{len(quantized)} formats ({', '.join(won)}), KL {min(kls):.2g} to {max(kls):.2g} nats.")


def merge_section(records: list[dict[str, Any]], compact: bool = False) -> Section | None:
    source = merge_source(records)
    if source is None:
        return None
    chosen, what = source
    errors = merge_errors(chosen)
    strategies = [s for s in STRATEGIES if any(s in by for by in errors.values())]
    columns = ("KL", "top-1") if compact else ("KL [nats]", "top-1")
    header = ["quant", *(f"{name} {column}" for name in strategies for column in columns)]
    rows = []
    for quant, by in sorted(errors.items(), key=lambda item: quant_order(item[0])):
        cells = []
        for strategy in strategies:
            kl, top1 = by.get(strategy, (None, None))
            cells.extend(["-", "-"] if kl is None else [f"{kl:.2g}", format_pct(top1)])
        rows.append([quant, *cells])
    notes = [f"{merge_verdict(errors)}",
             f"Against the unmerged adapter's logits: KL(unmerged || merged) and top-1 agreement; {what}."]
    if compact:
        notes = [merge_verdict(errors), f"KL [nats] and top-1 agreement against the unmerged adapter; {what}."]
    else:
        notes.extend(f"{name}: {description}." for name, (_, description) in STRATEGIES.items() if name in strategies)
    return Section("merge", "Merge fidelity", header, rows, 1, notes + logit_scale_notes(chosen) + fine_tune_kept_notes(records))


def fine_tune_kept_notes(records: list[dict[str, Any]]) -> list[str]:
    """What each merge keeps of a fine-tune, read as answers: the trained-model merge's exact match
    on the fine-tuning task's held-out problems, unmerged and per strategy, beside the base's
    before fine-tuning (where the task has answers: addition on a pretrained checkpoint)."""
    trained = [r for r in ok_records(records, catalog.MERGE_TRAINED) if r["metrics"].get("unmerged_exact_b") is not None]
    if not trained:
        return []
    parts = []
    for record in sorted(trained, key=lambda r: quant_order(r["quant"])):
        metrics = record["metrics"]
        merged = [(name, metrics.get(f"merged_exact_b{suffix}")) for name, (suffix, _) in STRATEGIES.items()]
        merged = [(name, value) for name, value in merged if value is not None] or [("peft merge", metrics.get("merged_exact_b"))]
        parts.append(f"{record['quant']} unmerged {format_pct(metrics['unmerged_exact_b'])}, "
                     + ", ".join(f"{name} {format_pct(value)}" for name, value in merged))
    before = trained[0]["metrics"].get("base_exact_b")
    return [f"What each merge keeps of a fine-tune ({trained[0]['model']}, {catalog.MERGE_TRAINED}): exact match on the task's "
            f"held-out problems{f', {format_pct(before)} before fine-tuning' if before is not None else ''}; " + "; ".join(parts) + "."]


def logit_scale_notes(records: list[dict[str, Any]]) -> list[str]:
    """Where the models' logits differ in spread, say so: KL grows with its square, so a model with
    large logits (a random T5's output layer has std 1.0) shows larger KLs for the same rounding."""
    spreads = logit_spreads(records)
    if not models_apart(records):
        return []
    smallest = min(spreads.values())
    listed = ", ".join(f"{model} {std:.2g} ({std / smallest:.0f}x)" for model, std in sorted(spreads.items(), key=lambda item: -item[1]))
    return [f"The models' logits differ in spread (standard deviation of the unmerged logits: {listed}); KL grows with its "
            "square, so compare a model's KLs with its own, or merge_max_abs_err / reference_logit_std across models."]


# ----------------------------------------------------------------- forgetting


def forgetting_methods(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LoRA and full fine-tuning records of the forgetting suite that measured forgetting."""
    methods = ok_records(records, catalog.FORGETTING_LORA) + ok_records(records, catalog.FORGETTING_FULL)
    return [r for r in methods if "forgetting_delta_loss" in r["metrics"]]


def forgetting_section(records: list[dict[str, Any]], compact: bool = False) -> Section | None:
    methods = forgetting_methods(records)
    if not methods:
        return None
    exact = any(r["metrics"].get("learn_exact_match_after") is not None for r in methods)
    header = ["method", "learning [nats]", "forgetting [nats]", *(["exact match"] if exact else []), "seeds"]
    rows = [[method_label(r), spread(r, "learning_delta_loss"), spread(r, "forgetting_delta_loss"),
             *([format_pct(r["metrics"]["learn_exact_match_after"]) if r["metrics"].get("learn_exact_match_after") is not None else "-"]
               if exact else []),
             format_value(r["metrics"].get("seeds"))]
            for r in methods]
    models = sorted({r["model"] for r in methods if r.get("model")})
    notes = [f"On {', '.join(models)}. " * bool(models)
             + "learning: held-out loss on the new task, before minus after; forgetting: held-out loss on the task the base "
             "learnt, after minus before; mean ± standard deviation over seeds."
             + (" exact match: held-out answers of the new task right in every token, after." if exact else "")]
    diverged = [method_label(r) for r in methods if r["metrics"].get("diverged")]
    if diverged:
        notes.append(f"Diverged (loss on the new task went up in a seed), never LoRA's reference: {', '.join(diverged)}.")
    base = ok_records(records, catalog.BASE_LEARNT_TASK_A)
    if base and not compact:
        metrics = base[0]["metrics"]
        exact_before = metrics.get("learn_exact_match_before")
        notes.append(f"The base: loss {metrics.get('loss_a_before', math.nan):.3g} nats on its task, "
                     f"{metrics.get('loss_b_before', math.nan):.3g} on the new one before fine-tuning"
                     + (f" (exact match {format_pct(exact_before)})." if exact_before is not None else "."))
    return Section("forgetting", "Forgetting", header, rows, 1, notes)


def method_label(record: dict[str, Any]) -> str:
    lora = record.get("lora") or {}
    return case_cell("lora", lora) if lora.get("r") is None else f"LoRA {case_cell('lora', lora)}"


def spread(record: dict[str, Any], metric: str) -> str:
    mean, std = record["metrics"].get(metric), record["metrics"].get(f"{metric}_std")
    if mean is None:
        return "-"
    one_seed = record["metrics"].get("seeds") == 1  # a standard deviation of one value is not a spread
    return f"{mean:.3g}" if std is None or one_seed else f"{mean:.3g} ± {std:.2g}"


# ----------------------------------------------------------------- parameters


def parameter_section(records: list[dict[str, Any]], compact: bool = False) -> Section | None:
    counted = ok_records(records, catalog.TRAINABLE_PARAMETERS)
    if not counted:
        return None
    if compact:
        configs = Configs(counted)
        header = ["lora", *configs.models()]
        first = {}
        for record in counted:
            first.setdefault((record["model"], configs.label(record)), record)
        rows = [[column, *(_count(first.get((model, column))) for model in configs.models())] for column in configs.columns()]
        return Section("params", "Trainable parameters", header, rows, 1, ["trainable (share of all parameters), counted over the built model's layers and checked against peft's count and the closed form."])
    groups: dict[tuple, list[str]] = {}
    every_quant = {record["quant"] for record in counted}
    configs = Configs(counted)
    for record in in_matrix_order(counted):
        metrics = record["metrics"]
        key = (record["model"], configs.label(record), metrics["trainable_params"], metrics["total_params"], metrics.get("trainable_pct"))
        groups.setdefault(key, []).append(record["quant"])
    header = ["model", "lora", "quant", "trainable", "total", "trainable [%]"]
    rows = [[model, lora, "all" if set(quants) == every_quant and len(quants) > 1 else ", ".join(quants), format_value(trainable), format_value(total), f"{pct:.3g}"]
            for (model, lora, trainable, total, pct), quants in groups.items()]
    return Section("params", "Trainable parameters", header, rows, 3, ["counted over the built model's layers (each quantized layer as its format stores it), "
                                                                           "checked against peft's count and the closed form; the quantizations that share a count share a row."])


def _count(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    metrics = record["metrics"]
    return f"{format_value(metrics['trainable_params'])} ({metrics['trainable_pct']:.3g}%)"


def published_section(records: list[dict[str, Any]], compact: bool = False) -> Section | None:
    published = of_test(records, catalog.PUBLISHED_COUNTS)
    if not published:
        return None
    header = ["model", "lora", "trainable", "published", "total", "published total", "reproduced"]
    rows = []
    for record in published:
        metrics = record["metrics"]
        count, total = metrics.get("trainable_params"), metrics.get("total_params")
        wanted, wanted_total = metrics.get("published_trainable_params"), metrics.get("published_total_params")
        if wanted is None:
            verdict = "not recorded"
        elif record["status"] == "ok" and (count, total) == (wanted, wanted_total):
            verdict = "yes"
        else:
            verdict = f"no ({record['status']})"
        rows.append([record["model"], case_cell("lora", record.get("lora")), format_value(count), format_value(wanted),
                     format_value(total), format_value(wanted_total), verdict])
    reproduced = sum(row[-1] == "yes" for row in rows)
    compared = sum(row[-1] != "not recorded" for row in rows)
    notes = [f"{reproduced} of {compared} published counts reproduced exactly, for the real architectures (meta device, no weights)."]
    if compact:
        return Section("published", "Published counts", [], [], 0, notes)
    return Section("published", "Published counts", header, rows, 2, notes)


# ----------------------------------------------------------------- serving

SERVING_VARIANTS = (("base", "base"), ("unmerged", "unmerged"), ("merged", "merged"))


def format_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.3g}"


def serving_section(records: list[dict[str, Any]], compact: bool = False) -> Section | None:
    """Latency of a prompt and of each decoded token: the base, the unmerged adapter, the merged model."""
    timed = of_test(records, catalog.SERVING_LATENCY)
    if not any(r["status"] == "ok" for r in timed):
        return None
    configs = Configs(timed)
    rows = []
    for record in in_matrix_order(timed):
        if compact and (configs.label(record) != configs.columns()[0] or record["model"] != configs.models()[0]):
            continue  # one screen: the first model and spec
        metrics = record["metrics"]
        case = [record["quant"]] if compact else [record["model"], record["quant"], configs.label(record)]
        if status_cell(record):
            rows.append([*case, status_cell(record), *["-"] * 6])
            continue
        cells = [format_ms(metrics.get(f"{variant}_{phase}_median_s")) for phase in ("prefill", "decode_token") for variant, _ in SERVING_VARIANTS]
        overhead = metrics.get("unmerged_over_merged_decode_token_pct")
        rows.append([*case, *cells, "-" if overhead is None else f"{overhead:+.0f}%"])
    header = [*([] if compact else ["model"]), "quant", *([] if compact else ["lora"]), "prefill base [ms]", "unmerged", "merged",
              "decode/token base [ms]", "unmerged ", "merged ", "unmerged vs merged"]  # spaces: column names stay unique
    text = 1 if compact else 3
    notes = ["medians of the timed rounds (warm-up excluded), every variant on the same prompts; merged: peft's merge_and_unload "
             "(re-quantized on a quantized base); the last column: per-token decode of the unmerged adapter against the merged model."]
    if compact:
        notes = [f"{configs.models()[0]}, LoRA {configs.columns()[0]}; every config in the report; " + notes[0]]
    return Section("serving", "Serving", header, rows, text, notes)


# ----------------------------------------------------------------- quality


def quality_section(records: list[dict[str, Any]], compact: bool = False) -> Section | None:
    """The quality suite's verdicts, each a sentence with its evidence, then its final losses
    (``report.quality``): full, every config; compact, the first model's formats at the 16-bit
    reference's first spec and learning rate, default init."""
    found = quality.section(records, compact)
    if found is None:
        return None
    header, rows, text_columns, notes = found
    return Section("quality", "Quality", header, rows, text_columns, notes)


# ----------------------------------------------------------------- all

def without_headline(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of tests that are not the built-in suites' (``catalog``): a user's own measurements."""
    return [r for r in records if function_name(r) not in catalog.built_in_tests()]


BUILDERS = (memory_section, speed_section, serving_section, merge_section, forgetting_section, quality_section, parameter_section,
            published_section)


def sections(records: list[dict[str, Any]], compact: bool = False) -> list[Section]:
    """The headline sections the records can fill, in reading order."""
    return [section for build in BUILDERS if (section := build(records, compact)) is not None]
