"""The run's plots, as PNG next to its report: memory, speed, merge error, learning against forgetting.

Each plot is a pure function of the records: ``available`` says which plots the records can fill
(the report links exactly those), ``write`` draws them with matplotlib's Agg backend (imported
only then). A plot with nothing to show is not written. Every plot carries the machine and the
run in a caption, so a plot copied into a blog post still says where its numbers come from.

- memory: for each model, one bar per quantization and LoRA spec, stacked by what the memory
  suite measured in one training step (the base's weights, the adapter with its gradients and
  AdamW state, the activations saved for backward), with the step's GPU peak or analytic total
  as a marker;
- speed: tokens/s by quantization, per model and LoRA spec, with the interquartile range of the
  timed steps;
- merge: KL of each merge strategy against the unmerged adapter, by quantization (log scale);
- forgetting: the learning / forgetting plane of Biderman et al. 2024 ("LoRA Learns Less and
  Forgets Less"): one point per method, with its spread over seeds;
- quality: learning curves, one panel per model (and per LoRA spec when a run swept learning
  rates over several): the held-out loss on the new skill at each evaluation step, one line per
  LoRA config (its format and what else it varies: rank, learning rate, init) and one per full
  fine-tuning learning rate, the standard deviation over seeds shaded; a diverged run leaves the
  top of the axis.

Several runs side by side (``pytest-lora report A.json B.json``) get one plot: the tokens/s of
each config that every run timed, one bar per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from . import catalog, grid, headline, quality

COMPONENTS = (  # (label, metrics summed, the test that records them)
    ("weights", ("weight_bytes",), catalog.WEIGHT_STORAGE),
    ("adapter, gradients, AdamW state", ("adapter_bytes", "gradient_bytes", "optimizer_state_bytes"), catalog.STEP_MEMORY),
    ("activations", ("activation_bytes",), catalog.STEP_MEMORY),
)
TOTAL_LABELS = {True: "peak allocated in the step (GPU)", False: "analytic step model"}
MAX_BARS = 6  # LoRA specs per quantization in one panel; the report's tables have them all
MAX_CONFIGS = 24  # configs in the side-by-side plot of several runs


def memory_bars(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """model -> spec -> quant -> component -> bytes (only components that were measured), with
    ``total``: the step's GPU peak when the run measured it, else the analytic step where the
    analytic model covers the architecture."""
    weights = {(r["model"], r["quant"]): r["metrics"].get("weight_bytes") for r in grid.ok_records(records, catalog.WEIGHT_STORAGE)}
    steps = grid.ok_records(records, catalog.STEP_MEMORY)
    configs = grid.Configs(steps)
    peaks = {configs.key(r): r["metrics"].get("peak_allocated_bytes") for r in grid.ok_records(records, catalog.STEP_PEAK_MEMORY)}
    bars: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for record in steps:
        metrics = record["metrics"]
        parts = {"weights": weights.get((record["model"], record["quant"])),
                 "adapter, gradients, AdamW state": _sum(metrics, COMPONENTS[1][1]),
                 "activations": metrics.get("activation_bytes"),
                 "total": peaks.get(configs.key(record)) if peaks else metrics.get("analytic_bytes")}
        parts = {name: value for name, value in parts.items() if value is not None}
        if any(name != "total" for name in parts):
            spec = configs.label(record)
            bars.setdefault(record["model"], {}).setdefault(spec, {})[record["quant"]] = parts
    return bars


def _sum(metrics: dict[str, Any], names: tuple[str, ...]) -> float | None:
    values = [metrics.get(name) for name in names]
    return None if any(v is None for v in values) else sum(values)


def speed_bars(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, tuple[float, float, float]]]]:
    """model -> spec -> quant -> (tokens/s median, lower and upper quartile of the steps' tokens/s)."""
    timed = grid.ok_records(records, catalog.STEP_TIME)
    configs = grid.Configs(timed)
    bars: dict[str, dict[str, dict[str, tuple[float, float, float]]]] = {}
    for record in timed:
        value = record["metrics"].get("tokens_per_s")
        if value is None:
            continue
        samples = sorted((record.get("samples") or {}).get("tokens_per_s") or [value])
        low, high = quartiles(samples)
        bars.setdefault(record["model"], {}).setdefault(configs.label(record), {})[record["quant"]] = (value, low, high)
    return bars


def quartiles(ordered: list[float]) -> tuple[float, float]:
    """Lower and upper quartile by linear interpolation (numpy's default), of sorted values."""
    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        below = int(position)
        above = min(below + 1, len(ordered) - 1)
        return ordered[below] + (ordered[above] - ordered[below]) * (position - below)
    return at(0.25), at(0.75)


def merge_bars(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    source = headline.merge_source(records)
    return {} if source is None else headline.merge_errors(source[0])


def forgetting_points(records: list[dict[str, Any]]) -> list[tuple[str, float, float, float, float]]:
    """(label, learning, learning spread, forgetting, forgetting spread) of every forgetting record."""
    points = []
    for record in headline.forgetting_methods(records):
        metrics = record["metrics"]
        label = headline.method_label(record) if record.get("lora") else record["test"]
        points.append((label, metrics["learning_delta_loss"], metrics.get("learning_delta_loss_std", 0.0),
                       metrics["forgetting_delta_loss"], metrics.get("forgetting_delta_loss_std", 0.0)))
    return points


# ----------------------------------------------------------------- drawing

TITLES = {
    "memory": "Memory of one training step, by quantization",
    "speed": "Training throughput by quantization",
    "merge": "Merge error by strategy",
    "forgetting": "Learning against forgetting",
    "quality": "Learning curves: held-out loss on the new skill",
}
DATA: dict[str, Callable[[list[dict[str, Any]]], Any]] = {
    "memory": memory_bars, "speed": speed_bars, "merge": merge_bars, "forgetting": forgetting_points, "quality": quality.curves,
}


def available(records: list[dict[str, Any]]) -> list[str]:
    """The plots the records can fill, in the report's order."""
    return [name for name, data in DATA.items() if data(records)]


def file_name(run_id: str, name: str) -> str:
    return f"{run_id}-{name}.png"


def caption(document: dict[str, Any]) -> str:
    machine, run = document["machine"], document["run"]
    device = machine.get("gpu_name") or machine.get("cpu") or machine.get("device")
    return (f"{machine.get('device')}: {device}; torch {machine.get('torch')}, peft {machine.get('peft')}, "
            f"bitsandbytes {machine.get('bitsandbytes')}; run {run.get('id')}")


def write(document: dict[str, Any], directory: Path) -> list[Path]:
    """Draw every available plot of the run into ``directory``; the paths written."""
    names = available(document["records"])
    if not names:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name in names:
        figure, handles = DRAW[name](plt, DATA[name](document["records"]), document["records"])
        figure.suptitle(TITLES[name])
        figure.text(0.01, 0.005, caption(document), fontsize=7, color="0.35", va="bottom")
        bottom = 0.04
        if handles:  # one legend for all panels, under them, as many columns as its labels fit
            columns, rows = legend_shape(figure.get_figwidth(), [handle.get_label() for handle in handles])
            height = figure.get_figheight()
            figure.set_figheight(height + LEGEND_ROW_IN * rows)
            figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.03))
            bottom = (0.04 * height + LEGEND_ROW_IN * rows + 0.15) / figure.get_figheight()
        figure.tight_layout(rect=(0, bottom, 1, 1))
        path = directory / file_name(document["run"]["id"], name)
        _save(figure, path)
        plt.close(figure)
        written.append(path)
    return written


