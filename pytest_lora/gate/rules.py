"""Gate rules: what change of which metric counts as a regression.

A rule is written ``METRIC[:STAT]:THRESHOLD`` (``--lora-fail``, the ``lora_fail`` ini key, or the
``fail`` list of a matrix file's ``[gate]`` table):

- ``==``: any change fails (counts, bytes of weights);
- ``+5%`` / ``-5%``: a relative change past 5% upwards / downwards fails; ``5%`` without a sign
  takes the metric's bad direction (tokens/s falling, a step time rising; both for unknown
  metrics);
- ``+256MiB``, ``+0.1``: an absolute change (sizes in B, KiB, MiB, GiB, KB, MB, GB);
- ``+5%&+256MiB``: both must be passed (a relative rule that ignores changes of a few bytes);
- ``<=1e-3`` / ``>=0.3``: a bound on the new value itself, checked with or without a baseline;
- ``off``: no rule for this metric (switches a default off).

``STAT`` is ``value`` (the recorded number, the default) or, for a metric with raw samples (step
times), ``median``, ``mean``, ``min`` or ``max`` of them. Short names: ``step_time`` is
``step_time_median_s``, ``peak_memory`` is ``peak_reserved_bytes``.

Defaults, per kind of metric (``gate.kinds``), when no rule names the metric (``default_rule``): counts and
weight bytes and the adapter's file exact; memory and optimizer state ``+1%&+1KiB`` (they repeat to
the byte); the timings with per-step samples (step times, the serving suite's latencies) ``10%`` on
a GPU and ``100%`` on the CPU in their bad direction, which ``compare`` also
requires to be significant and outside the history's spread; merge errors ``+100%`` past a
floor; forgetting and learning 0.05 nats, which must also exceed twice the seeds' standard error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..specs import shown
from . import kinds

STATS = ("value", "median", "mean", "min", "max")
ALIASES = {"step_time": "step_time_median_s", "peak_memory": "peak_reserved_bytes"}
SIZES = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
ALLOWED = ("'==', '+5%', '-5%', '5%', '+256MiB', '+0.1', '+5%&+256MiB', '<=1e-3', '>=0.3' or 'off'")

HIGHER_IS_BETTER = frozenset({"tokens_per_s", "mfu", "learning_delta_loss", "learning_minus_full"})
HIGHER_IS_BETTER_PATTERN = re.compile(r"^merge_top1|accuracy_after$")
# Overheads in % of a reference (unmerged over base, over merged; a mixed batch over one adapter):
# lower is better; derived from two medians, so shown, not gated by default.
OVERHEAD = re.compile(r"_over_\w+_pct$|_overhead_pct$")


class RuleError(ValueError):
    """A malformed rule; the message names the rule and what is allowed."""


@dataclass(frozen=True)
class Rule:
    """One gate rule, parsed."""

    metric: str
    stat: str = "value"
    exact: bool = False
    relative: float | None = None  # a fraction: 0.05 for 5%
    absolute: float | None = None  # in the metric's unit
    direction: int = 0  # +1: a rise is bad, -1: a fall is bad, 0: either
    bound: tuple[str, float] | None = None  # ("<=", 1e-3): the new value itself
    off: bool = False
    text: str = ""
    where: str = "default"

    @property
    def needs_baseline(self) -> bool:
        return self.bound is None and not self.off

    def describe(self) -> str:
        stat = "" if self.stat == "value" else f"{self.stat}:"
        return f"{self.metric}:{stat}{self.text}"


def kind_of(metric: str, unit: str | None) -> str:
    """The name of the metric's kind (``gate.kinds``): ``exact``, ``timing``, ``memory``,
    ``correctness`` or ``other``."""
    return kinds.kind_of(metric, unit).name


def bad_direction(metric: str) -> int:
    """+1 when a rise is a regression, -1 when a fall is."""
    return -1 if metric in HIGHER_IS_BETTER or HIGHER_IS_BETTER_PATTERN.search(metric) else +1


def known_direction(metric: str) -> int:
    """The bad direction of a metric this project records; 0 (either) for one it doesn't know."""
    known = kind_of(metric, None) != "other" or HIGHER_IS_BETTER_PATTERN.search(metric) or OVERHEAD.search(metric)
    return bad_direction(metric) if known else 0


def default_rule(metric: str, unit: str | None, device: str | None = "cuda") -> Rule | None:
    """The rule a metric gets when none names it: its kind's default (``gate.kinds``); ``None``:
    shown beside the baseline, not gated. Timings measured on the CPU (``device``) get wider
    thresholds than on a GPU."""
    text = kinds.kind_of(metric, unit).default(metric, device)
    return None if text is None else parse_threshold(metric, "value", text, "default")


