"""``--lora-confirm``: run the configs whose timing regressed once more, and believe it only if
the regression holds again.

On a shared machine a slow stretch lasts seconds: it slows every config that runs meanwhile,
which are the configs of one base (pytest runs them one after the other), and a rerun right
after them shares it. So the reruns wait until every test has run, and go through pytest's
own runner (``runtestprotocol``, as pytest-rerunfailures uses it) in the session's order, so
each base they need is built once more for all of its reruns. A rerun is not logged as a
second test: its record goes into the first run's record as ``confirmation``, and the gate
counts a timing regression only if the rerun regresses too. Counts, memory and correctness
repeat exactly, so they are never rerun.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..results.recorder import timed_while_busy

FIRST_RUN_KEY = pytest.StashKey[dict]()


def rerun_regressed(items: list[pytest.Item], lora: Any) -> list[pytest.Item]:
    """Rerun, in order, every item whose record has a timing regression; the items rerun."""
    from ..keys import RECORD_KEY

    regressed = [item for item in items if RECORD_KEY in item.stash and lora.gate.needs_rerun(item.stash[RECORD_KEY], lora.machine)]
    for index, item in enumerate(regressed):
        rerun(item, regressed[index + 1] if index + 1 < len(regressed) else None, item.stash[RECORD_KEY])
    lora.run.reruns = len(regressed)
    return regressed


def rerun(item: pytest.Item, nextitem: pytest.Item | None, record: dict[str, Any]) -> None:
    """Run ``item`` again without logging it; its record becomes ``record``'s confirmation."""
    from _pytest.runner import runtestprotocol

    item.stash[FIRST_RUN_KEY] = record
    benchmarks = getattr(getattr(item.config, "_benchmarksession", None), "benchmarks", None)
    kept = len(benchmarks) if benchmarks is not None else 0
    try:
        runtestprotocol(item, log=False, nextitem=nextitem)
    finally:
        del item.stash[FIRST_RUN_KEY]
        if benchmarks is not None:
            del benchmarks[kept:]  # pytest-benchmark's table and JSON keep one entry per test


def first_run(item: pytest.Item) -> dict[str, Any] | None:
    """The first run's record while ``item`` is being rerun, else ``None``."""
    return item.stash.get(FIRST_RUN_KEY, None)


def confirmation_of(record: dict[str, Any]) -> dict[str, Any]:
    """What the gate reads of a rerun: its status, metrics and samples, and whether it was timed
    on a busy machine (said always: the gate reads the rerun over the first run's record)."""
    return {**{key: record.get(key) for key in ("status", "metrics", "samples", "error", "warnings")}, "busy": timed_while_busy(record)}
