"""The quality suite's side of the report, on records built here as the suite writes them: each
verdict's arithmetic and its boundaries, a verdict left out when its records are, the headline
section in full (markdown) and compact (terminal), ``pytest-lora report`` giving the same, and
the learning-curve plot. The suite's tests are named through ``catalog`` only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pytest_lora import cli
from pytest_lora.report import catalog, headline, markdown, plots, quality, terminal

MODEL = "smollm2-135m"
STEPS = [0, 15, 30, 45, 60]
BEFORE = 2.0  # the held-out loss on the new skill before any training


def lora_spec(r: int = 16, targets: str = "all-linear", alpha: float | None = None) -> dict:
    return {"r": r, "alpha": 2 * r if alpha is None else alpha, "targets": targets, "dropout": 0.0, "variant": "lora", "bias": "none", "modules_to_save": []}


def curve(final: float, std: float) -> dict:
    """A learning curve from BEFORE to ``final``, its spread growing from 0 to ``std``."""
    means = [BEFORE + (final - BEFORE) * k / (len(STEPS) - 1) for k in range(len(STEPS))]
    return {"curve_steps": STEPS, "curve_loss": means, "curve_loss_std": [std * k / (len(STEPS) - 1) for k in range(len(STEPS))],
            "curve_seconds": [0.1 * step for step in STEPS], "curve_seconds_std": [0.0] * len(STEPS)}


def base(quant: str, gap: float, model: str = MODEL) -> dict:
    metrics = {"base_loss_a": 3.0 + gap, "base_accuracy_a": 0.4, "base_loss_a_minus_full": gap, "base_loss_b": BEFORE}
    return {"suite": "quality", "test": f"suites/test_quality.py::{catalog.BASE_QUALITY}[{quant}]", "model": model, "quant": quant,
            "lora": None, "workload": {"steps": 60, "batch": 16, "seq_len": 64}, "status": "ok", "metrics": metrics,
            "units": {name: "nats" for name in metrics}, "samples": {}, "warnings": [], "error": None}


def lora(quant: str, loss: float, std: float = 0.01, seeds: int = 4, r: int = 16, lr: float = 1e-3, init: str = "default",
         minus: float | None = None, minus_std: float | None = None, steps: float | None = 30.0, reached: int | None = None,
         weight_error: float | None = None, model: str = MODEL, status: str = "ok", alpha: float | None = None) -> dict:
    """A ``quality_lora`` record; ``minus``: its paired difference from the 16-bit reference (none on the reference)."""
    metrics = {"quality_loss": loss, "quality_loss_std": std, "quality_accuracy": 0.5, "quality_accuracy_std": 0.01,
               "quality_loss_before": BEFORE, "seeds": seeds, "fine_tune_lr": lr, "target_loss": 1.3,
               "target_reached": seeds if reached is None else reached, "curve_steps": 60, "curve_loss": loss, "curve_loss_std": std}
    if minus is not None:
        metrics.update(quality_minus_reference=minus, quality_minus_reference_std=0.0 if minus_std is None else minus_std)
    if steps is not None:
        metrics.update(steps_to_target=steps, seconds_to_target=steps * 0.1)
    if weight_error is not None:
        metrics.update(init_weight_error=weight_error, init_weight_error_std=0.0)
    return {"suite": "quality", "test": f"suites/test_quality.py::{catalog.QUALITY_LORA}[{quant}-r{r}-{init}-lr{lr:g}]", "model": model,
            "quant": quant, "lora": lora_spec(r, alpha=alpha), "workload": {"steps": 60, "batch": 16, "seq_len": 64, "lr": lr, "init": init},
            "status": status, "metrics": metrics if status == "ok" else {}, "units": {name: "nats" for name in metrics},
            "samples": curve(loss, std) if status == "ok" else {}, "warnings": [], "error": None if status == "ok" else "CUDA out of memory"}


def full(lr: float, loss: float, std: float = 0.01, seeds: int = 4, model: str = MODEL) -> dict:
    metrics = {"quality_loss": loss, "quality_loss_std": std, "quality_accuracy": 0.5, "quality_loss_before": BEFORE, "seeds": seeds,
               "fine_tune_lr": lr, "curve_steps": 60, "curve_loss": loss, "curve_loss_std": std}
    spec = {"r": None, "alpha": None, "targets": "all parameters", "dropout": 0.0, "variant": "full fine-tuning", "bias": "all",
            "modules_to_save": []}
    return {"suite": "quality", "test": f"suites/test_quality.py::{catalog.QUALITY_FULL}[full-lr{lr:g}]", "model": model, "quant": None,
            "lora": spec, "workload": {"steps": 60, "batch": 16, "seq_len": 64, "lr": lr, "init": "full"}, "status": "ok",
            "metrics": metrics, "units": {name: "nats" for name in metrics}, "samples": curve(loss, std), "warnings": [], "error": None}


def document(records: list[dict]) -> dict:
    return {"schema_version": 1, "run": {"id": "20261206-000000-abcdef", "status": "passed", "git": {}, "argv": [], "builds": []},
            "machine": {"device": "cpu", "cpu": "test"}, "records": records}


def run_of(records: list[dict]) -> quality.Runs:
    (runs,) = quality.runs_by_model(records)
    return runs


REFERENCE = lora("bf16", 1.20, steps=30.0, weight_error=0.0)
SPEC = quality.spec_key(REFERENCE)


def a_whole_run() -> list[dict]:
    """The bases, LoRA per format, a rank and lr sweep at bf16, PiSSA on nf4 and two full fine-tuning rates."""
    return [base("fp32", 0.0), base("bf16", 0.001), base("int8", 0.002), base("nf4", 0.013), base("fp4", 0.031), base("nf4-dq", 0.012),
            REFERENCE, lora("nf4", 1.212, minus=0.012, minus_std=0.004, steps=45.0, weight_error=0.004),
            lora("fp4", 1.26, std=0.02, minus=0.06, minus_std=0.02, steps=None, reached=0, weight_error=0.009),
            lora("nf4-dq", 1.205, minus=0.005, minus_std=0.004, steps=45.0),
            lora("nf4", 1.206, init="pissa", minus=0.006, minus_std=0.004, weight_error=0.001),
            lora("bf16", 1.30, lr=1e-4), lora("bf16", 1.21, r=1), lora("bf16", 1.19, r=64),
            full(1e-4, 1.15), full(1e-5, 1.40)]


# ----------------------------------------------------------------- the arithmetic


def test_the_standard_error_is_the_std_over_the_root_of_the_seeds_and_none_without_a_spread():
    assert quality.standard_error(0.02, 4) == pytest.approx(0.01)
    assert quality.standard_error(0.02, 1) is None  # one seed: a std of one value is no spread
    assert quality.standard_error(0.0, 3) is None and quality.standard_error(None, 3) is None
    assert quality.unpaired_standard_error(0.03, 0.04, 4) == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / sqrt(4)
    assert quality.unpaired_standard_error(0.03, 0.04, 1) is None and quality.unpaired_standard_error(0.0, 0.0, 4) is None


@pytest.mark.parametrize(("difference", "error", "answer", "reason"), [
    (0.01, None, "comparable", "within the 0.01-nat tolerance"),  # the tolerance's edge, with no spread
    (-0.01, None, "comparable", "within the 0.01-nat tolerance"),
    (0.0101, None, "worse", "over the 0.01-nat tolerance"),  # one seed: only the tolerance applies
    (-0.0101, None, "better", "over the 0.01-nat tolerance"),
    (0.02, 0.01, "comparable", "within 2 standard errors"),  # 2 standard errors' edge, over the tolerance
    (0.0201, 0.01, "worse", "2.0 standard errors, over the 0.01-nat tolerance"),
    (-0.05, 0.01, "better", "5.0 standard errors, over the 0.01-nat tolerance"),
    (0.005, 0.001, "comparable", "within the 0.01-nat tolerance"),  # 5 standard errors, but under the tolerance
])
def test_a_difference_is_comparable_within_the_tolerance_or_two_standard_errors(difference, error, answer, reason):
    verdict = quality.judge(difference, error)
    assert (verdict.answer, verdict.reason) == (answer, reason)


def test_the_tolerance_is_a_constant_a_caller_may_change():
    assert quality.TOLERANCE_NATS == 0.01 and quality.judge(0.03, None, tolerance=0.05).answer == "comparable"


def test_the_share_of_the_gap_an_init_closes():
    assert quality.gap_share(1.30, 1.26, 1.20) == pytest.approx(0.4)  # (1.30 - 1.26) / (1.30 - 1.20)
    assert quality.gap_share(1.30, 1.35, 1.20) == pytest.approx(-0.5)  # it widens the gap
    assert quality.gap_share(1.20, 1.18, 1.20) is None and quality.gap_share(1.19, 1.18, 1.20) is None  # no gap to close


def test_the_best_learning_rate_is_the_lowest_loss_among_the_runs_that_lowered_it():
    swept = [lora("bf16", 1.30, lr=1e-4), lora("bf16", 1.21, lr=1e-3), lora("bf16", math.nan, lr=1e-2), lora("bf16", 2.5, lr=3e-2)]
    assert quality.best_lr(swept) == (1e-3, 4)  # NaN (diverged) and above the loss before training are not candidates
    assert quality.best_lr([lora("bf16", 2.5, lr=3e-2)]) == (None, 1)


# ----------------------------------------------------------------- each verdict


def test_before_training_the_formats_are_ordered_by_their_loss_over_float32():
    assert quality.before_training(run_of(a_whole_run())) == [
        "Before training, on the old skill: bf16 +0.001, int8 +0.002, nf4-dq +0.012, nf4 +0.013, fp4 +0.031 nats of held-out loss over "
        "the float32 base (QLoRA Table 2: NF4+DQ 27.41 < FP4 31.07 < Int4 34.34 perplexity).",
        "nf4 better than fp4 before training: yes (+0.013 against +0.031 nats)."]
    worse = quality.before_training(run_of([base("fp32", 0.0), base("nf4", 0.04), base("fp4", 0.03)]))
    assert worse[1] == "nf4 better than fp4 before training: no (+0.04 against +0.03 nats)."
    assert quality.before_training(run_of([base("fp32", 0.0), base("nf4", 0.04)]))[1:] == []  # no fp4: no verdict on it
    assert quality.before_training(run_of([base("fp32", 0.0), REFERENCE])) == []  # float32 alone: nothing to order


def test_each_quantized_format_against_16_bit_lora_with_its_standard_error():
    runs = run_of(a_whole_run())
    assert quality.against_reference(runs, SPEC, 1e-3) == [
        # 0.012 over the tolerance and 6 standard errors (0.004 / sqrt 4 = 0.002)
        "nf4 vs 16-bit LoRA (r16 a32 all-linear, lr 0.001): +0.012 ± 0.004 nats over 4 seeds (standard error 0.002): worse "
        "(6.0 standard errors, over the 0.01-nat tolerance).",
        # 0.06 with a standard error of 0.01: 6 standard errors
        "fp4 vs 16-bit LoRA (r16 a32 all-linear, lr 0.001): +0.06 ± 0.02 nats over 4 seeds (standard error 0.01): worse "
        "(6.0 standard errors, over the 0.01-nat tolerance); the target loss reached on 0 of 4 seeds, bf16 on 4.",
        "nf4-dq vs 16-bit LoRA (r16 a32 all-linear, lr 0.001): +0.005 ± 0.004 nats over 4 seeds (standard error 0.002): comparable "
        "(within the 0.01-nat tolerance)."]
    noisy = run_of([REFERENCE, lora("nf4", 1.212, minus=0.012, minus_std=0.02)])  # standard error 0.01: 0.012 is within 2 of them
    assert quality.against_reference(noisy, SPEC, 1e-3) == [
        "nf4 vs 16-bit LoRA: +0.012 ± 0.02 nats over 4 seeds (standard error 0.01): comparable (within 2 standard errors)."]
    one_seed = run_of([lora("bf16", 1.2, seeds=1), lora("nf4", 1.209, seeds=1, minus=-0.009), lora("fp4", 1.23, seeds=1, minus=0.03)])
    assert quality.against_reference(one_seed, SPEC, 1e-3) == [
        "nf4 vs 16-bit LoRA: -0.009 nats, 1 seed: no spread: comparable (within the 0.01-nat tolerance).",
        "fp4 vs 16-bit LoRA: +0.03 nats, 1 seed: no spread: worse (over the 0.01-nat tolerance)."]
    parted = run_of([REFERENCE, lora("fp4", 1.3, minus=0.1, minus_std=0.3, reached=1)])  # 3 of 4 seeds stayed on a plateau
    assert quality.against_reference(parted, SPEC, 1e-3) == [
        "fp4 vs 16-bit LoRA: +0.1 ± 0.3 nats over 4 seeds (standard error 0.15): comparable (within 2 standard errors); "
        "the target loss reached on 1 of 4 seeds, bf16 on 4."]
    agree = run_of([REFERENCE, lora("nf4", 1.18, minus=-0.02, minus_std=0.0)])  # seeds that agree exactly: the tolerance alone
    assert quality.against_reference(agree, SPEC, 1e-3) == [
        "nf4 vs 16-bit LoRA: -0.02 nats over 4 seeds, no spread: better (over the 0.01-nat tolerance)."]


def test_nf4_against_fp4_after_fine_tuning_with_a_conservative_standard_error():
    runs = run_of([REFERENCE, lora("nf4", 1.20, std=0.01, minus=0.0), lora("fp4", 1.25, std=0.02, minus=0.05)])
    # difference -0.05; standard error sqrt(0.01^2 + 0.02^2) / sqrt(4) = 0.0112: 4.5 of them
    assert quality.nf4_against_fp4(runs, SPEC, 1e-3) == [
        "nf4 better than fp4 after fine-tuning: yes (4.5 standard errors, over the 0.01-nat tolerance; loss 1.2 against 1.25 nats, "
        "difference -0.05, conservative standard error 0.011 over 4 seeds)."]
    close = run_of([REFERENCE, lora("nf4", 1.22, std=0.02), lora("fp4", 1.20, std=0.02)])  # -> 0.02 within 2 x 0.0141
    assert quality.nf4_against_fp4(close, SPEC, 1e-3)[0].startswith("nf4 better than fp4 after fine-tuning: no: comparable (within 2 standard errors;")
    worse = run_of([REFERENCE, lora("nf4", 1.30, seeds=1), lora("fp4", 1.20, seeds=1)])
    assert quality.nf4_against_fp4(worse, SPEC, 1e-3) == [
        "nf4 better than fp4 after fine-tuning: no: fp4 better (over the 0.01-nat tolerance; loss 1.3 against 1.2 nats, difference +0.1, "
        "1 seed: no spread)."]
    assert quality.nf4_against_fp4(run_of([REFERENCE, lora("nf4", 1.2)]), SPEC, 1e-3) == []  # no fp4


def test_the_learning_rate_ratio_of_lora_over_full_fine_tuning():
    assert quality.learning_rates(run_of(a_whole_run()), SPEC) == [
        "Learning rates (r16 a32 all-linear): best LoRA lr 0.001 (bf16, of 2 swept) / best full fine-tuning lr 0.0001 (of 2 swept) "
        "= 10x (LoRA Without Regret: about 10x)."]
    one_each = run_of([REFERENCE, full(1e-4, 1.15)])
    assert quality.learning_rates(one_each, SPEC) == [
        "Learning rates: best LoRA lr 0.001 (bf16, of 1 swept) / best full fine-tuning lr 0.0001 (of 1 swept) = 10x (LoRA Without Regret: "
        "about 10x); a side swept one learning rate, so this is the ratio of the rates run, not of the best."]
    diverged = run_of([REFERENCE, full(1e-2, 2.5), full(1e-1, math.nan)])
    assert quality.learning_rates(diverged, SPEC) == [
        "Learning rates: no full fine-tuning learning rate of the 2 swept lowered the held-out loss: no ratio."]
    assert quality.learning_rates(run_of([REFERENCE]), SPEC) == []  # no full fine-tuning: no ratio
    assert quality.learning_rates(run_of([lora("nf4", 1.2), full(1e-4, 1.15)]), SPEC) == []  # no 16-bit LoRA


def seeded(record: dict, losses: list[float]) -> dict:
    """A record whose final loss keeps each seed's value, its mean and spread from them."""
    mean = sum(losses) / len(losses)
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1))
    record["metrics"].update(quality_loss=mean, quality_loss_std=std, seeds=len(losses))
    record["samples"]["quality_loss"] = losses
    return record


