"""The quality suite's verdicts: each claim it tests, answered with its evidence, from records alone.

The claims (``suites/test_quality.py`` measures them; the headline's quality section leads with
these sentences and the plots draw the learning curves):

- before training, the formats differ (QLoRA Table 2: NF4+DQ < FP4 < Int4 in perplexity): each
  format's held-out loss on the old skill over the float32 base's, in order; nf4 against fp4;
- after fine-tuning, LoRA on a quantized base is comparable to 16-bit LoRA (QLoRA Table 4): the
  paired-by-seed difference from the bf16 reference, judged by ``judge``;
- nf4 is better than fp4 after fine-tuning: their difference, with a conservative standard error;
- LoRA's best learning rate is about 10x full fine-tuning's (LoRA Without Regret);
- rank barely matters (LoRA Table 6): the spread of the final loss over ranks, per way alpha
  follows the rank (fixed, as LoRA's; or alpha = k r);
- an init that starts nearer the float32 weights (PiSSA, OLoRA, LoftQ) closes part of the
  quantization gap: the share it closes, and its initial weight error against the default's;
- time to a quality target (MLPerf): steps to the target loss per format.

A verdict whose records are missing is left out, never guessed. Every function here reads
records (plain dicts) and returns numbers or text; nothing is imported that builds or measures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..specs import INITS
from . import catalog
from .grid import FULL_PRECISION, of_test, ok_records, quant_order, status_cell
from .table import case_cell

# Two final losses closer than this are comparable whatever their spread. 0.01 nats of held-out
# loss is a 1% change in perplexity (e^0.01 = 1.010); the formats QLoRA compares differ by 13%
# to 25% in perplexity before training (Table 2: NF4+DQ 27.41, FP4 31.07, Int4 34.34), so a
# difference under 1% is below anything those comparisons resolve. It also keeps a run whose
# seeds agree to the last digit (a spread of 0, two standard errors of 0) from calling a
# difference of 1e-4 nats "worse".
TOLERANCE_NATS = 0.01
STANDARD_ERRORS = 2  # a difference within this many standard errors is not one (about 95% for a normal mean)
REFERENCE = "bf16"  # the 16-bit LoRA every quantized format is set against (the suite's REFERENCE)
FLOAT32 = "fp32"
TABLE_2 = "QLoRA Table 2: NF4+DQ 27.41 < FP4 31.07 < Int4 34.34 perplexity"


# ----------------------------------------------------------------- reading records


def lr_of(record: dict[str, Any]) -> float | None:
    return (record.get("workload") or {}).get("lr", record["metrics"].get("fine_tune_lr"))


def init_of(record: dict[str, Any]) -> str:
    return (record.get("workload") or {}).get("init") or "default"


def spec_key(record: dict[str, Any]) -> str:
    """A LoRA spec as a key: every field of it (two specs that differ in dropout alone differ)."""
    return json.dumps(record.get("lora"), sort_keys=True)


def spec_label(record: dict[str, Any]) -> str:
    return case_cell("lora", record.get("lora"))


def metric(record: dict[str, Any] | None, name: str) -> float | None:
    value = None if record is None else record["metrics"].get(name)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def seeds_of(record: dict[str, Any]) -> int:
    return int(metric(record, "seeds") or 1)


def quantized(quant: str | None) -> bool:
    return quant is not None and quant not in FULL_PRECISION


@dataclass(frozen=True)
class Runs:
    """A model's records of the quality suite that ended ok: the bases, LoRA and full fine-tuning."""

    model: str
    bases: list[dict[str, Any]]
    lora: list[dict[str, Any]]
    full: list[dict[str, Any]]
    compact: bool = False

    def find(self, quant: str, spec: str, lr: float | None, init: str = "default") -> dict[str, Any] | None:
        """The LoRA record of a format, spec, learning rate and init."""
        return next((r for r in self.lora if (r["quant"], spec_key(r), lr_of(r), init_of(r)) == (quant, spec, lr, init)), None)

    def configs(self) -> list[tuple[str, float | None]]:
        """The (spec, learning rate) pairs of the default init, the 16-bit reference's first: the
        first is the headline's (the compact section's and the plot's)."""
        default = [r for r in self.lora if init_of(r) == "default"]
        ordered = [r for r in default if r["quant"] == REFERENCE] + [r for r in default if r["quant"] != REFERENCE]
        return list(dict.fromkeys((spec_key(r), lr_of(r)) for r in ordered))

    def config(self, spec: str, lr: float | None) -> str:
        """The config in a verdict's words, when the run had more than one (else nothing); never
        in the compact headline, whose note names its one config."""
        if self.compact or len(self.configs()) < 2:
            return ""
        record = next(r for r in self.lora if (spec_key(r), lr_of(r)) == (spec, lr))
        return f"{spec_label(record)}, lr {lr:g}"

    def where(self, spec: str, lr: float | None) -> str:
        config = self.config(spec, lr)
        return f" ({config})" if config else ""


