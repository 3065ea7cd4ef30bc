"""Forgetting: what a LoRA fine-tune costs the base model's old skills, next to full fine-tuning.

The experiment. A small model of a registry architecture is trained on language A until it has
learnt it: a first-order Markov chain over 256 tokens with four successors per token
(probabilities 0.55 / 0.25 / 0.15 / 0.05: entropy 1.11 nats, best accuracy 0.55, uniform guess
5.55 nats), made deterministically. It is then fine-tuned on language B, A's dialect (the same
successors, the most likely one rotated), once with LoRA for every rank and target set of the
matrix and once with full fine-tuning, on a matched budget: 60 AdamW steps of 16 x 64 tokens at
the same learning rate, from the same base weights. Full fine-tuning also runs at a learning
rate ten times lower, a second point on the learning / forgetting plane.

What is recorded, per method, over ``--lora-seeds`` seeds (default 3; seeds change the batches
and the adapter's initialisation), as mean and standard deviation:
``forgetting_delta_loss`` (held-out loss on A after minus before), ``learning_delta_loss`` (held-out
loss on B before minus after), accuracies after, and for LoRA the paired difference to full
fine-tuning at the same learning rate (``forgetting_minus_full``, ``learning_minus_full``), the
data of Biderman et al.'s Pareto plot. The loss is shifted (position t predicts t + 1) and
"before" is the base without an adapter, the two traps peft #3419 found.

Asserted: the base has learnt A, disabling the adapter gives back the base's logits exactly, and
the frozen base weights are bitwise unchanged after LoRA training.

Own data: ``--lora-models=CHECKPOINT --lora-forget-data=A.txt --lora-learn-data=B.jsonl`` runs
the same comparison on a local checkpoint, tokenised with its tokenizer.
"""

from __future__ import annotations

import pytest

from pytest_lora.lazy import lazy_import

peft = lazy_import("peft")
forgetting = lazy_import("pytest_lora.measure.forgetting")


pytestmark = pytest.mark.lora_forgetting

STEPS = 60
LEARNING_RATE = 1e-3
LOWER_LEARNING_RATE = 1e-4


def seeds(lora_session) -> range:
    return range(int(lora_session.settings["seeds"].value))


def record_outcomes(lora_bench, outcomes: list[forgetting.Outcome]) -> None:
    for metric, unit, values in (
        ("forgetting_delta_loss", "nats", [o.forgetting for o in outcomes]),
        ("learning_delta_loss", "nats", [o.learning for o in outcomes]),
        ("forget_accuracy_after", "fraction", [o.forget_accuracy_after for o in outcomes]),
        ("learn_accuracy_after", "fraction", [o.learn_accuracy_after for o in outcomes]),
    ):
        mean, spread = forgetting.summary(values)
        lora_bench.record(metric, mean, unit)
        lora_bench.record(f"{metric}_std", spread, unit)
    lora_bench.record("seeds", len(outcomes), "runs")


@pytest.fixture(scope="module")
def full_finetuning(forgetting_experiment, lora_session, lora_device):
    """Full fine-tuning outcomes per learning rate and seed, shared by every test of the module."""
    runs = [(lr, seed) for lr in (LEARNING_RATE, LOWER_LEARNING_RATE) for seed in seeds(lora_session)]
    outcomes: dict[float, list] = {LEARNING_RATE: [], LOWER_LEARNING_RATE: []}
    with lora_session.progress("full fine-tuning run", len(runs)) as progress:
        for done, (lr, seed) in enumerate(runs, 1):
            outcomes[lr].append(forgetting.run_full(forgetting_experiment, seed, STEPS, lr, lora_device))
            progress(done)
    return outcomes


def test_the_base_has_learnt_task_a(forgetting_experiment, lora_bench):
    """Before anything is fine-tuned: the base's held-out loss on A against the chain's entropy."""
    forget_before, learn_before = forgetting.baseline_of(forgetting_experiment)
    lora_bench.describe(model=forgetting_experiment.name)
    lora_bench.record("loss_a_before", forget_before, "nats")
    lora_bench.record("loss_b_before", learn_before, "nats")
    facts = forgetting_experiment.facts
    if "entropy" in facts:
        lora_bench.record("entropy_a", facts["entropy"], "nats")
        lora_bench.record("uniform_loss", facts["uniform_loss"], "nats")
        assert forget_before < facts["entropy"] + 0.25 * (facts["uniform_loss"] - facts["entropy"]), "the base has not learnt task A"


def test_forgetting_lora(forgetting_experiment, lora_spec, full_finetuning, lora_session, lora_device, lora_bench):
    """LoRA on B for each rank and target set (learning rate 1e-3); the base underneath must stay the base."""
    config = peft.LoraConfig(**lora_spec.peft_kwargs(), task_type="CAUSAL_LM")
    lora_bench.describe(model=forgetting_experiment.name)
    runs = []
    with lora_session.progress("LoRA fine-tuning seed", len(seeds(lora_session))) as progress:
        for seed in seeds(lora_session):
            runs.append(forgetting.run_lora(forgetting_experiment, config, seed, STEPS, LEARNING_RATE, lora_device))
            progress(len(runs))
    outcomes = [run.outcome for run in runs]
    record_outcomes(lora_bench, outcomes)
    full = full_finetuning[LEARNING_RATE]
    for metric, mine, theirs in (
        ("forgetting_minus_full", [o.forgetting for o in outcomes], [o.forgetting for o in full]),
        ("learning_minus_full", [o.learning for o in outcomes], [o.learning for o in full]),
    ):
        mean, spread = forgetting.summary([a - b for a, b in zip(mine, theirs)])
        lora_bench.record(metric, mean, "nats")
        lora_bench.record(f"{metric}_std", spread, "nats")
    assert all(run.adapter_off_is_base for run in runs), "disabling the adapter did not give back the base"
    assert all(run.base_unchanged for run in runs), "LoRA training changed a frozen base weight"


@pytest.mark.parametrize("lr", [LEARNING_RATE, LOWER_LEARNING_RATE], ids=["lr1e-3", "lr1e-4"])
def test_forgetting_full_finetuning(forgetting_experiment, full_finetuning, lr, lora_bench):
    """Full fine-tuning with the same budget, at the LoRA runs' learning rate and ten times lower."""
    full = {"r": None, "alpha": None, "targets": "all parameters", "dropout": 0.0, "variant": f"full fine-tuning, lr {lr:g}", "bias": "all", "modules_to_save": []}
    lora_bench.describe(model=forgetting_experiment.name, lora=full)
    record_outcomes(lora_bench, full_finetuning[lr])
