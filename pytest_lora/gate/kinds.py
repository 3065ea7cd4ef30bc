"""Kinds of metric, one object each: which metrics a kind takes, its default rule, the evidence a
change must bring, whether ``--lora-confirm`` reruns it, and whether it is exported.

Counts repeat exactly and memory to the byte: a threshold is all the evidence they need. A
timing is noise until shown otherwise: it must also be significant against the baseline's
samples (Mann-Whitney) and outside the history's spread, and only a timing is worth a rerun. A
result over seeds (forgetting, quality) must move by more than twice the seeds' standard error.

A new kind is one ``MetricKind`` in ``KINDS``, before the first kind that would take its metrics:
``kind_of`` returns the first that matches. Its evidence is one of ``EVIDENCE`` (``gate.compare``
judges by it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

EVIDENCE = ("threshold", "samples", "seeds")

# Counts and sizes that repeat exactly, by name.
EXACT = frozenset({"trainable_params", "total_params", "weight_bytes", "flops_per_step", "builds", "adapter_file_bytes",
                   "adapter_file_tensors", "optimizer_8bit_share"})
# Timings with per-step samples. A build or a count is one sample per run: nothing tells its noise
# from a change unless a history does, so it is shown, and gated only by a rule of the user's.
TIMING_DEFAULTS = {"step_time_median_s": "10%", "tokens_per_s": "10%", "mfu": "10%", "host_step_time_median_s": "10%"}
# On the CPU the suites time tiny models (a few ms a step) on shared cores: between identical runs
# on a 2-core runner, 90% of step-time medians moved within -18%..+14%, the extremes by +-60%.
# A CPU gate catches a step that got twice as slow (a sync per step, a requantization, a copy).
CPU_TIMING_DEFAULTS = {"step_time_median_s": "100%", "tokens_per_s": "50%"}
# The serving suite's latencies (each with its samples): prefill and per-token decode of every
# variant, a mixed batch, loading an adapter and switching to it (peft walks every module: 0.2 to
# 0.5 ms on the tiny models). Lower is better, gated as step times are.
SERVING_TIMING = re.compile(r"_(prefill|decode_token)_median_s$|^adapter_(load|swap)_median_s$")
CORRECTNESS_DEFAULTS = (
    (re.compile(r"^(merge_max_abs_err|reload_max_abs_err)"), "+100%&+1e-6"),
    (re.compile(r"^merge_kl"), "+100%&+1e-9"),
    (re.compile(r"^(forgetting_delta_loss|forgetting_minus_full)$"), "+0.05"),
    (re.compile(r"^(learning_delta_loss|learning_minus_full)$"), "-0.05"),
    # The quality suite: a fine-tune's held-out loss over seeds, and a base's before training,
    # which repeats exactly (one evaluation of fixed weights on fixed data): a small floor.
    (re.compile(r"^(quality_loss|quality_minus_reference)$"), "+0.05"),
    (re.compile(r"^(quality_accuracy|quality_exact_match)$"), "-0.05"),
    (re.compile(r"^base_loss_a(_minus_full)?$"), "+0.01"),
)
MEMORY_DEFAULT = "+1%&+1KiB"


@dataclass(frozen=True)
class MetricKind:
    """One kind of metric and how the gate treats it."""

    name: str
    matches: Callable[[str, str | None], bool] = field(repr=False)  # (metric, unit) -> of this kind
    default: Callable[[str, str | None], str | None] = field(repr=False)  # (metric, device) -> threshold text, None: not gated
    evidence: str = "threshold"  # one of EVIDENCE: what a change past its threshold must also show
    rerun: bool = False  # --lora-confirm reruns a config whose metric of this kind regressed
    export: bool = False  # written by ``pytest-lora export`` for a benchmark dashboard


def _timing_default(metric: str, device: str | None) -> str | None:
    defaults = CPU_TIMING_DEFAULTS if device == "cpu" else TIMING_DEFAULTS
    return defaults.get(metric) or (defaults["step_time_median_s"] if SERVING_TIMING.search(metric) else None)


def _correctness_default(metric: str, device: str | None) -> str | None:
    return next((threshold for pattern, threshold in CORRECTNESS_DEFAULTS if pattern.search(metric)), None)


KINDS = (
    MetricKind("exact", lambda metric, unit: metric in EXACT or unit == "params", lambda metric, device: "=="),
    MetricKind("timing", lambda metric, unit: metric in TIMING_DEFAULTS or unit in ("s", "tokens/s", "steps/s"), _timing_default,
               evidence="samples", rerun=True, export=True),
    MetricKind("memory", lambda metric, unit: unit == "bytes", lambda metric, device: MEMORY_DEFAULT, export=True),
    MetricKind("correctness", lambda metric, unit: unit in ("nats", "logit") or metric.startswith(("merge_", "forgetting", "learning", "quality_")),
               _correctness_default, evidence="seeds", export=True),
    MetricKind("other", lambda metric, unit: True, lambda metric, device: None),
)


def named(name: str) -> MetricKind | None:
    """The kind of that name (``None`` for a check that is not of a metric: a config's status)."""
    return next((kind for kind in KINDS if kind.name == name), None)


def kind_of(metric: str, unit: str | None) -> MetricKind:
    """The first kind that takes the metric (``other`` takes every metric)."""
    return next(kind for kind in KINDS if kind.matches(metric, unit))