def test_the_ratio_s_range_covers_the_rates_the_seeds_cannot_tell_from_the_best():
    """The measured case (smollm2-135m, all linear layers, 3 seeds): 3e-4 is LoRA's best by mean,
    1e-3 better on two seeds and on a plateau on the third; paired by seed the two are one (mean
    difference 0.033, standard error 0.10); 1e-4 and full fine-tuning's 1e-5 are worse on every
    seed. Pairing matters: a rate 0.02 nats worse on every seed is told apart, though its
    seeds' spread (0.1) would hide it unpaired."""
    measured = run_of([seeded(lora("bf16", 0, lr=3e-4), [1.17, 1.123, 1.174]), seeded(lora("bf16", 0, lr=1e-3), [1.09, 1.064, 1.413]),
                       seeded(lora("bf16", 0, lr=1e-4), [1.455, 1.336, 1.451]), seeded(full(3e-5, 0), [1.093, 1.086, 1.103]),
                       seeded(full(1e-5, 0), [1.255, 1.225, 1.235])])
    assert quality.near_best_lrs(measured.lora) == [3e-4, 1e-3] and quality.near_best_lrs(measured.full) == [3e-5]
    assert quality.learning_rates(measured, SPEC) == [
        "Learning rates: best LoRA lr 0.0003 (bf16, of 3 swept) / best full fine-tuning lr 3e-05 (of 2 swept) = 10x (LoRA Without Regret: "
        "about 10x); within the seeds' spread (paired by seed: 2 standard errors or 0.01 nats of the best) LoRA's best is any of 0.0003, "
        "0.001 and full fine-tuning's 3e-05, a ratio of 10x to 33.3x."]
    steady = [seeded(lora("bf16", 0, lr=1e-3), [1.10, 1.20, 1.30]), seeded(lora("bf16", 0, lr=3e-4), [1.12, 1.22, 1.32])]
    assert quality.near_best_lrs(steady) == [1e-3]
    unpaired = [lora("bf16", 1.20, std=0.1, seeds=3, lr=1e-3), lora("bf16", 1.22, std=0.1, seeds=3, lr=3e-4)]  # no seeds kept
    assert quality.near_best_lrs(unpaired) == [3e-4, 1e-3]
    assert quality.learning_rates(run_of([REFERENCE, full(1e-4, 1.15)]), SPEC)[0].endswith("not of the best.")  # one each: no range


