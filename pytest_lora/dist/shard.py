"""``--lora-shard=K/N``: this machine's share of the matrix, for a CI job matrix or a Slurm array.

Every machine collects the same tests and keeps shard K of N. The share is deterministic (it
depends on the collected tests only, never on the machine, time or order of arrival) and keeps
together the tests that share a base, so each base is built once across all shards:

- a test parametrized by a model and a quantization belongs to that base's group;
- any other test belongs to its module's group with its model, if any (the forgetting suite's
  trained model, the merge suite's trained task model, the published counts), since those share
  a session-scoped experiment.

Groups are weighed by an estimate of their work, parameters x tokens per test (parameters from
the config.json's sizes, tokens from the workload, a 512-token forward without one), and dealt
out heaviest first to the lightest shard (LPT scheduling), ties broken by name. ``pytest-lora
merge`` joins the shards' results into one run.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

FORWARD_TOKENS = 512  # the tokens of a test that runs the model without a training workload
NO_MODEL_COST = 1e6  # a test that builds no model of the matrix (published counts on the meta device)


def parse(setting: Any) -> tuple[int, int] | None:
    """``K/N`` as (K, N), 1 <= K <= N; ``None`` when unset; a usage error naming what is allowed."""
    if setting.value in (None, ""):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(setting.value))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise pytest.UsageError(f"{setting.describe()}: {setting.shown} is not a shard; allowed: K/N with 1 <= K <= N, e.g. 2/4")
    return int(match[1]), int(match[2])


def spec(item: Any, name: str) -> Any:
    """A test's matrix parameter, or ``None`` (also for an empty parametrization's NOTSET)."""
    value = getattr(getattr(item, "callspec", None), "params", {}).get(name)
    return value if hasattr(value, "id") or hasattr(value, "tokens") else None


def group_of(item: Any) -> str:
    """The name of the group a test runs in: its base, or its module (and model)."""
    model, quant = spec(item, "model_spec"), spec(item, "quant_spec")
    if model is not None and quant is not None:
        return f"base:{model.id}:{quant.id}"
    return f"module:{item.nodeid.split('::', 1)[0]}" + (f":{model.id}" if model is not None else "")


def cost_of(item: Any, sizes: dict[str, float]) -> float:
    """Parameters x tokens of one test: the estimate that balances the shards."""
    model, workload = spec(item, "model_spec"), spec(item, "workload_spec")
    if model is None:
        return NO_MODEL_COST
    if model.id not in sizes:
        sizes[model.id] = parameter_estimate(model.config_dict())
    return sizes[model.id] * (workload.tokens if workload is not None else FORWARD_TOKENS)


def parameter_estimate(config: dict[str, Any]) -> float:
    """A transformer's parameters from its config.json alone: attention 4h^2 and an MLP of 2 h x ff
    per layer (3 for a gated MLP: Llama-style ``intermediate_size``, T5's ``gated-`` projections),
    decoder and encoder layers both, and the embedding. Only the shards' balance uses it."""
    def first(*names: str, default: float = 0) -> float:
        return next((float(config[name]) for name in names if config.get(name)), default)

    hidden = first("hidden_size", "d_model", "n_embd", default=1)
    layers = first("num_hidden_layers", "num_layers", "n_layer", default=1) + first("num_decoder_layers")
    feed_forward = first("intermediate_size", "d_ff", "n_inner", "ffn_dim", default=4 * hidden)
    gated = "intermediate_size" in config or str(config.get("feed_forward_proj", "")).startswith("gated")
    return layers * (4 * hidden * hidden + (3 if gated else 2) * hidden * feed_forward) + first("vocab_size") * hidden


def assign(groups: dict[str, float], shards: int) -> dict[str, int]:
    """Each group's shard (0-based): heaviest group first, onto the shard with the least work."""
    load = [0.0] * shards
    placed = {}
    for name in sorted(groups, key=lambda name: (-groups[name], name)):
        shard = min(range(shards), key=lambda index: (load[index], index))
        placed[name] = shard
        load[shard] += groups[name]
    return placed


def select(items: list[Any], shard: int, shards: int) -> tuple[list[Any], list[Any]]:
    """The tests of shard ``shard`` (1-based) of ``shards``, and the others."""
    sizes: dict[str, float] = {}
    groups: dict[str, float] = {}
    names = [group_of(item) for item in items]
    for item, name in zip(items, names):
        groups[name] = groups.get(name, 0.0) + cost_of(item, sizes)
    placed = assign(groups, shards)
    kept = [item for item, name in zip(items, names) if placed[name] == shard - 1]
    return kept, [item for item, name in zip(items, names) if placed[name] != shard - 1]


class Sharding:
    """The plugin that keeps shard K of N, after every other selection (``-k``, ``-m``) so that
    the shards share out what would run."""

    def __init__(self, shard: int, shards: int):
        self.shard, self.shards = shard, shards

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[Any]) -> None:
        kept, dropped = select(items, self.shard, self.shards)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept

    def pytest_report_collectionfinish(self, config: pytest.Config, items: list[Any]) -> list[str]:
        return [f"lora: shard {self.shard}/{self.shards}: {len(items)} tests in {len({group_of(i) for i in items})} groups"]