def runs_by_model(records: list[dict[str, Any]], compact: bool = False) -> list[Runs]:
    """Each model's quality records that ended ok, models in the order they first appear."""
    bases, lora, full = (ok_records(records, test) for test in (catalog.BASE_QUALITY, catalog.QUALITY_LORA, catalog.QUALITY_FULL))
    models = list(dict.fromkeys(r.get("model") for r in bases + lora + full))
    return [Runs(model, [r for r in bases if r.get("model") == model], [r for r in lora if r.get("model") == model],
                 [r for r in full if r.get("model") == model], compact) for model in models]


# ----------------------------------------------------------------- the arithmetic


def standard_error(std: float | None, seeds: int) -> float | None:
    """The standard error of a mean over ``seeds`` runs: std / sqrt(seeds); ``None`` without a
    spread: one seed (a standard deviation of one value is none), a std of 0, or none recorded."""
    if not std or seeds < 2:  # one seed, or seeds that agree exactly: no spread to judge by
        return None
    return std / math.sqrt(seeds)


def unpaired_standard_error(std_a: float | None, std_b: float | None, seeds: int) -> float | None:
    """The standard error of a difference of two means over ``seeds`` runs each, as if unpaired:
    sqrt(s_a^2 + s_b^2) / sqrt(seeds). Conservative: the same seeds draw the same batches, so the
    two runs of a seed move together and the paired difference's spread is smaller."""
    if std_a is None or std_b is None or seeds < 2 or std_a == std_b == 0:
        return None
    return math.sqrt(std_a**2 + std_b**2) / math.sqrt(seeds)


@dataclass(frozen=True)
class Judgement:
    """A difference (nats, lower is better for the first side) judged against its noise."""

    difference: float
    error: float | None  # its standard error; None: one seed, no spread
    answer: str  # "comparable", "worse" or "better"
    reason: str

    @property
    def errors(self) -> float | None:
        """How many standard errors the difference is (None without a spread, or a spread of 0)."""
        return abs(self.difference) / self.error if self.error else None


def judge(difference: float, error: float | None, tolerance: float = TOLERANCE_NATS) -> Judgement:
    """Comparable when |difference| <= ``tolerance`` or <= 2 standard errors; else worse (above)
    or better (below). Without a standard error (one seed) only the tolerance applies."""
    size = abs(difference)
    if size <= tolerance:
        return Judgement(difference, error, "comparable", f"within the {tolerance:g}-nat tolerance")
    if error is not None and size <= STANDARD_ERRORS * error:
        return Judgement(difference, error, "comparable", f"within {STANDARD_ERRORS} standard errors")
    answer = "worse" if difference > 0 else "better"
    if error is None:
        return Judgement(difference, error, answer, f"over the {tolerance:g}-nat tolerance")
    return Judgement(difference, error, answer, f"{size / error:.1f} standard errors, over the {tolerance:g}-nat tolerance")


def gap_share(quantized_default: float, quantized_init: float, reference: float) -> float | None:
    """The share of the quantization gap an init closes: (loss(q, default) - loss(q, init)) /
    (loss(q, default) - loss(bf16, default)); ``None`` when there is no gap (q not above bf16)."""
    gap = quantized_default - reference
    if gap <= 0:
        return None
    return (quantized_default - quantized_init) / gap