def test_ranks_are_flat_within_the_tolerance_or_two_standard_errors():
    assert quality.ranks(run_of(a_whole_run())) == [  # 1.19 to 1.21: 0.02 is 2.8 standard errors of 0.00707 (std 0.01 each, 4 seeds)
        "Ranks 1 to 64 at bf16, alpha = 2r (lr 0.001, targets all-linear): r1 1.21, r16 1.2, r64 1.19 nats; max - min 0.02 nats "
        "(2.8 standard errors, over the 0.01-nat tolerance): not flat (LoRA Table 6, at a fixed alpha: rank barely matters)."]
    flat = run_of([lora("bf16", 1.20, r=1), lora("bf16", 1.204, r=8), lora("bf16", 1.208, r=64)])
    assert quality.ranks(flat) == [
        "Ranks 1 to 64 at bf16, alpha = 2r: r1 1.2, r8 1.204, r64 1.208 nats; max - min 0.008 nats (within the 0.01-nat tolerance): "
        "flat, as LoRA Table 6."]
    noisy = run_of([lora("bf16", 1.20, r=1, std=0.03), lora("bf16", 1.24, r=64, std=0.03)])  # 0.04 within 2 x 0.0212
    assert quality.ranks(noisy)[0].endswith("(within 2 standard errors): flat, as LoRA Table 6.")
    assert quality.ranks(run_of([REFERENCE, lora("nf4", 1.2, r=64)])) == []  # one rank at bf16: no verdict


