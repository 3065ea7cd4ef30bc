"""Forgetting: what a LoRA fine-tune costs the base model's old skills, next to full fine-tuning.

The experiment, on one of three bases:

* a pretrained checkpoint of the matrix that has a tokenizer (the registry's ``smollm2-135m``, a
  user's checkpoint or GGUF file): its old skill is English prose about programming, CPython's
  own reference text (``pydoc_data``), its new one zero-padded two-digit addition, whose learning
  also reads as exact-match accuracy on 192 held-out problems (``measure.texts``); 20 steps of
  4 x 64 tokens, LoRA at 1e-3, full fine-tuning at 1e-4 and 1e-5;
* the user's own data (``--lora-forget-data``, ``--lora-learn-data``) on their checkpoint;
* otherwise, a small model of a registry architecture trained on language A until it has learnt
  it: a first-order Markov chain over 256 tokens with four successors per token (probabilities
  0.55 / 0.25 / 0.15 / 0.05: entropy 1.11 nats, best accuracy 0.55, uniform guess 5.55 nats), made
  deterministically, then fine-tuned on language B, A's dialect (the same successors, the most
  likely one rotated); 60 steps of 16 x 64 tokens, LoRA and full fine-tuning at 1e-3, full
  fine-tuning also at 1e-4.

LoRA runs for every rank and target set of the matrix, full fine-tuning at two learning rates,
on a matched budget (the same steps, batches and optimizer, from the same base weights). The
budget and sizes are options: ``--lora-forget-steps``, ``--lora-forget-batch``,
``--lora-forget-block`` (tokens a sequence), ``--lora-forget-lr`` (LoRA's) and
``--lora-forget-full-lrs`` (full fine-tuning's two, higher first).

What is recorded, per method, over ``--lora-seeds`` seeds (default 3; seeds change the batches
and the adapter's initialisation), as mean and standard deviation:
``forgetting_delta_loss`` (held-out loss on A after minus before), ``learning_delta_loss`` (held-out
loss on B before minus after), accuracies after (on the addition task, exact match too), and for
LoRA the paired difference to full fine-tuning (``forgetting_minus_full``, ``learning_minus_full``),
the data of Biderman et al.'s Pareto plot. The reference is full fine-tuning at the learning rate
that learnt most without any seed diverging (loss up on the new task); a diverged run is flagged
(``diverged``) and never a reference. The loss is shifted (position t predicts t + 1) and "before"
is the base without an adapter, the two traps peft #3419 found.

Asserted: the base has learnt A (its loss well under a uniform guess's), disabling the adapter
gives back the base's logits exactly, and the frozen base weights are bitwise unchanged after
LoRA training.
"""

from __future__ import annotations

import pytest

from pytest_lora.lazy import lazy_import

peft = lazy_import("peft")
forgetting = lazy_import("pytest_lora.measure.forgetting")


pytestmark = pytest.mark.lora_forgetting

LEARNING_RATES = ("higher", "lower")  # full fine-tuning's two learning rates, the experiment's (full_lrs)


def seeds(lora_session) -> range:
    return range(int(lora_session.settings["seeds"].value))


def record_outcomes(lora_bench, outcomes: list[forgetting.Outcome]) -> None:
    measured = [
        ("forgetting_delta_loss", "nats", [o.forgetting for o in outcomes]),
        ("learning_delta_loss", "nats", [o.learning for o in outcomes]),
        ("forget_accuracy_after", "fraction", [o.forget_accuracy_after for o in outcomes]),
        ("learn_accuracy_after", "fraction", [o.learn_accuracy_after for o in outcomes]),
    ]
    if outcomes and outcomes[0].learn_exact_after is not None:
        measured.append(("learn_exact_match_after", "fraction", [o.learn_exact_after for o in outcomes]))
    for metric, unit, values in measured:
        mean, spread = forgetting.summary(values)
        lora_bench.record(metric, mean, unit)
        lora_bench.record(f"{metric}_std", spread, unit)
    lora_bench.record("seeds", len(outcomes), "runs")
    diverged = sum(o.diverged for o in outcomes)
    lora_bench.record("diverged", diverged, "runs")
    if diverged:
        lora_bench.warn(f"{diverged} of {len(outcomes)} seeds diverged (held-out loss on the new task went up): not a reference")