def best_lr(records: list[dict[str, Any]]) -> tuple[float | None, int]:
    """The learning rate of the lowest final loss among the runs that lowered the held-out loss
    (final below ``quality_loss_before``), and how many learning rates were swept."""
    swept = {lr_of(r) for r in records}
    learnt = _learnt(records)
    if not learnt:
        return None, len(swept)
    return lr_of(min(learnt, key=lambda r: metric(r, "quality_loss"))), len(swept)


def near_best_lrs(records: list[dict[str, Any]]) -> list[float]:
    """The learning rates whose final loss the seeds cannot tell from the best one's: their
    difference from the best, paired by seed, judged comparable (``judge``); the best included.
    A grid's best by mean is one draw: two rates a seed that stays on a plateau reorders."""
    learnt = _learnt(records)
    if not learnt:
        return []
    best = min(learnt, key=lambda r: metric(r, "quality_loss"))
    return sorted(lr_of(r) for r in learnt if judge(*seed_paired_difference(r, best)).answer == "comparable")


def seed_paired_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None]:
    """Final loss of ``a`` minus ``b`` and its standard error, paired by seed where both keep
    each seed's value (the same seeds draw the same batches), else as if unpaired."""
    first, second = ((r.get("samples") or {}).get("quality_loss") for r in (a, b))
    if first and second and len(first) == len(second) > 1:
        differences = [x - y for x, y in zip(first, second)]
        mean = sum(differences) / len(differences)
        std = math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
        return mean, standard_error(std, len(differences))
    seeds = min(seeds_of(a), seeds_of(b))
    return (metric(a, "quality_loss") - metric(b, "quality_loss"),
            unpaired_standard_error(metric(a, "quality_loss_std"), metric(b, "quality_loss_std"), seeds))


