"""Quality: is a LoRA fine-tune on a quantized base as good as on a 16-bit one, and what do rank,
learning rate and the adapter's initialisation change?

The experiment, on a model that has learnt something (``quality_task``): the matrix's first
pretrained checkpoint (the registry's ``smollm2-135m``, a user's checkpoint or GGUF file), whose
old skill is CPython's reference prose and whose new one is zero-padded two-digit addition (exact
match on 192 held-out problems); otherwise the task model trained on Markov language A, whose new
skill is A's dialect B. Every config gets the same budget (``--lora-quality-steps``: 30 steps of
8 x 64 tokens on the task model, 20 of 4 x 64 on a pretrained one), the same batches per seed,
and AdamW at its learning rate. The default matrices give the suite a slice of their own
(``[cpu.quality]``: QLoRA's formats against bf16 at one LoRA spec).

Measured, against which reference:

* ``test_base_quality``, per format: the base's held-out loss on the old skill before any
  training, against the float32 base's (QLoRA Table 2: the formats' perplexities before
  fine-tuning, Int4 > FP4 > NF4+DQ);
* ``test_quality_lora``, per format x LoRA spec (rank, targets) x learning rate x init: the
  held-out loss, next-token accuracy and exact match on the new skill at five evaluation points
  (the learning curve, mean and spread over ``--lora-seeds``), the difference from the 16-bit
  LoRA reference paired by seed (bf16, the same spec and learning rate, peft's default init:
  QLoRA Table 4's comparison), the steps and training seconds to a target held-out loss (75% of
  the reference's improvement, ``--lora-quality-target``: MLPerf's time to quality), and where
  the adapter starts: the error of base + initial adapter against the float32 weights
  (``init_weight_error``) and its held-out loss on the old skill (LoftQ's and PiSSA's claim);
* ``test_quality_full_finetuning``, per ``--lora-full-learning-rates``: full fine-tuning of the
  float32 weights with the same budget, for LoRA Without Regret's learning-rate ratio.

Asserted: the float32 base is the model itself (its loss minus the float32 loss is 0), evaluation
points change no trainable weight or optimizer state, and training leaves the base's stored
tensors (its quantized storage) bitwise as they were: PiSSA and OLoRA change the base by design,
so what is compared for them is the stored residual, before and after training.
"""

from __future__ import annotations

import math

import pytest

from pytest_lora.lazy import lazy_import
from pytest_lora.specs import LOFTQ_FORMATS, QUANTIZATIONS, FineTuneSpec

peft = lazy_import("peft")
quality = lazy_import("pytest_lora.measure.quality")
tasks = lazy_import("pytest_lora.measure.tasks")
adapters = lazy_import("pytest_lora.models.adapters")

pytestmark = pytest.mark.lora_quality

REFERENCE = QUANTIZATIONS["bf16"]  # the papers' 16-bit LoRA
FLOAT32 = QUANTIZATIONS["fp32"]


class QualityRuns:
    """Every fine-tune of the session, run once: a config's runs are also another's reference."""

    def __init__(self, task, session, device: str):
        self.task, self.session, self.device = task, session, device
        self.seeds = range(int(session.settings["seeds"].value))
        self._runs: dict[tuple, list] = {}
        self._base: dict[str, tuple] = {}

    def lora(self, quant, lora_spec, fine_tune) -> list:
        key = (quant.id, lora_spec.id, fine_tune.id)
        if key not in self._runs:
            config = adapters.lora_config_for(lora_spec, self.task.config, quant)
            with self.session.progress(f"quality: {quant.id} {lora_spec.id} {fine_tune.id}, seed", len(self.seeds)) as progress:
                self._runs[key] = [self._run(quant, config, fine_tune, seed, progress) for seed in self.seeds]
        return self._runs[key]

    def _run(self, quant, config, fine_tune, seed, progress):
        task = self.task
        result = quality.run(task.config, task.state, quant, config, fine_tune.init, task.experiment, task.steps, fine_tune.lr, seed,
                             self.device)
        progress(seed + 1)
        return result

    def full(self, fine_tune) -> list:
        key = ("full", fine_tune.id)
        if key not in self._runs:
            task = self.task
            self._runs[key] = [quality.run_full(task.config, task.state, task.experiment, task.steps, fine_tune.lr, seed, self.device)
                               for seed in self.seeds]
        return self._runs[key]

    def base(self, quant) -> tuple:
        """Held-out (loss, accuracy) on the old skill and the new one of the base stored as ``quant``."""
        if quant.id not in self._base:
            model = quality.base_in_format(self.task.config, self.task.state, quant, self.device)
            experiment = self.task.experiment
            self._base[quant.id] = (*tasks.evaluate(model, experiment.forget_eval), tasks.evaluate(model, experiment.learn_eval)[0])
        return self._base[quant.id]


