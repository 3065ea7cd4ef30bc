"""Fixtures shared by the suites: a small model that has really learnt a synthetic language."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class TrainedModel:
    """A tiny Llama trained on task A: its architecture, float32 weights (on the CPU) and the tasks."""

    config: dict[str, Any]
    state: dict[str, Any]
    task_a: Any
    task_b: Any
    losses: list[float]


@pytest.fixture(scope="session")
def trained_task_model(lora_device: str) -> TrainedModel:
    """``llama-3.2-1b-tiny`` trained for 300 steps on Markov language A (batch 16 x 64 tokens);
    task B is A's dialect (the same successors, the most likely one rotated)."""
    import torch

    from pytest_lora.measure import tasks
    from pytest_lora.models import build, registry

    config = registry.load_config_dict("llama-3.2-1b-tiny")
    torch.manual_seed(build.seed_for("trained_task_model"))
    model = build.instantiate(config, lora_device, torch.float32)
    task_a = tasks.MarkovTask("A", config["vocab_size"], seed=1)
    task_b = tasks.MarkovTask("B", config["vocab_size"], seed=1, rotation=1)  # A's dialect
    losses = tasks.train(model, task_a, 300, lr=3e-3, batch=16, seq_len=64, seed=0, device=lora_device)
    state = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    return TrainedModel(config, state, task_a, task_b, losses)