@pytest.fixture(scope="module")
def full_finetuning(forgetting_experiment, lora_session, lora_device):
    """Full fine-tuning outcomes per learning rate and seed, shared by every test of the module."""
    experiment = forgetting_experiment
    runs = [(lr, seed) for lr in experiment.full_lrs for seed in seeds(lora_session)]
    outcomes: dict[float, list] = {lr: [] for lr in experiment.full_lrs}
    with lora_session.progress("full fine-tuning run", len(runs)) as progress:
        for done, (lr, seed) in enumerate(runs, 1):
            outcomes[lr].append(forgetting.run_full(experiment, seed, experiment.steps, lr, lora_device))
            progress(done)
    return outcomes


def test_the_base_has_learnt_task_a(forgetting_experiment, lora_bench):
    """Before anything is fine-tuned: the base's held-out loss on A against the chain's entropy,
    or for a pretrained base against a uniform guess over its vocabulary."""
    forget_before, learn_before = forgetting.baseline_of(forgetting_experiment)
    lora_bench.describe(model=forgetting_experiment.name)
    lora_bench.record("loss_a_before", forget_before, "nats")
    lora_bench.record("loss_b_before", learn_before, "nats")
    if forgetting_experiment.exact_before is not None:
        lora_bench.record("learn_exact_match_before", forgetting_experiment.exact_before, "fraction")
    facts = forgetting_experiment.facts
    if "entropy" in facts:
        lora_bench.record("entropy_a", facts["entropy"], "nats")
    if "uniform_loss" in facts:
        lora_bench.record("uniform_loss", facts["uniform_loss"], "nats")
        floor = facts.get("entropy", 0.0)  # a pretrained model's text has no known entropy: half a uniform guess is far from learnt
        share = 0.25 if "entropy" in facts else 0.5
        assert forget_before < floor + share * (facts["uniform_loss"] - floor), "the base has not learnt task A"


def test_forgetting_lora(forgetting_experiment, lora_spec, full_finetuning, lora_session, lora_device, lora_bench):
    """LoRA on B for each rank and target set; the base underneath must stay the base."""
    experiment = forgetting_experiment
    config = peft.LoraConfig(**lora_spec.peft_kwargs(), task_type="CAUSAL_LM")
    lora_bench.describe(model=experiment.name)
    lora_bench.record("fine_tune_lr", experiment.lora_lr, "lr")
    lora_bench.record("fine_tune_steps", experiment.steps, "steps")
    runs = []
    with lora_session.progress("LoRA fine-tuning seed", len(seeds(lora_session))) as progress:
        for seed in seeds(lora_session):
            runs.append(forgetting.run_lora(experiment, config, seed, experiment.steps, experiment.lora_lr, lora_device))
            progress(len(runs))
    outcomes = [run.outcome for run in runs]
    record_outcomes(lora_bench, outcomes)
    reference = forgetting.reference_lr(full_finetuning)
    if reference is None:
        lora_bench.warn("every learning rate of full fine-tuning diverged: no forgetting_minus_full / learning_minus_full")
    else:
        lora_bench.record("full_reference_lr", reference, "lr")
        full = full_finetuning[reference]
        for metric, mine, theirs in (
            ("forgetting_minus_full", [o.forgetting for o in outcomes], [o.forgetting for o in full]),
            ("learning_minus_full", [o.learning for o in outcomes], [o.learning for o in full]),
        ):
            mean, spread = forgetting.summary([a - b for a, b in zip(mine, theirs)])
            lora_bench.record(metric, mean, "nats")
            lora_bench.record(f"{metric}_std", spread, "nats")
    assert all(run.adapter_off_is_base for run in runs), "disabling the adapter did not give back the base"
    assert all(run.base_unchanged for run in runs), "LoRA training changed a frozen base weight"


@pytest.mark.parametrize("rate", LEARNING_RATES, ids=[f"lr-{rate}" for rate in LEARNING_RATES])
def test_forgetting_full_finetuning(forgetting_experiment, full_finetuning, rate, lora_bench):
    """Full fine-tuning with the same budget, at the experiment's two learning rates."""
    lr = forgetting_experiment.full_lrs[LEARNING_RATES.index(rate)]
    full = {"r": None, "alpha": None, "targets": "all parameters", "dropout": 0.0, "variant": f"full fine-tuning, lr {lr:g}", "bias": "all", "modules_to_save": []}
    lora_bench.describe(model=forgetting_experiment.name, lora=full)
    lora_bench.record("fine_tune_lr", lr, "lr")
    lora_bench.record("fine_tune_steps", forgetting_experiment.steps, "steps")
    record_outcomes(lora_bench, full_finetuning[lr])
