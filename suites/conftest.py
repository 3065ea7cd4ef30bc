"""Fixtures shared by the suites: a small model that has really learnt a synthetic language, and
the forgetting experiment built on it (or on the user's own checkpoint and data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

# A registry architecture small enough to train to competence in seconds: tiny on the CPU, the
# real OPT-125M shape on a GPU.
TASK_MODELS = {"cpu": "llama-3.2-1b-tiny", "cuda": "opt-125m"}
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