@pytest.fixture(scope="session")
def quality_runs(quality_task, lora_session, lora_device) -> QualityRuns:
    return QualityRuns(quality_task, lora_session, lora_device)


def describe(lora_bench, task, lora=None, fine_tune=None) -> None:
    workload = {"steps": task.steps, "batch": task.batch, "seq_len": task.seq_len}
    if fine_tune is not None:
        workload.update(fine_tune.as_record())
    lora_bench.describe(model=task.name, lora=lora, workload=workload)


def record_mean(lora_bench, metric: str, values: list[float], unit: str) -> None:
    """Mean and spread over the seeds, and each seed's value: at a short budget the seeds can part
    (some past a plateau of the loss, some not), which a mean and a spread alone hide."""
    mean, spread = quality.summary(values)
    lora_bench.record(metric, mean, unit)
    lora_bench.samples(metric, values)
    lora_bench.record(f"{metric}_std", spread, unit)


def record_curve(lora_bench, runs: list) -> None:
    """The learning curve: held-out loss at each evaluation point, mean and spread over seeds."""
    points = list(zip(*(run.curve for run in runs)))  # per evaluation point, one Point per seed
    lora_bench.record("curve_steps", runs[0].final.step, "steps")
    lora_bench.samples("curve_steps", [at[0].step for at in points])
    for metric, unit, read in (("curve_loss", "nats", lambda p: p.loss), ("curve_seconds", "s", lambda p: p.seconds)):
        means = [quality.summary([read(p) for p in at]) for at in points]
        lora_bench.record(metric, means[-1][0], unit)
        lora_bench.samples(metric, [mean for mean, _ in means])
        lora_bench.record(f"{metric}_std", means[-1][1], unit)
        lora_bench.samples(f"{metric}_std", [spread for _, spread in means])


def record_outcome(lora_bench, runs: list) -> None:
    """Where the fine-tune ended: held-out loss, accuracy and exact match, over seeds."""
    record_mean(lora_bench, "quality_loss", [run.final.loss for run in runs], "nats")
    record_mean(lora_bench, "quality_accuracy", [run.final.accuracy for run in runs], "fraction")
    if runs[0].final.exact is not None:
        record_mean(lora_bench, "quality_exact_match", [run.final.exact for run in runs], "fraction")
    lora_bench.record("quality_loss_before", runs[0].curve[0].loss, "nats")
    lora_bench.record("seeds", len(runs), "runs")
    record_curve(lora_bench, runs)
    lora_bench.check(all(run.evaluation_trains_nothing for run in runs), "an evaluation point changed a trainable weight or the optimizer")