def test_ranks_are_judged_per_way_alpha_follows_the_rank():
    """LoRA's Table 6 keeps alpha fixed (the update scaled by alpha / r); alpha = 2r keeps the
    scale. Both families in one run, r8 a16 in each: two verdicts, the fixed-alpha one first, and
    a rank with an alpha of neither family (r4 a4) in none."""
    both = run_of([lora("bf16", 1.40, r=1, alpha=2), lora("bf16", 1.30, r=8), lora("bf16", 1.20, r=64),
                   lora("bf16", 1.296, r=1, alpha=16), lora("bf16", 1.304, r=64, alpha=16), lora("bf16", 1.9, r=4, alpha=4)])
    assert quality.ranks(both) == [
        "Ranks 1 to 64 at bf16, alpha 16 (fixed, as in LoRA's Table 6): r1 1.296, r8 1.3, r64 1.304 nats; max - min 0.008 nats "
        "(within the 0.01-nat tolerance): flat, as LoRA Table 6.",
        "Ranks 1 to 64 at bf16, alpha = 2r: r1 1.4, r8 1.3, r64 1.2 nats; max - min 0.2 nats (28.3 standard errors, over the 0.01-nat "
        "tolerance): not flat (LoRA Table 6, at a fixed alpha: rank barely matters)."]
    fixed = run_of([lora("bf16", 1.5, r=1, alpha=16), lora("bf16", 1.2, r=64, alpha=16)])
    assert quality.ranks(fixed)[0].endswith("not flat (LoRA Table 6: rank barely matters).")
    assert quality.ranks(run_of([lora("bf16", 1.5, r=1, alpha=16), lora("bf16", 1.2, r=64, alpha=32)])) == []  # neither shared