LEGEND_ROW_IN = 0.22  # a legend row at 8 points, in inches
LEGEND_CHAR_IN, LEGEND_HANDLE_IN = 0.065, 0.7  # a character of a label at 8 points; the line, marker and padding beside it


def legend_shape(width: float, labels: list[str]) -> tuple[int, int]:
    """(columns, rows) of a legend of ``labels`` under a figure ``width`` inches wide: as many
    columns (at most 4) as the longest label leaves room for, so none runs off the figure."""
    column = LEGEND_CHAR_IN * max(len(label) for label in labels) + LEGEND_HANDLE_IN
    columns = max(1, min(len(labels), 4, int(width // column)))
    return columns, -(-len(labels) // columns)


def _save(figure: Any, path: Path) -> None:
    """Atomically, as the JSON is: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    temporary.replace(path)


def _panels(plt: Any, count: int, width: float = 5.5) -> tuple[Any, list[Any]]:
    figure, axes = plt.subplots(1, count, figsize=(max(width * count, 7), 4.6), squeeze=False)
    return figure, list(axes[0])


def quant_ticks(axis: Any, quants: list[str]) -> None:
    """The formats under their bars, slanted: ``nf4-dq``, ``torchao-int8`` and ``hqq-4bit`` side by
    side run into each other when upright."""
    axis.set_xticks(range(len(quants)), quants, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)


def _quant_order(by_spec: dict[str, dict[str, Any]]) -> list[str]:
    return sorted({quant for by_quant in by_spec.values() for quant in by_quant}, key=grid.quant_order)


HATCHES = ("", "//", "..", "xx", "\\\\", "++")  # one per LoRA spec, so specs read apart in any colour


def draw_memory(plt: Any, bars: dict[str, dict[str, dict[str, dict[str, float]]]], records: list[dict[str, Any]]) -> Any:
    from matplotlib.patches import Patch

    figure, axes = _panels(plt, len(bars))
    colours = {"weights": "#4c72b0", "adapter, gradients, AdamW state": "#dd8452", "activations": "#55a868"}
    peak = any("peak_allocated_bytes" in r["metrics"] for r in grid.ok_records(records, catalog.STEP_PEAK_MEMORY))
    totals = False
    for axis, (model, by_spec) in zip(axes, bars.items()):
        quants, specs = _quant_order(by_spec), list(by_spec)[:MAX_BARS]
        width = 0.8 / len(specs)
        for index, spec in enumerate(specs):
            for position, quant in enumerate(quants):
                parts = by_spec[spec].get(quant)
                if parts is None:
                    continue
                x, bottom = position + (index - (len(specs) - 1) / 2) * width, 0.0
                for component, colour in colours.items():
                    value = parts.get(component, 0.0) / 2**20
                    axis.bar(x, value, width * 0.9, bottom=bottom, color=colour, hatch=HATCHES[index], edgecolor="white", linewidth=0)
                    bottom += value
                if "total" in parts:
                    axis.plot(x, parts["total"] / 2**20, "k_", markersize=9)
                    totals = True
        quant_ticks(axis, quants)
        axis.set_xlabel("quantization of the base")
        axis.set_ylabel("memory (MiB)")
        axis.set_title(model, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    specs = list(dict.fromkeys(spec for by_spec in bars.values() for spec in by_spec))[:MAX_BARS]
    handles = [Patch(color=colour, label=component) for component, colour in colours.items()]
    handles += [Patch(facecolor="0.85", hatch=HATCHES[index], edgecolor="0.4", label=f"LoRA {spec}") for index, spec in enumerate(specs)]
    if totals:
        handles.append(plt.Line2D([], [], color="k", marker="_", linestyle="", markersize=9, label=TOTAL_LABELS[peak]))
    return figure, handles


def draw_speed(plt: Any, bars: dict[str, dict[str, dict[str, tuple[float, float, float]]]], records: list[dict[str, Any]]) -> Any:
    figure, axes = _panels(plt, len(bars))
    for axis, (model, by_spec) in zip(axes, bars.items()):
        quants, specs = _quant_order(by_spec), list(by_spec)[:MAX_BARS]
        width = 0.8 / len(specs)
        for index, spec in enumerate(specs):
            positions = [p for p, q in enumerate(quants) if q in by_spec[spec]]
            values = [by_spec[spec][quants[p]] for p in positions]
            errors = [[max(v - low, 0) for v, low, _ in values], [max(high - v, 0) for v, _, high in values]]
            axis.bar([p + (index - (len(specs) - 1) / 2) * width for p in positions], [v for v, _, _ in values], width * 0.9,
                     yerr=errors, capsize=2, color=f"C{index}", label=f"LoRA {spec}")
        quant_ticks(axis, quants)
        axis.set_xlabel("quantization of the base")
        axis.set_ylabel("tokens/s (median; whiskers: IQR of the steps)")
        axis.set_title(model, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    return figure, axes[0].get_legend_handles_labels()[0]


def draw_merge(plt: Any, errors: dict[str, dict[str, tuple[float, float]]], records: list[dict[str, Any]]) -> Any:
    figure, (axis,) = _panels(plt, 1, width=8)
    quants = sorted(errors, key=grid.quant_order)
    strategies = [s for s in headline.STRATEGIES if any(s in by for by in errors.values())]
    width = 0.8 / len(strategies)
    for index, strategy in enumerate(strategies):  # a KL of exactly 0 has no bar on a log scale
        positions = [p for p, q in enumerate(quants) if strategy in errors[q] and errors[q][strategy][0] > 0]
        values = [errors[quants[p]][strategy][0] for p in positions]
        axis.bar([p + (index - (len(strategies) - 1) / 2) * width for p in positions], values, width * 0.9, label=strategy)
    axis.set_yscale("log")
    quant_ticks(axis, quants)
    axis.set_xlabel("quantization of the base")
    axis.set_ylabel("KL(unmerged || merged) (nats, log scale)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, title="merge", title_fontsize=8)
    return figure, []


def draw_forgetting(plt: Any, points: list[tuple[str, float, float, float, float]], records: list[dict[str, Any]]) -> Any:
    figure, (axis,) = _panels(plt, 1, width=7)
    for label, learning, learning_spread, forgetting, forgetting_spread in points:
        axis.errorbar(learning, forgetting, xerr=learning_spread, yerr=forgetting_spread, fmt="o", capsize=3, label=label)
    axis.set_xlabel("learning: held-out loss on the new task, before minus after (nats)")
    axis.set_ylabel("forgetting: held-out loss on the old task,\nafter minus before (nats)")
    axis.set_title("lower right is better", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure, []


LINE_STYLES = ("-", "--", "-.", ":")  # with the colour, so the lines read apart in grey too


DIVERGED = 1.25  # a learning curve's axis ends at this many times the loss before training; a diverged run leaves it


def curve_styles(curves: list[quality.Curve]) -> tuple[Callable[[quality.Curve], Any], Callable[[quality.Curve], str]]:
    """(colour, line style) of each curve, the same for a label in every panel. When several
    configs each ran on a few formats (a rank sweep on bf16 and nf4), a config keeps its colour
    and a format its line style, so that no two lines share both; otherwise a colour per label
    (tab20 past ten). Full fine-tuning is dashed, with square markers."""
    import matplotlib

    configs = list(dict.fromkeys(curve.config for curve in curves if curve.quant is not None))
    quants = list(dict.fromkeys(curve.quant for curve in curves if curve.quant is not None))
    by_config = len(configs) > 1 and 1 < len(quants) <= len(LINE_STYLES) - 1
    keys = list(dict.fromkeys(curve.config if by_config else curve.label for curve in curves))
    palette = matplotlib.colormaps["tab10" if len(keys) <= 10 else "tab20"]

    def colour(curve: quality.Curve) -> Any:
        return palette(keys.index(curve.config if by_config else curve.label) % palette.N)

    def style(curve: quality.Curve) -> str:  # "--" is full fine-tuning's; the formats take the others in turn
        if curve.quant is None:
            return LINE_STYLES[1]
        index = quants.index(curve.quant) if by_config else 0
        return LINE_STYLES[0] if index == 0 else LINE_STYLES[1 + index]

    return colour, style


def draw_quality(plt: Any, by_model: dict[str, tuple[str, list[quality.Curve]]], records: list[dict[str, Any]]) -> Any:
    """Learning curves, one panel per model; a label keeps its colour and marker across panels."""
    figure, axes = _panels(plt, len(by_model), width=6)
    every = [curve for _, drawn in by_model.values() for curve in drawn]
    colour_of, style_of = curve_styles(every)
    for axis, (model, (what, drawn)) in zip(axes, by_model.items()):
        for curve in drawn:
            full = curve.quant is None
            colour = colour_of(curve)
            axis.plot(curve.steps, curve.mean, style_of(curve), color=colour, marker="s" if full else "o", markersize=4,
                      linewidth=1.6, label=curve.label)
            low = [m - s for m, s in zip(curve.mean, curve.std)]
            high = [m + s for m, s in zip(curve.mean, curve.std)]
            axis.fill_between(curve.steps, low, high, color=colour, alpha=0.2, linewidth=0)
        start, lowest = max(curve.mean[0] for curve in drawn), min(min(curve.mean) for curve in drawn)
        if max(max(curve.mean) for curve in drawn) > DIVERGED * start:  # a diverged run (and its band) would flatten the others
            axis.set_ylim(lowest - 0.05 * (DIVERGED * start - lowest), DIVERGED * start)
        axis.set_xlabel("training step")
        axis.set_ylabel("held-out loss on the new skill (nats)")
        axis.set_title(model + (f"\n{what}" if what else ""), fontsize=9)
        axis.grid(alpha=0.3)
    from matplotlib.patches import Patch

    handles = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    return figure, [*handles.values(), Patch(color="0.5", alpha=0.25, label="± 1 std over seeds")]


DRAW = {"memory": draw_memory, "speed": draw_speed, "merge": draw_merge, "forgetting": draw_forgetting, "quality": draw_quality}


# ----------------------------------------------------------------- several runs


def runs_speed(documents: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """config -> each run's tokens/s, for the configs every run timed (two GPUs, a library upgrade)."""
    from .table import config_label

    by_run = [{config_label(r): r["metrics"].get("tokens_per_s") for r in grid.ok_records(d["records"], catalog.STEP_TIME)} for d in documents]
    common = [name for name in by_run[0] if all(by.get(name) is not None for by in by_run)]
    return {name: [by[name] for by in by_run] for name in common}


def write_runs(documents: list[dict[str, Any]], path: Path, labels: list[str]) -> bool:
    """Tokens/s of the configs every run timed, one bar per run; False (nothing written) when no
    config was timed by all of them."""
    speeds = runs_speed(documents)
    if not speeds:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(speeds)[:MAX_CONFIGS]
    figure, axis = plt.subplots(figsize=(max(7, 0.45 * len(names) * len(documents)), 5))
    width = 0.8 / len(documents)
    for index, label in enumerate(labels):
        axis.bar([p + (index - (len(documents) - 1) / 2) * width for p in range(len(names))], [speeds[n][index] for n in names], width * 0.9, label=label)
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("tokens/s (median step)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.suptitle("Training throughput, run by run" + (f" (first {MAX_CONFIGS} common configs)" if len(speeds) > MAX_CONFIGS else ""))
    figure.text(0.01, 0.005, "; ".join(f"run {label}: {documents[i]['run'].get('id')}" for i, label in enumerate(labels)), fontsize=7, color="0.35")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    _save(figure, path)
    plt.close(figure)
    return True