def record_target(lora_bench, runs: list, reference: list, fraction: float) -> None:
    """Steps and training seconds to the target loss, over the seeds that reached it."""
    before, after = quality.summary([r.curve[0].loss for r in reference])[0], quality.summary([r.final.loss for r in reference])[0]
    target = quality.target_loss(before, after, fraction)
    if target is None:
        lora_bench.warn(f"no target loss: the 16-bit reference did not improve ({before:.4f} -> {after:.4f} nats)")
        return
    lora_bench.record("target_loss", target, "nats")
    reached = [point for point in (quality.time_to_target(run.curve, target) for run in runs) if point is not None]
    lora_bench.record("target_reached", len(reached), "runs")
    if reached:
        lora_bench.record("steps_to_target", quality.summary([p.step for p in reached])[0], "steps")
        lora_bench.record("seconds_to_target", quality.summary([p.seconds for p in reached])[0], "s")
    else:
        lora_bench.warn(f"no seed reached the target loss {target:.4f} within {runs[0].final.step} steps")


def test_base_quality(quality_task, quality_runs, quant_spec, lora_bench):
    """The base stored in each format, before any training, on the old skill and the new one."""
    describe(lora_bench, quality_task)
    loss_a, accuracy_a, loss_b = quality_runs.base(quant_spec)
    full_loss_a = quality_runs.base(FLOAT32)[0]
    lora_bench.record("base_loss_a", loss_a, "nats")
    lora_bench.record("base_accuracy_a", accuracy_a, "fraction")
    lora_bench.record("base_loss_a_minus_full", loss_a - full_loss_a, "nats")
    lora_bench.record("base_loss_b", loss_b, "nats")
    if quant_spec.id == FLOAT32.id:
        lora_bench.check(loss_a == full_loss_a, "the float32 base is not the model itself")


def test_quality_lora(quality_task, quality_runs, quant_spec, lora_spec, fine_tune_spec, lora_session, lora_bench):
    """LoRA on the new skill: the curve, the end, the paired difference from 16-bit LoRA, time to target."""
    if not fine_tune_spec.takes(quant_spec):
        pytest.skip(f"{fine_tune_spec.init} fits {' and '.join(LOFTQ_FORMATS)} only (its quantizer is NF4): not {quant_spec.id}")
    task = quality_task
    describe(lora_bench, task, fine_tune=fine_tune_spec)
    lora_bench.record("fine_tune_lr", fine_tune_spec.lr, "lr")
    runs = quality_runs.lora(quant_spec, lora_spec, fine_tune_spec)
    reference = quality_runs.lora(REFERENCE, lora_spec, FineTuneSpec(fine_tune_spec.lr))
    record_outcome(lora_bench, runs)
    record_mean(lora_bench, "init_weight_error", [run.init_weight_error for run in runs], "fraction")
    record_mean(lora_bench, "init_loss_a_minus_full", [run.init_loss_a - quality_runs.base(FLOAT32)[0] for run in runs], "nats")
    if runs is not reference:
        record_mean(lora_bench, "quality_minus_reference", [a.final.loss - b.final.loss for a, b in zip(runs, reference)], "nats")
    fraction = float(lora_session.settings["quality_target"].value or quality.TARGET_FRACTION)
    record_target(lora_bench, runs, reference, fraction)
    lora_bench.check(all(run.storage_unchanged for run in runs), "training changed the base's stored tensors")
    if any(math.isnan(run.final.loss) or run.final.loss > run.curve[0].loss for run in runs):
        lora_bench.warn("a seed's held-out loss went up (diverged): lower the learning rate")


def test_quality_full_finetuning(quality_task, quality_runs, full_fine_tune_spec, lora_bench):
    """Full fine-tuning of the float32 weights with the same budget: the learning-rate ratio's other side."""
    task = quality_task
    full = {"r": None, "alpha": None, "targets": "all parameters", "dropout": 0.0, "variant": "full fine-tuning", "bias": "all",
            "modules_to_save": []}
    describe(lora_bench, task, full, full_fine_tune_spec)
    lora_bench.record("fine_tune_lr", full_fine_tune_spec.lr, "lr")
    runs = quality_runs.full(full_fine_tune_spec)
    record_outcome(lora_bench, runs)
    if any(math.isnan(run.final.loss) or run.final.loss > run.curve[0].loss for run in runs):
        lora_bench.warn("a seed's held-out loss went up (diverged): not a best learning rate")