def _learnt(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that lowered the held-out loss (a diverged run's NaN is no candidate)."""
    return [r for r in records if metric(r, "quality_loss") is not None and metric(r, "quality_loss_before") is not None
            and metric(r, "quality_loss") < metric(r, "quality_loss_before")]


# ----------------------------------------------------------------- text


def nats(value: float) -> str:
    return f"{value:+.2g}"


def loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def with_spread(mean: float, std: float | None, seeds: int, signed: bool = False) -> str:
    text = nats(mean) if signed else loss(mean)
    return text if std is None or seeds < 2 else f"{text} ± {std:.2g}"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


# ----------------------------------------------------------------- the verdicts


def before_training(runs: Runs) -> list[str]:
    """The bases before any training: each format's loss on the old skill over float32's, in order."""
    gaps = {r["quant"]: metric(r, "base_loss_a_minus_full") for r in runs.bases if r["quant"] != FLOAT32}
    gaps = {quant: gap for quant, gap in gaps.items() if gap is not None}
    if not gaps:
        return []
    ordered = sorted(gaps.items(), key=lambda item: (item[1], quant_order(item[0])))
    lines = [f"Before training, on the old skill: {', '.join(f'{quant} {nats(gap)}' for quant, gap in ordered)} nats of held-out loss "
             f"over the float32 base ({TABLE_2})."]
    if "nf4" in gaps and "fp4" in gaps:
        answer = "yes" if gaps["nf4"] < gaps["fp4"] else "no"
        lines.append(f"nf4 better than fp4 before training: {answer} ({nats(gaps['nf4'])} against {nats(gaps['fp4'])} nats).")
    return lines


def against_reference(runs: Runs, spec: str, lr: float | None) -> list[str]:
    """Each quantized format's LoRA (default init) against the 16-bit LoRA of the same spec and lr;
    with how many seeds reached the target loss where that differs from the reference's: at a
    short budget the seeds part (some leave a plateau of the loss, some don't), and a mean and a
    spread over three such seeds can read "comparable" where one format's seeds mostly stayed."""
    lines = []
    reference = runs.find(REFERENCE, spec, lr)
    for record in sorted((r for r in runs.lora if (spec_key(r), lr_of(r), init_of(r)) == (spec, lr, "default") and quantized(r["quant"])),
                         key=lambda r: quant_order(r["quant"])):
        mean, std, seeds = metric(record, "quality_minus_reference"), metric(record, "quality_minus_reference_std"), seeds_of(record)
        if mean is None:
            continue
        verdict = judge(mean, standard_error(std, seeds))
        if seeds < 2:
            evidence = f"{nats(mean)} nats, 1 seed: no spread"
        elif verdict.error is None:
            evidence = f"{nats(mean)} nats over {seeds} seeds, no spread"
        else:
            evidence = f"{nats(mean)} ± {std:.2g} nats over {plural(seeds, 'seed')} (standard error {verdict.error:.2g})"
        line = f"{record['quant']} vs 16-bit LoRA{runs.where(spec, lr)}: {evidence}: {verdict.answer} ({verdict.reason})"
        reached, reference_reached = metric(record, "target_reached"), metric(reference, "target_reached")
        if reached is not None and reference_reached is not None and reached != reference_reached:
            line += f"; the target loss reached on {int(reached)} of {plural(seeds, 'seed')}, bf16 on {int(reference_reached)}"
        lines.append(line + ".")
    return lines


def nf4_against_fp4(runs: Runs, spec: str, lr: float | None) -> list[str]:
    """nf4 against fp4 after the same fine-tune, with an unpaired (conservative) standard error."""
    nf4, fp4 = runs.find("nf4", spec, lr), runs.find("fp4", spec, lr)
    a, b = metric(nf4, "quality_loss"), metric(fp4, "quality_loss")
    if a is None or b is None:
        return []
    seeds = min(seeds_of(nf4), seeds_of(fp4))
    verdict = judge(a - b, unpaired_standard_error(metric(nf4, "quality_loss_std"), metric(fp4, "quality_loss_std"), seeds))
    answer = {"better": "yes", "comparable": "no: comparable", "worse": "no: fp4 better"}[verdict.answer]
    if verdict.error is not None:
        error = f"conservative standard error {verdict.error:.2g} over {plural(seeds, 'seed')}"
    else:
        error = "1 seed: no spread" if seeds < 2 else f"{seeds} seeds, no spread"
    return [f"nf4 better than fp4 after fine-tuning{runs.where(spec, lr)}: {answer} ({verdict.reason}; loss {loss(a)} against {loss(b)} "
            f"nats, difference {nats(a - b)}, {error})."]


def learning_rates(runs: Runs, spec: str) -> list[str]:
    """LoRA's best learning rate (bf16, default init, this spec) over full fine-tuning's, and
    the range of that ratio over the rates each side's seeds cannot tell from its best."""
    lora = [r for r in runs.lora if (r["quant"], spec_key(r), init_of(r)) == (REFERENCE, spec, "default")]
    if not lora or not runs.full:
        return []
    (lora_lr, lora_swept), (full_lr, full_swept) = best_lr(lora), best_lr(runs.full)
    where = f" ({spec_label(lora[0])})" if len({spec_key(r) for r in runs.lora}) > 1 else ""
    for side, best, swept in (("LoRA", lora_lr, lora_swept), ("full fine-tuning", full_lr, full_swept)):
        if best is None:
            return [f"Learning rates{where}: no {side} learning rate of the {swept} swept lowered the held-out loss: no ratio."]
    line = (f"Learning rates{where}: best LoRA lr {lora_lr:g} (bf16, of {lora_swept} swept) / best full fine-tuning lr {full_lr:g} "
            f"(of {full_swept} swept) = {lora_lr / full_lr:.3g}x (LoRA Without Regret: about 10x)")
    if min(lora_swept, full_swept) < 2:
        line += "; a side swept one learning rate, so this is the ratio of the rates run, not of the best"
    lora_near, full_near = near_best_lrs(lora), near_best_lrs(runs.full)
    if len(lora_near) > 1 or len(full_near) > 1:
        line += (f"; within the seeds' spread (paired by seed: 2 standard errors or {TOLERANCE_NATS:g} nats of the best) LoRA's best is "
                 f"{_rates(lora_near)} and full fine-tuning's {_rates(full_near)}, a ratio of {min(lora_near) / max(full_near):.3g}x to "
                 f"{max(lora_near) / min(full_near):.3g}x")
    return [line + "."]


def _rates(rates: list[float]) -> str:
    return f"{rates[0]:g}" if len(rates) == 1 else "any of " + ", ".join(f"{lr:g}" for lr in rates)


def ranks(runs: Runs) -> list[str]:
    """The final loss per rank at bf16, default init, one learning rate and one targets set, for
    each way alpha follows the rank: flat when max - min is within the tolerance or 2 (unpaired)
    standard errors of those two.

    How alpha follows the rank decides what a rank sweep measures. LoRA scales B A by alpha / r
    with alpha "a constant in r" (Hu et al. 2021, 4.1): Table 6's ranks share one alpha, so a
    wider adapter's update is scaled down. At alpha = k r (peft users' common 2r) the scale is
    the same at every rank and a wider adapter takes larger steps under Adam. Each family of
    ranks sharing an alpha, or sharing alpha / r, gets its own verdict; a config may be in both
    (r8 a16 is alpha 16 and alpha = 2r)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in runs.lora:
        lora = record.get("lora") or {}
        if record["quant"] != REFERENCE or init_of(record) != "default" or lora.get("r") is None or metric(record, "quality_loss") is None:
            continue
        rest = json.dumps({k: v for k, v in lora.items() if k not in ("r", "alpha")}, sort_keys=True)
        groups.setdefault((lr_of(record), rest), []).append(record)
    several = len({lr for lr, _ in groups}) > 1 or len({rest for _, rest in groups}) > 1  # name the lr and targets
    lines = []
    for (lr, _), records in groups.items():
        for family, by_rank in _alpha_families(records):
            targets = (records[0].get("lora") or {}).get("targets")
            targets = targets if isinstance(targets, str) else ",".join(targets or ())
            lines.append(_rank_verdict(family, by_rank, f" (lr {lr:g}, targets {targets})" if several else ""))
    return lines


def _alpha_families(records: list[dict[str, Any]]) -> list[tuple[tuple[str, float], dict[int, dict[str, Any]]]]:
    """The records by rank in each family of two ranks or more: ("fixed", alpha) for the ranks
    that share an alpha (LoRA's own sweep), ("ratio", alpha / r) for those that share a scale;
    fixed-alpha families first."""
    families: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for record in records:
        r, alpha = record["lora"]["r"], record["lora"]["alpha"]
        families.setdefault(("fixed", alpha), {}).setdefault(r, record)
        families.setdefault(("ratio", alpha / r), {}).setdefault(r, record)
    return sorted(((key, by_rank) for key, by_rank in families.items() if len(by_rank) > 1), key=lambda kv: (kv[0][0] != "fixed", kv[0][1]))


def _rank_verdict(family: tuple[str, float], by_rank: dict[int, dict[str, Any]], where: str) -> str:
    kind, value = family
    ordered = sorted(by_rank.items())
    worst = max(by_rank.values(), key=lambda r: metric(r, "quality_loss"))
    best = min(by_rank.values(), key=lambda r: metric(r, "quality_loss"))
    spread = metric(worst, "quality_loss") - metric(best, "quality_loss")
    seeds = min(seeds_of(worst), seeds_of(best))
    verdict = judge(spread, unpaired_standard_error(metric(worst, "quality_loss_std"), metric(best, "quality_loss_std"), seeds))
    alpha = f"alpha {value:g} (fixed, as in LoRA's Table 6)" if kind == "fixed" else f"alpha = {value:g}r"
    claim = "LoRA Table 6: rank barely matters" if kind == "fixed" else "LoRA Table 6, at a fixed alpha: rank barely matters"
    answer = "flat, as LoRA Table 6" if verdict.answer == "comparable" else f"not flat ({claim})"
    losses = ", ".join(f"r{rank} {loss(metric(record, 'quality_loss'))}" for rank, record in ordered)
    return (f"Ranks {ordered[0][0]} to {ordered[-1][0]} at bf16, {alpha}{where}: {losses} nats; max - min {spread:.2g} nats "
            f"({verdict.reason}): {answer}.")


def inits(runs: Runs) -> list[str]:
    """Each non-default init on a quantized format: the share of the quantization gap it closes,
    its difference from the default init judged against the seeds' spread (a share of a gap
    smaller than that spread is noise), and where it starts (its initial weight error against
    the default init's)."""
    lines = []
    for record in sorted((r for r in runs.lora if init_of(r) != "default" and quantized(r["quant"])),
                         key=lambda r: (INITS.index(init_of(r)) if init_of(r) in INITS else len(INITS), quant_order(r["quant"]))):
        spec, lr = spec_key(record), lr_of(record)
        default, reference = runs.find(record["quant"], spec, lr), runs.find(REFERENCE, spec, lr)
        ld, li, lb = metric(default, "quality_loss"), metric(record, "quality_loss"), metric(reference, "quality_loss")
        if None in (ld, li, lb):
            continue
        share = gap_share(ld, li, lb)
        head = f"{init_of(record)} init on {record['quant']}{runs.where(spec, lr)}: "
        losses = f"loss {loss(li)} against {loss(ld)} with the default init and {loss(lb)} at bf16"
        if share is None:
            text = f"no quantization gap to close ({record['quant']} with the default init is not above bf16); {losses}"
        else:
            if share > 1:  # below 16-bit LoRA: "closes 249%" would read as a bigger share of a gap
                text = f"closes the whole quantization gap and ends {lb - li:.2g} nats below bf16"
            else:
                text = f"closes {share:.0%} of the quantization gap" if share >= 0 else f"widens the quantization gap by {-share:.0%}"
            text += f" ({losses}"
            text += f"; a gap of {ld - lb:.2g} nats, under the {TOLERANCE_NATS:g}-nat tolerance: the share is noise)" if ld - lb <= TOLERANCE_NATS else ")"
        seeds = min(seeds_of(record), seeds_of(default))
        verdict = judge(li - ld, unpaired_standard_error(metric(record, "quality_loss_std"), metric(default, "quality_loss_std"), seeds))
        text += f"; against the default init: {verdict.answer} ({li - ld:+.2g} nats, {verdict.reason})"
        error, default_error = metric(record, "init_weight_error"), metric(default, "init_weight_error")
        if error is not None and default_error is not None:
            text += f"; initial weight error {error:.2g} against the default init's {default_error:.2g}"
        lines.append(head + text + ".")
    return lines


def time_to_target(runs: Runs, spec: str, lr: float | None) -> list[str]:
    """Steps to the target loss per format (LoRA, default init), "not reached" where no seed did."""
    found = sorted((r for r in runs.lora if (spec_key(r), lr_of(r), init_of(r)) == (spec, lr, "default") and metric(r, "target_loss") is not None),
                   key=lambda r: quant_order(r["quant"]))
    if not found:
        return []
    parts = []
    for record in found:
        steps, reached = metric(record, "steps_to_target"), metric(record, "target_reached")
        seeds = f" ({int(reached)} of {plural(seeds_of(record), 'seed')})" if reached is not None else ""
        parts.append(f"{record['quant']} {'not reached' if steps is None else f'{steps:.3g}'}{seeds if steps is not None else ''}")
    where = "; ".join(part for part in (runs.config(spec, lr), "MLPerf's time to quality") if part)
    return [f"Steps to the target loss {loss(metric(found[0], 'target_loss'))} nats ({where}): " + ", ".join(parts) + "."]


def verdicts(records: list[dict[str, Any]], compact: bool = False) -> list[str]:
    """Every verdict the records can answer, per model; ``compact``: the headline config only
    (the first spec and learning rate of the 16-bit reference, default init), without the inits
    and the steps to target (the compact table has a column of them)."""
    every = runs_by_model(records, compact)
    lines = []
    for runs in every:
        found = before_training(runs)
        configs = runs.configs()[:1] if compact else runs.configs()
        for spec, lr in configs:
            found += against_reference(runs, spec, lr) + nf4_against_fp4(runs, spec, lr)
        for spec in dict.fromkeys(spec for spec, _ in configs):
            if spec == configs[0][0] or len({lr for s, lr in configs if s == spec}) > 1:  # the headline's spec, and each lr sweep
                found += learning_rates(runs, spec)
        found += ranks(runs)
        if not compact:
            found += inits(runs)
        for spec, lr in [] if compact else configs:  # the compact table has a column of them
            formats = {r["quant"] for r in runs.lora if (spec_key(r), lr_of(r), init_of(r)) == (spec, lr, "default")}
            if (spec, lr) == configs[0] or len(formats) > 1:  # the headline's config, and each that compares formats
                found += time_to_target(runs, spec, lr)
        if len(every) > 1:
            found = [f"{runs.model}: {line}" for line in found]
        lines += found
    return lines


# ----------------------------------------------------------------- the table and the curves


def loss_cell(record: dict[str, Any]) -> str:
    mean = metric(record, "quality_loss")
    return "-" if mean is None else with_spread(mean, metric(record, "quality_loss_std"), seeds_of(record))


def reference_cell(record: dict[str, Any]) -> str:
    """The paired difference from the 16-bit LoRA; ``ref`` on the reference itself."""
    mean = metric(record, "quality_minus_reference")
    if mean is None:
        reference = record.get("quant") == REFERENCE and init_of(record) == "default" and (record.get("lora") or {}).get("r") is not None
        return "ref" if reference and record["status"] == "ok" else "-"
    return with_spread(mean, metric(record, "quality_minus_reference_std"), seeds_of(record), signed=True)


def target_cell(record: dict[str, Any]) -> str:
    steps = metric(record, "steps_to_target")
    if steps is not None:
        return f"{steps:.3g}"  # a mean over seeds of evaluation steps
    return "not reached" if metric(record, "target_loss") is not None else "-"


def exact_cell(record: dict[str, Any]) -> str:
    value = metric(record, "quality_exact_match")
    return "-" if value is None else f"{100 * value:.1f}%"


def table_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LoRA and full fine-tuning records that say something (errors too), by model, config and format."""
    lora, full = of_test(records, catalog.QUALITY_LORA), of_test(records, catalog.QUALITY_FULL)
    models = list(dict.fromkeys(r.get("model") for r in lora + full))
    specs = list(dict.fromkeys(spec_key(r) for r in lora))

    def order(record: dict[str, Any]) -> tuple:
        init = init_of(record)
        return (models.index(record.get("model")), record in full, specs.index(spec_key(record)) if record in lora else 0,
                lr_of(record) or 0.0, INITS.index(init) if init in INITS else len(INITS), quant_order(record.get("quant") or ""))

    return sorted(lora + full, key=order)


ABOUT = ("loss: held-out loss on the new skill after the same budget, mean ± std over seeds; vs 16-bit: the difference from "
         "LoRA on bf16 of the same spec and lr, default init, paired by seed (QLoRA Table 4); steps to target: mean over the "
         "seeds that reached the target loss.")


def section(records: list[dict[str, Any]], compact: bool = False) -> tuple[list[str], list[list[str]], int, list[str]] | None:
    """The headline's quality section as (header, rows, text columns, notes): the verdicts, then
    full: every LoRA and full fine-tuning config of every model (errors too); compact: the first
    model's formats at its headline config. ``None`` when no quality record ended ok."""
    every = runs_by_model(records)
    if not every:
        return None
    notes, found = verdicts(records, compact), table_records(records)
    if compact:
        runs = every[0]
        if not runs.configs():
            return [], [], 0, notes
        spec, lr = runs.configs()[0]
        found = sorted((r for r in found if r.get("model") == runs.model and (spec_key(r), lr_of(r), init_of(r)) == (spec, lr, "default")),
                       key=lambda r: quant_order(r["quant"]))
        notes = notes + [f"{runs.model}, LoRA {spec_label(found[0])}, lr {lr:g}, default init; " + ABOUT]
    elif not found:  # the bases alone: their verdicts, no fine-tune to tabulate
        return [], [], 0, notes
    else:
        notes = notes + [ABOUT]
    exact = any(metric(r, "quality_exact_match") is not None for r in found)
    numbers = ["loss [nats]", "vs 16-bit [nats]", *(["exact match"] if exact else []), "steps to target"]
    rows = []
    for record in found:
        if compact:
            case = [record["quant"]]
        else:
            full = (record.get("lora") or {}).get("r") is None
            case = [record.get("model") or "-", spec_label(record), "-" if full else str(record.get("quant")),
                    "-" if lr_of(record) is None else f"{lr_of(record):g}", "full" if full else init_of(record)]
        if status_cell(record):
            rows.append([*case, status_cell(record), *["-"] * (len(numbers) - 1)])
        else:
            rows.append([*case, loss_cell(record), reference_cell(record), *([exact_cell(record)] if exact else []), target_cell(record)])
    text_columns = 1 if compact else 5
    header = ["quant"] if compact else ["model", "method", "quant", "lr", "init"]
    return header + numbers, rows, text_columns, notes


@dataclass(frozen=True)
class Curve:
    """One learning curve: held-out loss on the new skill at each evaluation step, mean and std over seeds."""

    label: str
    steps: list[float]
    mean: list[float]
    std: list[float]
    quant: str | None = None  # the base's format; None for full fine-tuning
    config: str = ""  # the label without the format: the lines of one config on several formats


def curve_of(record: dict[str, Any], label: str, config: str = "") -> Curve | None:
    samples = record.get("samples") or {}
    steps, mean = samples.get("curve_steps"), samples.get("curve_loss")
    if not steps or not mean or len(steps) != len(mean):
        return None
    std = samples.get("curve_loss_std")
    std = list(std) if std and len(std) == len(mean) else [0.0] * len(mean)
    return Curve(label, list(steps), list(mean), std, record.get("quant"), config or label)


def curves(records: list[dict[str, Any]]) -> dict[str, tuple[str, list[Curve]]]:
    """Panel title -> (what its LoRA lines share, its curves): a panel per model, one per LoRA
    spec as well when a run swept learning rates over several specs (a learning-rate sweep: the
    attention-only and all-linear grids side by side). A line per LoRA config, its label naming
    the format and whatever else differs within the panel (spec, learning rate, init); a line per
    full fine-tuning learning rate in each of the model's panels."""
    found: dict[str, tuple[str, list[Curve]]] = {}
    for runs in runs_by_model(records):
        full = [curve_of(r, f"full fine-tuning, lr {lr_of(r):g}") for r in sorted(runs.full, key=lambda r: lr_of(r) or 0.0)]
        for index, group in enumerate(_panels(runs.lora)):
            what, drawn = _lines(group)
            drawn = [curve for curve in drawn + full if curve is not None]
            if drawn:
                found[runs.model if index == 0 else f"{runs.model} ({index + 1})"] = (what, drawn)
    return found


def _panels(lora: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The LoRA records in drawing order (spec, learning rate, init, format), split by spec when
    both the spec and the learning rate vary; one empty group when there are none."""
    specs = list(dict.fromkeys(spec_key(r) for r in lora))
    inits = list(dict.fromkeys(["default", *(init_of(r) for r in lora)]))
    ordered = sorted(lora, key=lambda r: (specs.index(spec_key(r)), lr_of(r) or 0.0, inits.index(init_of(r)), quant_order(r["quant"])))
    if len(specs) > 1 and len({lr_of(r) for r in lora}) > 1:
        return [[r for r in ordered if spec_key(r) == spec] for spec in specs]
    return [ordered]


LINE_PARTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "spec": spec_label, "lr": lambda r: f"lr {lr_of(r):g}", "init": lambda r: f"{init_of(r)} init"}


def _lines(group: list[dict[str, Any]]) -> tuple[str, list[Curve | None]]:
    """(what the group's configs share, a curve per config labelled with its format and what differs)."""
    if not group:
        return "", []
    varying = [name for name, part in LINE_PARTS.items() if len({part(r) for r in group}) > 1]
    shared = [part(group[0]) for name, part in LINE_PARTS.items() if name not in varying]

    def label(record: dict[str, Any], quant: bool = True) -> str:
        before = [LINE_PARTS["spec"](record)] if "spec" in varying else []
        format_ = [record["quant"]] if quant else []
        return " ".join(["LoRA", *before, *format_, *(LINE_PARTS[name](record) for name in varying if name != "spec")])

    return "LoRA " + ", ".join(shared) if shared else "", [curve_of(r, label(r), label(r, quant=False)) for r in group]