def parse(text: str, where: str) -> Rule:
    """``METRIC[:STAT]:THRESHOLD`` as a ``Rule``; a ``RuleError`` naming ``where`` if malformed."""
    parts = [part.strip() for part in str(text).strip().split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise RuleError(f"{where}: {shown(text)} is not a rule; allowed: METRIC[:STAT]:THRESHOLD, e.g. "
                        "'step_time_median_s:10%', 'peak_reserved_bytes:+256MiB', 'trainable_params:=='")
    metric = ALIASES.get(parts[0], parts[0])
    if not metric.isidentifier():
        raise RuleError(f"{where}: {shown(text)}: {shown(parts[0])} is not a metric name; allowed: a record's metric, e.g. step_time_median_s")
    stat = parts[1] if len(parts) == 3 else "value"
    if stat not in STATS:
        raise RuleError(f"{where}: {shown(text)}: {shown(stat)} is not a statistic; allowed: {', '.join(STATS)}")
    return parse_threshold(metric, stat, parts[-1], where, rule_text=text)


def parse_threshold(metric: str, stat: str, threshold: str, where: str, rule_text: str | None = None) -> Rule:
    text = threshold.replace(" ", "")
    lowered = text.lower()
    shown = rule_text or text  # what error messages quote: the whole rule when there is one
    rule = Rule(metric, stat, text=text, where=where)
    if lowered == "off":
        return replace(rule, off=True)
    if text == "==":
        return replace(rule, exact=True)
    if text[:2] in ("<=", ">="):
        return replace(rule, bound=(text[:2], _number(text[2:], shown, where)))
    relative = absolute = None
    signs = set()
    for part in text.split("&"):
        sign, body = (part[0], part[1:]) if part[:1] in "+-" else ("", part)
        signs.add(sign)
        if body.endswith("%"):
            value = _number(body[:-1], shown, where) / 100
            relative = _once(relative, value, shown, where)
        else:
            absolute = _once(absolute, _size(body, shown, where), shown, where)
    if len(signs) > 1:
        raise RuleError(f"{where}: {shown!r}: the parts have different signs; allowed: one direction per rule")
    sign = signs.pop()
    direction = {"+": 1, "-": -1}.get(sign, known_direction(metric))
    return replace(rule, relative=relative, absolute=absolute, direction=direction)


def _once(current: float | None, value: float, text: str, where: str) -> float:
    if current is not None:
        raise RuleError(f"{where}: {shown(text)}: two thresholds of the same kind; allowed: {ALLOWED}")
    return value


def _number(body: str, text: str, where: str) -> float:
    try:
        value = float(body)
    except ValueError:
        raise RuleError(f"{where}: {shown(text)}: {shown(body)} is not a number; allowed: {ALLOWED}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        raise RuleError(f"{where}: {shown(text)}: {shown(body)} must be a finite number >= 0; allowed: {ALLOWED}")
    return value


def _size(body: str, text: str, where: str) -> float:
    match = re.fullmatch(r"([0-9.eE+-]+)([A-Za-z]*)", body)
    if not match:
        raise RuleError(f"{where}: {shown(text)}: {shown(body)} is not a threshold; allowed: {ALLOWED}")
    number, unit = match.groups()
    if unit and unit.lower() not in SIZES:
        raise RuleError(f"{where}: {shown(text)}: {shown(unit)} is not a size unit; allowed: {', '.join(['B', 'KiB', 'MiB', 'GiB', 'KB', 'MB', 'GB'])}")
    return _number(number, text, where) * SIZES.get(unit.lower(), 1)


SIZE = re.compile(r"(\d+\.?\d*|\.\d+)(e[+-]?\d+)?[a-z]*", re.IGNORECASE)  # a number and a unit, if any


def size_in_bytes(text: str, where: str) -> int:
    """``24GiB``, ``24 GiB``, ``1.5e9`` or ``512MB`` as bytes; a ``RuleError`` naming ``where`` if not
    (saying what a size is: a threshold's allowed forms would mislead here)."""
    body = str(text).replace(" ", "")
    if not SIZE.fullmatch(body):
        raise RuleError(f"{where}: {shown(text)} is not a size; allowed: e.g. 24GiB, 80GB, 512MiB")
    size = _size(body, str(text), where)
    if size <= 0:
        raise RuleError(f"{where}: {shown(text)} is not a positive size; allowed: e.g. 24GiB, 80GB, 512MiB")
    return int(size)


def merged(layers: list[list[Rule]]) -> dict[str, list[Rule]]:
    """The rules per metric: a later layer's rules for a metric replace an earlier layer's."""
    by_metric: dict[str, list[Rule]] = {}
    for layer in layers:
        named: dict[str, list[Rule]] = {}
        for rule in layer:
            named.setdefault(rule.metric, []).append(rule)
        by_metric.update(named)
    return by_metric
