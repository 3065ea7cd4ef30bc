"""Plots of a run's records, written next to its JSON: the learning / forgetting plane.

Biderman et al. 2024 ("LoRA Learns Less and Forgets Less") compare fine-tuning methods as points
on a plane: how much the new task was learnt against how much the old one was forgotten. Each
forgetting record (LoRA per rank and targets, full fine-tuning per learning rate) is one point,
with its spread over seeds as error bars. matplotlib is imported only when there is something to plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .table import case_cell


def forgetting_points(records: list[dict[str, Any]]) -> list[tuple[str, float, float, float, float]]:
    """(label, learning, learning spread, forgetting, forgetting spread) of every forgetting record."""
    points = []
    for record in records:
        metrics = record["metrics"]
        if record["suite"] != "forgetting" or "forgetting_delta_loss" not in metrics or record["status"] != "ok":
            continue
        label = case_cell("lora", record["lora"]) if record.get("lora") else record["test"]
        points.append((label, metrics["learning_delta_loss"], metrics.get("learning_delta_loss_std", 0.0),
                       metrics["forgetting_delta_loss"], metrics.get("forgetting_delta_loss_std", 0.0)))
    return points


def write_forgetting_plot(records: list[dict[str, Any]], paths: list[Path]) -> bool:
    """The learning / forgetting plane as PNG at each path; False when there is nothing to plot."""
    points = forgetting_points(records)
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    for label, learning, learning_spread, forgetting, forgetting_spread in points:
        axes.errorbar(learning, forgetting, xerr=learning_spread, yerr=forgetting_spread, fmt="o", capsize=3, label=label)
    axes.set_xlabel("learning: held-out loss on B, before minus after (nats)")
    axes.set_ylabel("forgetting: held-out loss on A, after minus before (nats)")
    axes.set_title("Learning against forgetting (lower right is better)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    for path in paths:
        temporary = path.with_name(f".{path.name}.tmp.png")
        figure.savefig(temporary, dpi=120)
        temporary.replace(path)
    plt.close(figure)
    return True
