"""The hooks of an xdist run that pytest-lora implements: how many workers ``-n auto`` starts,
what each worker is handed (its journal, its GPUs), how the bench schedules each base's tests on
one worker, and how the controller takes in its workers' records, their failures and their
crashes (``journal``, ``workers``, ``scheduling``). Registered by ``plugin``."""

from __future__ import annotations

from typing import Any

import pytest

from . import journal, workers
from .. import options
from ..keys import SESSION_KEY


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` under ``--lora-bench`` with GPUs: one worker per GPU (``workers``)."""
    return workers.auto_workers(options.resolve(config))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: hand each worker its journal and the GPUs it owns (``workers``)."""
    lora = node.config.stash[SESSION_KEY]
    node.workerinput[journal.WORKER_JOURNAL] = str(lora.run.collector().expect(node.gateway.id))
    if lora.bench and str(lora.settings["device"].value).lower() != "cpu":
        device = workers.worker_device(node.gateway.id, lora.visible_devices(), lora.gpus_per_worker)
        if device is not None:
            node.workerinput[workers.WORKER_DEVICE] = device


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist controller: under the bench, ``--dist loadgroup`` keeps each base's tests on one worker."""
    lora = config.stash[SESSION_KEY]
    if lora.bench and config.getvalue("dist") == "loadgroup":
        from .scheduling import BaseScheduling

        return BaseScheduling(config, log, lora.run.test_groups)
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """xdist controller: a worker's records join the run as it reports its tests (``journal``)."""
    node = getattr(report, "node", None)
    if node is not None and report.when == "teardown":
        node.config.stash[SESSION_KEY].run.collect(node.gateway.id)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: a worker went down; the rest of its journal joins the run."""
    lora = node.config.stash[SESSION_KEY]
    if error is not None:
        lora.run.worker_errors[node.gateway.id] = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    lora.run.collect(node.gateway.id)


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched: Any) -> None:
    """xdist controller: the test a worker died in becomes an ``error`` record that says so."""
    report.node.config.stash[SESSION_KEY].run.worker_crashed(report.node.gateway.id, crashitem)
