"""The forgetting experiment's own data (``--lora-forget-data``, ``--lora-learn-data``), checked
before any test runs: the files go with one local checkpoint of the matrix, whose tokenizer reads
them, and they must hold enough text for the experiment's blocks."""

from __future__ import annotations

from typing import Any

import pytest

from .matrix import Matrix
from .models import registry


def checkpoint(settings: dict[str, Any], matrix: Matrix) -> str | None:
    """The checkpoint the user's forget / learn data go with (``None`` for the synthetic tasks)."""
    if not settings["forget_data"].value:
        return None
    checkpoints = [m for m in matrix.models if m.kind == "checkpoint"]
    if len(checkpoints) != 1:
        setting = settings["forget_data"]
        raise pytest.UsageError(f"{setting.describe()}: the data need one local checkpoint in --lora-models (its tokenizer "
                                f"reads them); found {len(checkpoints)}; allowed: exactly one checkpoint directory")
    return checkpoints[0].path


# The forgetting and quality suites' task model without a pretrained checkpoint: a registry
# architecture small enough to train to competence in seconds, tiny on the CPU, the real OPT-125M
# shape on a GPU.
TASK_MODELS = {"cpu": "llama-3.2-1b-tiny", "cuda": "opt-125m"}


def quality_model(matrix: Matrix, device_kind: str) -> Any:
    """The model the quality suite fine-tunes (a ``ModelSpec``): the matrix's first pretrained
    checkpoint, else the task model's architecture."""
    from .models.resolve import resolve_model

    return pretrained_checkpoint(matrix) or resolve_model(TASK_MODELS[device_kind], "the quality suite's task model")


def pretrained_checkpoint(matrix: Matrix) -> Any:
    """The first checkpoint of the matrix that has a tokenizer: a model that can read real text
    (the forgetting suite's old and new skills, ``measure.texts``), or ``None``."""
    for model in matrix.models:
        if model.kind == "checkpoint" and registry.has_tokenizer(model.path):
            return model
    return None


def experiment_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The forgetting experiment's sizes and learning rates the user set (``--lora-forget-*``),
    by the names ``measure.forgetting`` takes them; what is unset keeps the experiment's default."""
    chosen: dict[str, Any] = {}
    for option, name, parse in (("forget_steps", "steps", int), ("forget_batch", "batch", int), ("forget_block", "seq_len", int),
                                ("forget_lr", "lora_lr", float),
                                ("forget_full_lrs", "full_lrs", lambda text: tuple(float(part) for part in str(text).split(",")))):
        if settings[option].value is not None:
            chosen[name] = parse(settings[option].value)
    return chosen


def check(settings: dict[str, Any], matrix: Matrix) -> None:
    """The forget and learn files, read and tokenised as the experiment will: an empty, binary
    or too short file, or JSONL without ``text``, is a usage error before any test runs."""
    found = checkpoint(settings, matrix)
    if found is None:
        return
    from .measure import forgetting

    forget, learn = settings["forget_data"], settings["learn_data"]
    seq_len = experiment_options(settings).get("seq_len", forgetting.DATA_SEQ_LEN)
    try:
        forgetting.data_blocks(found, forget.path(), learn.path(), seq_len)
    except forgetting.DataProblem as problem:
        setting, need = (forget, "one block") if problem.path == forget.path() else \
            (learn, f"{forgetting.LEARN_BLOCKS} blocks (one held out, one to train on)")
        raise pytest.UsageError(f"{setting.describe()}: {setting.shown} {problem}; allowed: UTF-8 text or JSONL with a "
                                f"\"text\" field, at least {need} of {seq_len} tokens") from None