def test_an_init_closes_a_share_of_the_quantization_gap():
    assert quality.inits(run_of(a_whole_run())) == [  # (1.212 - 1.206) / (1.212 - 1.20) = 50%
        "pissa init on nf4 (r16 a32 all-linear, lr 0.001): closes 50% of the quantization gap (loss 1.206 against 1.212 with the default "
        "init and 1.2 at bf16); against the default init: comparable (-0.006 nats, within the 0.01-nat tolerance); initial weight "
        "error 0.001 against the default init's 0.004."]
    wide = run_of([REFERENCE, lora("nf4", 1.30, weight_error=0.004), lora("nf4", 1.26, init="pissa", weight_error=0.001)])
    assert quality.inits(wide) == [  # standard error sqrt(0.01^2 + 0.01^2) / sqrt(4 seeds) = 0.0071
        "pissa init on nf4: closes 40% of the quantization gap (loss 1.26 against 1.3 with the default init and 1.2 at bf16); against "
        "the default init: better (-0.04 nats, 5.7 standard errors, over the 0.01-nat tolerance); initial weight error 0.001 against "
        "the default init's 0.004."]
    noisy = run_of([REFERENCE, lora("nf4", 1.30, std=0.05), lora("nf4", 1.26, std=0.05, init="gaussian")])
    assert "closes 40% of the quantization gap" in quality.inits(noisy)[0]
    assert "against the default init: comparable (-0.04 nats, within 2 standard errors)" in quality.inits(noisy)[0]
    worse = run_of([REFERENCE, lora("nf4", 1.30), lora("nf4", 1.40, init="loftq")])  # (1.30 - 1.40) / (1.30 - 1.20)
    assert quality.inits(worse)[0].startswith("loftq init on nf4: widens the quantization gap by 100% (loss 1.4 against 1.3 ")
    beyond = run_of([REFERENCE, lora("nf4", 1.28), lora("nf4", 1.15, init="loftq")])  # 1.15 < 1.20: more than the gap (162%)
    assert quality.inits(beyond)[0].startswith("loftq init on nf4: closes the whole quantization gap and ends 0.05 nats below bf16 "
                                               "(loss 1.15 against 1.28 ")
    small = run_of([REFERENCE, lora("nf4", 1.205), lora("nf4", 1.204, init="olora")])
    assert "a gap of 0.005 nats, under the 0.01-nat tolerance: the share is noise" in quality.inits(small)[0]
    none = run_of([REFERENCE, lora("nf4", 1.19), lora("nf4", 1.18, init="loftq")])
    assert quality.inits(none) == ["loftq init on nf4: no quantization gap to close (nf4 with the default init is not above bf16); "
                                   "loss 1.18 against 1.19 with the default init and 1.2 at bf16; against the default init: comparable "
                                   "(-0.01 nats, within 2 standard errors)."]
    assert quality.inits(run_of([lora("nf4", 1.19), lora("nf4", 1.18, init="loftq")])) == []  # no bf16 reference
    assert quality.inits(run_of([REFERENCE, lora("bf16", 1.18, init="pissa")])) == []  # not a quantized format


