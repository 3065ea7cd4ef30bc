"""Fixtures shared by the suites: a small model that has really learnt a synthetic language, the
forgetting experiment built on it (or on the user's own checkpoint and data), and the fine-tuned
adapter the trained-model merge is measured on (on the matrix's pretrained checkpoint when it has
one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest

from pytest_lora.data import TASK_MODELS

TASK_VOCAB = 256
PRETRAIN_STEPS = {"cpu": 300, "cuda": 600}


@dataclass(frozen=True)
class TrainedModel:
    """A model trained on task A: its name, architecture, float32 weights (on the CPU) and the tasks."""

    name: str
    config: dict[str, Any]
    state: dict[str, Any]
    task_a: Any
    task_b: Any
    losses: list[float]


@pytest.fixture(autouse=True)
def seeded_by_test_id(request) -> None:
    """Every suite test starts from torch's global generator seeded by its id, so what it draws
    without a generator of its own (peft's initialisation of lora_A, ...) is the same whatever ran
    before it in the process: in a serial run, an xdist worker or a shard."""
    import torch

    from pytest_lora.models import build

    torch.manual_seed(build.seed_for(request.node.nodeid))


@pytest.fixture(scope="session")
def trained_task_model(lora_session, lora_device: str) -> TrainedModel:
    """The task model trained on Markov language A (batch 16 x 64 tokens, AdamW 3e-3); task B is
    A's dialect (the same successors, the most likely one rotated)."""
    import torch

    from pytest_lora.measure import tasks
    from pytest_lora.models import build, registry

    name = TASK_MODELS[lora_session.device_kind]
    config = registry.load_config_dict(name)
    vocab = min(TASK_VOCAB, config["vocab_size"])
    torch.manual_seed(build.seed_for("trained_task_model", name))
    model = build.instantiate(config, lora_device, torch.float32)
    task_a = tasks.MarkovTask("A", vocab, seed=1)
    task_b = tasks.MarkovTask("B", vocab, seed=1, rotation=1)
    steps = PRETRAIN_STEPS[lora_session.device_kind]
    with lora_session.progress("training the task model on language A, step", steps) as progress:
        losses = tasks.train(model, task_a.sampler(16, 64), steps, lr=3e-3, seed=0, device=lora_device, on_step=progress)
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    return TrainedModel(f"{name} (trained on A)", config, state, task_a, task_b, losses)


@pytest.fixture(scope="session")
def forgetting_experiment(lora_session, lora_device: str, request):
    """The user's checkpoint and data when --lora-forget-data / --lora-learn-data are given, else
    real text on the matrix's first pretrained checkpoint (one with a tokenizer), else the
    synthetic experiment on the trained task model."""
    from pytest_lora.measure import forgetting

    options = lora_session.forgetting_options()  # --lora-forget-steps, -batch, -block, -lr, -full-lrs
    sizes = {name: options[name] for name in ("batch", "seq_len") if name in options}
    checkpoint = lora_session.data_checkpoint()
    pretrained = lora_session.pretrained_checkpoint()
    if checkpoint is not None:
        forget, learn = lora_session.path_setting("forget_data"), lora_session.path_setting("learn_data")
        experiment = forgetting.data_experiment(checkpoint, forget, learn, lora_device, **sizes)
    elif pretrained is not None:  # a model that has learnt language: real text, not the synthetic languages
        experiment = forgetting.real_text_experiment(pretrained.path, lora_device, pretrained.id, **sizes)
    else:
        trained = request.getfixturevalue("trained_task_model")
        experiment = forgetting.synthetic_experiment(trained.config, trained.state, trained.task_a, trained.task_b, lora_device, **sizes)
        experiment.name = trained.name
    return forgetting.with_budget(experiment, **{name: options[name] for name in ("steps", "lora_lr", "full_lrs") if name in options})


# The trained-model merge: an all-linear adapter fine-tuned on a task the model does not know.
MERGE_LORA = {"r": 8, "alpha": 16, "targets": "all-linear"}
MERGE_LR = 1e-3
SYNTHETIC_MERGE_STEPS, SYNTHETIC_MERGE_BATCH = 60, (16, 64)  # on each format's base, as QLoRA trains
PRETRAINED_MERGE_STEPS, PRETRAINED_MERGE_BATCH = 20, 8  # once, on the checkpoint's float32 weights: 1.3 s a step here
EVAL_BLOCKS = 16  # held-out blocks of the fine-tuning task the merges are compared on


def merge_lora() -> Any:
    from pytest_lora.specs import LoraSpec

    return LoraSpec(**MERGE_LORA)


@dataclass(frozen=True)
class MergeTask:
    """What ``test_merge_on_a_trained_model`` merges: a model whose logits mean something, a LoRA
    adapter fine-tuned on a task it did not know, and that task's held-out blocks.

    ``base(quant)`` is the model's weights stored as ``quant``; ``adapted(base, lora_config)`` puts
    the fine-tuned adapter on it, trained there (``trained_on_each_base``: QLoRA's way) or trained
    once in float32 and loaded. ``base_loss`` is the full-precision model's loss on ``eval_ids``
    before fine-tuning; ``exact_match(logits, ids)`` reads the task as answers, where it has them
    (``base_exact``: the base's, before fine-tuning).
    """

    name: str
    config: dict[str, Any]
    lora: Any  # the adapter's LoraSpec
    base: Callable[[Any], Any]
    adapted: Callable[[Any, Any], Any]
    eval_ids: Any
    base_loss: float
    trained_on_each_base: bool
    exact_match: Callable[[Any, Any], float] | None = None
    base_exact: float | None = None


@pytest.fixture(scope="session")
def merge_task(lora_session, lora_device: str, request) -> MergeTask:
    """The matrix's first pretrained checkpoint (the user's model first), fine-tuned on two-digit
    addition; else the synthetic task model, fine-tuned on its second language."""
    pretrained = lora_session.pretrained_checkpoint()
    if pretrained is not None:
        return pretrained_merge_task(lora_session, pretrained, lora_device)
    return synthetic_merge_task(request.getfixturevalue("trained_task_model"), lora_device)


def synthetic_merge_task(trained: TrainedModel, device: str) -> MergeTask:
    """The task model trained on language A; each format's base gets its own adapter, trained on B."""
    import peft
    import torch

    from pytest_lora.measure import tasks
    from pytest_lora.models import build, quantize

    def base(quant) -> Any:  # quantized in place from the trained weights
        dtype = getattr(torch, quant.dtype) if quant.dtype else torch.float32
        model = build.instantiate(trained.config, device, dtype)
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in trained.state.items()})
        return quantize.quantize_model(model, quant) if quant.is_quantized else model

    def adapted(model: Any, lora_config: Any) -> Any:
        model = peft.get_peft_model(model, lora_config)
        tasks.train(model, trained.task_b.sampler(*SYNTHETIC_MERGE_BATCH), SYNTHETIC_MERGE_STEPS, lr=MERGE_LR, seed=1, device=device)
        return model

    ids = trained.task_b.sample(EVAL_BLOCKS, 64, torch.Generator().manual_seed(7)).to(device)
    full = build.instantiate(trained.config, device, torch.float32)
    full.load_state_dict(trained.state)
    return MergeTask(trained.name, trained.config, merge_lora(), base, adapted, ids, tasks.evaluate(full.eval(), ids)[0], True)


