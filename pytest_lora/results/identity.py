"""What a record is a measurement of: its config, by which it pairs with its baseline and its
shards, and the machine fields that make two runs' timings comparable."""

from __future__ import annotations

import json
from typing import Any

HARDWARE_FIELDS = ("device", "gpu_name", "cpu", "cpu_count")


def config_key(record: dict[str, Any]) -> tuple:
    """What pairs a record with its baseline: suite, test, model, quant, LoRA spec and workload."""
    def canonical(value: Any) -> str:
        return json.dumps(value, sort_keys=True)

    return (record.get("suite"), record.get("test"), record.get("model"), record.get("quant"),
            canonical(record.get("lora")), canonical(record.get("workload")))


def config_name(record: dict[str, Any]) -> str:
    """The config as a reader finds it: the test function and its parameters."""
    return str(record.get("test", "")).rsplit("::", 1)[-1]