def test_steps_to_target_per_format_and_not_reached_where_no_seed_reached_it():
    assert quality.time_to_target(run_of(a_whole_run()), SPEC, 1e-3) == [
        "Steps to the target loss 1.3 nats (r16 a32 all-linear, lr 0.001; MLPerf's time to quality): bf16 30 (4 of 4 seeds), "
        "nf4 45 (4 of 4 seeds), fp4 not reached, nf4-dq 45 (4 of 4 seeds)."]
    untargeted = lora("bf16", 1.2)
    del untargeted["metrics"]["target_loss"]
    assert quality.time_to_target(run_of([untargeted]), SPEC, 1e-3) == []


def test_a_verdict_whose_records_are_missing_is_left_out():
    only_lora = quality.verdicts([REFERENCE, lora("nf4", 1.205, minus=0.005, minus_std=0.004)])
    assert [line.split(":")[0] for line in only_lora] == ["nf4 vs 16-bit LoRA", "Steps to the target loss 1.3 nats (MLPerf's time to quality)"]
    bases = headline.quality_section([base("fp32", 0.0), base("nf4", 0.01)])  # the bases alone: their verdict, no table
    assert bases.notes[0].startswith("Before training") and (bases.header, bases.rows) == ([], [])
    assert len(headline.quality_section([base("fp32", 0.0), base("nf4", 0.01)], compact=True).notes) == 1
    assert quality.verdicts([]) == [] and headline.quality_section([]) is None
    failed = lora("nf4", 1.2, status="oom")
    assert headline.quality_section([failed]) is None  # nothing ended ok: no section


def test_every_model_gets_its_own_verdicts_named():
    lines = quality.verdicts([REFERENCE, lora("nf4", 1.205, minus=0.005), lora("bf16", 1.5, model="task model (A -> B)"),
                              lora("nf4", 1.6, minus=0.1, model="task model (A -> B)")])
    assert [line.split(": ")[0] for line in lines if "vs 16-bit" in line] == [MODEL, "task model (A -> B)"]


# ----------------------------------------------------------------- the section, the report, the plot


def test_the_section_leads_with_the_verdicts_then_tabulates_every_config():
    records = [*a_whole_run(), lora("int8", 1.2, status="oom")]
    section = headline.quality_section(records)
    assert section.key == "quality" and section.notes[:2] == quality.before_training(run_of(a_whole_run()))
    assert section.notes[:-1] == quality.verdicts(records) and section.notes[-1].startswith("loss: held-out loss on the new skill")
    assert section.header == ["model", "method", "quant", "lr", "init", "loss [nats]", "vs 16-bit [nats]", "steps to target"]
    rows = {tuple(row[1:5]): row[5:] for row in section.rows}
    assert rows[("r16 a32 all-linear", "bf16", "0.001", "default")] == ["1.2 ± 0.01", "ref", "30"]
    assert rows[("r16 a32 all-linear", "fp4", "0.001", "default")] == ["1.26 ± 0.02", "+0.06 ± 0.02", "not reached"]
    assert rows[("r16 a32 all-linear", "nf4", "0.001", "pissa")] == ["1.206 ± 0.01", "+0.006 ± 0.004", "30"]
    assert rows[("r16 a32 all-linear", "int8", "0.001", "default")] == ["oom", "-", "-"]
    assert rows[("full fine-tuning", "-", "0.0001", "full")] == ["1.15 ± 0.01", "-", "-"]
    headline_config = [row[2] for row in section.rows if row[1:4:2] == ["r16 a32 all-linear", "0.001"] and row[4] == "default"]
    assert headline_config == ["bf16", "int8", "nf4", "fp4", "nf4-dq"]  # the format table's order