def pretrained_merge_task(lora_session, pretrained: Any, device: str) -> MergeTask:
    """The checkpoint fine-tuned with LoRA on addition once, on its float32 weights; each format's
    base gets that adapter's tensors. What is measured is what each merge keeps of one trained
    update; how QLoRA's training differs per base is the forgetting suite's question."""
    import peft
    import torch

    from pytest_lora.measure import forgetting, tasks
    from pytest_lora.models import adapters, build
    experiment = forgetting.real_text_experiment(pretrained.path, device, pretrained.id, batch=PRETRAINED_MERGE_BATCH)
    ids = experiment.learn_eval[:EVAL_BLOCKS]
    model = experiment.make_base().eval()
    base_loss, _, base_exact = tasks.evaluate(model, ids, experiment.exact_match, with_exact=True)
    torch.manual_seed(build.seed_for("merge_task", pretrained.id))  # lora_A's initialisation
    model = peft.get_peft_model(model, adapters.lora_config_for(merge_lora(), pretrained.config_dict()))
    with lora_session.progress(f"fine-tuning {pretrained.id} on addition for the trained merge, step", PRETRAINED_MERGE_STEPS) as progress:
        tasks.train(model, experiment.learn_batches, PRETRAINED_MERGE_STEPS, lr=MERGE_LR, seed=1, device=device, on_step=progress)
    adapter = {key: value.detach().clone() for key, value in peft.get_peft_model_state_dict(model).items()}
    del model

    def adapted(base: Any, lora_config: Any) -> Any:
        model = peft.get_peft_model(base, lora_config)
        loaded = peft.set_peft_model_state_dict(model, adapter)
        own = set(peft.get_peft_model_state_dict(model))
        if loaded.unexpected_keys or own != set(adapter):
            raise RuntimeError(f"the fine-tuned adapter does not fit this base: {sorted(own ^ set(adapter))[:3]}")
        return model

    return MergeTask(f"{pretrained.id} (LoRA on addition)", pretrained.config_dict(), merge_lora(), lambda quant: build.build_base(pretrained, quant, device),
                     adapted, ids, base_loss, False, experiment.exact_match, base_exact)


# --------------------------------------------------------------------------- the quality suite

QUALITY_STEPS = {"synthetic": 30, "pretrained": 20}  # the default budget of a quality run (--lora-quality-steps)
QUALITY_BATCH = (8, 64)  # sequences x tokens of a step on the task model


@dataclass(frozen=True)
class QualityTask:
    """What the quality suite fine-tunes: a model that has learnt something (its float32 weights
    and config), its old skill and a new one (a ``forgetting.Experiment``: held-out sets and
    training batches), and the budget of steps every config gets."""

    name: str
    config: dict[str, Any]
    state: dict[str, Any]
    experiment: Any
    steps: int
    batch: int
    seq_len: int


@pytest.fixture(scope="session")
def quality_task(lora_session, lora_device: str, request) -> QualityTask:
    """The matrix's first pretrained checkpoint (CPython's prose known, addition to learn), else
    the task model trained on Markov language A, to learn its dialect B."""
    from pytest_lora.measure import forgetting

    steps = lora_session.settings["quality_steps"].value
    pretrained = lora_session.pretrained_checkpoint()
    if pretrained is not None:
        experiment = forgetting.real_text_experiment(pretrained.path, lora_device, pretrained.id)
        state = {key: value.detach().cpu().clone() for key, value in experiment.make_base().state_dict().items()}
        return QualityTask(pretrained.id, pretrained.config_dict(), state, experiment, int(steps or QUALITY_STEPS["pretrained"]),
                           forgetting.REAL_BATCH, forgetting.REAL_SEQ_LEN)
    trained = request.getfixturevalue("trained_task_model")
    experiment = forgetting.synthetic_experiment(trained.config, trained.state, trained.task_a, trained.task_b, lora_device,
                                                 *QUALITY_BATCH)
    return QualityTask(trained.name, trained.config, trained.state, experiment, int(steps or QUALITY_STEPS["synthetic"]),
                       *QUALITY_BATCH)