def test_the_compact_section_is_the_headline_config_of_the_first_model():
    section = headline.quality_section(a_whole_run(), compact=True)
    assert section.header == ["quant", "loss [nats]", "vs 16-bit [nats]", "steps to target"]
    assert section.rows == [["bf16", "1.2 ± 0.01", "ref", "30"], ["nf4", "1.212 ± 0.01", "+0.012 ± 0.004", "45"],
                            ["fp4", "1.26 ± 0.02", "+0.06 ± 0.02", "not reached"], ["nf4-dq", "1.205 ± 0.01", "+0.005 ± 0.004", "45"]]
    assert not any("init on" in note or note.startswith("Steps to") for note in section.notes)  # the full report's
    assert section.notes[2] == ("nf4 vs 16-bit LoRA: +0.012 ± 0.004 nats over 4 seeds (standard error 0.002): worse (6.0 standard "
                                "errors, over the 0.01-nat tolerance).")  # its one config is named once, in the last note
    assert section.notes[-1].startswith(f"{MODEL}, LoRA r16 a32 all-linear, lr 0.001, default init; loss: ")


def test_exact_match_is_a_column_where_the_model_has_answers():
    answered = lora("bf16", 1.2)
    answered["metrics"].update(quality_exact_match=0.4688, quality_exact_match_std=0.01)
    section = headline.quality_section([answered])
    assert section.header[-2] == "exact match" and section.rows[0][-2] == "46.9%"


def test_the_markdown_shows_the_section_and_its_plot_and_the_terminal_its_compact_form(tmp_path):
    records = a_whole_run()
    text = markdown.render_run(document(records))
    assert "### Quality" in text and "![Learning curves: held-out loss on the new skill](20261206-000000-abcdef-quality.png)" in text
    assert all(line in text for line in quality.verdicts(records))
    shown = terminal.render_headline_terminal(records, 120, False)
    assert "Quality: Before training, on the old skill" in shown and "pissa init" not in shown
    path = tmp_path / "run.json"
    path.write_text(json.dumps(document(records)))
    assert cli.main(["report", str(path), "-o", str(tmp_path)]) == 0
    assert (tmp_path / "20261206-000000-abcdef.md").read_text() == text
    assert (tmp_path / "20261206-000000-abcdef-quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_learning_curves_are_one_line_per_format_and_per_full_fine_tuning_rate(tmp_path):
    formats = [record for record in a_whole_run() if record["test"].endswith("-default-lr0.001]") and record["lora"]["r"] == 16]
    records = [*formats, full(1e-4, 1.15), full(1e-5, 1.40), lora("bf16", 1.5, model="task model (A -> B)"),
               full(1e-3, 1.4, model="task model (A -> B)")]
    drawn = quality.curves(records)
    what, found = drawn[MODEL]
    assert what == "LoRA r16 a32 all-linear, lr 0.001, default init"
    assert [curve.label for curve in found] == ["LoRA bf16", "LoRA nf4", "LoRA fp4", "LoRA nf4-dq", "full fine-tuning, lr 1e-05",
                                                "full fine-tuning, lr 0.0001"]
    assert found[0].steps == STEPS and found[0].mean[0] == BEFORE and found[0].mean[-1] == pytest.approx(1.2)
    assert found[2].std[-1] == 0.02
    assert [curve.label for curve in drawn["task model (A -> B)"][1]] == ["LoRA bf16", "full fine-tuning, lr 0.001"]
    assert "quality" in plots.available(records)
    written = plots.write(document(records), tmp_path)
    assert [path.name for path in written] == ["20261206-000000-abcdef-quality.png"]
    assert plots.available([base("fp32", 0.0)]) == []  # no curve: no plot


def test_a_sweep_draws_every_config_it_swept_labelled_by_what_differs():
    """Ranks and inits: one panel, a line per config (its spec or init named); learning rates over
    two target sets: a panel per target set, a line per learning rate, full fine-tuning in each."""
    ranks = quality.curves([lora("bf16", 1.3, r=1), lora("nf4", 1.31, r=1), lora("bf16", 1.2, r=64), full(1e-5, 1.4)])
    assert list(ranks) == [MODEL] and ranks[MODEL][0] == "LoRA lr 0.001, default init"
    assert [c.label for c in ranks[MODEL][1]] == ["LoRA r1 a2 all-linear bf16", "LoRA r1 a2 all-linear nf4", "LoRA r64 a128 all-linear bf16",
                                                 "full fine-tuning, lr 1e-05"]
    inits = quality.curves([lora("nf4", 1.3, init="pissa"), lora("nf4", 1.2), REFERENCE])
    assert [c.label for c in inits[MODEL][1]] == ["LoRA bf16 default init", "LoRA nf4 default init", "LoRA nf4 pissa init"]
    swept = [lora("bf16", loss, lr=lr) for lr, loss in ((1e-3, 1.2), (1e-4, 1.4))]
    swept += [{**lora("bf16", loss, lr=lr), "lora": lora_spec(targets="q_proj,v_proj")} for lr, loss in ((1e-3, 1.3), (1e-4, 1.5))]
    panels = quality.curves([*swept, full(3e-5, 1.1)])
    assert list(panels) == [MODEL, f"{MODEL} (2)"]
    assert [panel[0] for panel in panels.values()] == ["LoRA r16 a32 all-linear, default init", "LoRA r16 a32 q_proj,v_proj, default init"]
    assert [c.label for c in panels[f"{MODEL} (2)"][1]] == ["LoRA bf16 lr 0.0001", "LoRA bf16 lr 0.001", "full fine-tuning, lr 3e-05"]


def test_the_legend_fits_its_labels_and_a_diverged_run_leaves_the_axis():
    """Long labels (a rank sweep's) take fewer columns than short ones; a run that diverged is
    drawn off the top of its axis, which keeps the others' differences readable."""
    assert plots.legend_shape(7.0, ["LoRA r64 a128 q_proj,v_proj bf16"] * 11) == (2, 6)
    assert plots.legend_shape(7.0, ["LoRA bf16", "LoRA nf4", "LoRA fp4"]) == (3, 1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [lora("bf16", 1.2, lr=1e-3), lora("bf16", 9.0, lr=1e-2)]
    figure, _ = plots.draw_quality(plt, quality.curves(records), records)
    assert figure.axes[0].get_ylim()[1] == pytest.approx(plots.DIVERGED * BEFORE)
    plt.close(figure)


def test_no_two_lines_share_a_colour_and_a_style():
    """A rank sweep on bf16 and nf4 (18 lines in the measured one): a colour per config, a line
    style per format, full fine-tuning dashed; a formats sweep (one config): a colour per format,
    from tab20 past ten lines."""
    specs = dict.fromkeys((r, alpha) for r in (1, 2, 4, 8, 64) for alpha in (16, 2 * r))  # r8 a16 once
    ranks = [lora(quant, 1.3, r=r, alpha=alpha) for r, alpha in specs for quant in ("bf16", "nf4")]
    drawn = quality.curves([*ranks, full(1e-5, 1.4)])[MODEL][1]
    colour, style = plots.curve_styles(drawn)
    looks = [(colour(curve), style(curve)) for curve in drawn]
    assert len(drawn) == 19 and len(set(looks)) == 19
    by_label = {curve.label: look for curve, look in zip(drawn, looks)}
    assert by_label["LoRA r1 a16 all-linear bf16"][0] == by_label["LoRA r1 a16 all-linear nf4"][0]
    assert {look[1] for label, look in by_label.items() if label.endswith("nf4")} == {"-."}
    assert by_label["full fine-tuning, lr 1e-05"][1] == "--"
    formats = [lora(quant, 1.3) for quant in ("fp32", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq", "torchao-int8", "hqq-4bit",
                                              "hqq-2bit", "hqq-8bit")]
    drawn = quality.curves(formats)[MODEL][1]
    colour, style = plots.curve_styles(drawn)
    assert len({colour(curve) for curve in drawn}) == 11 and {style(curve) for curve in drawn} == {"-"}


def test_a_curve_without_its_samples_is_not_drawn():
    bare = lora("bf16", 1.2)
    bare["samples"] = {}
    assert quality.curves([bare]) == {}
    unequal = lora("bf16", 1.2)
    unequal["samples"]["curve_loss_std"] = [0.0]
    assert quality.curves([unequal])[MODEL][1][0].std == [0.0] * len(STEPS)


def test_the_catalog_lists_the_parts_that_read_the_quality_tests():
    assert catalog.readers(catalog.BASE_QUALITY) == ("headline: quality", "side by side")
    assert catalog.readers(catalog.QUALITY_LORA) == ("headline: quality", "plot: quality", "side by side")
    assert catalog.readers(catalog.QUALITY_FULL) == ("headline: quality", "plot: quality")
    assert quality.curves in plots.DATA.values() and headline.quality_section in headline.BUILDERS


SWEEP_RUNS = sorted((Path(__file__).parents[1] / "results" / "published" / "real" / "quality").glob("*/*.json"))


@pytest.mark.parametrize("published", SWEEP_RUNS, ids=[path.parent.name for path in SWEEP_RUNS])
def test_each_committed_sweep_is_a_clean_run_of_its_matrix_file_with_its_report(published):
    """results/published/real/quality/<sweep>/ holds runs of benchmarks/quality/<sweep>.toml,
    made from a committed tree, each with its report as this code renders it (the run's own, or
    rendered again from its JSON by ``pytest-lora report`` after the verdicts' wording changed):
    the verdicts quoted in the README come from it."""
    document = json.loads(published.read_text())
    assert f"--lora-matrix=benchmarks/quality/{published.parent.name}.toml" in document["run"]["argv"]
    assert document["run"]["status"] == "passed" and not document["run"]["git"]["dirty"]
    assert {record["suite"] for record in document["records"]} == {"quality"}
    assert published.with_suffix(".md").read_text(encoding="utf-8") == markdown.render_run(document)
