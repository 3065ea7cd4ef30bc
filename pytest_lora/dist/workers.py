"""One pytest-xdist worker per GPU (or per group of GPUs): how many workers ``-n auto`` starts,
and which GPUs each owns.

The caller's ``CUDA_VISIBLE_DEVICES`` (indices, UUIDs or MIG ids, in any order; or unset: every
device NVML counts) lists the GPUs the run may use. With ``--lora-gpus-per-worker=K`` (default 1)
the list is cut into groups of K consecutive entries (a remainder shorter than K is left idle);
worker ``gwN`` owns group N (round robin when there are more workers than groups) and sees only
it: the controller hands the entries to the worker, which sets ``CUDA_VISIBLE_DEVICES`` to them
before anything initialises CUDA. Inside the worker its GPUs are ``cuda:0`` to ``cuda:K-1`` (a model
too large for one is spread over them: ``models.build``), and ``measure.gpu`` finds each NVML
handle by PCI bus id or UUID, never by index, so NVML readings are of the worker's own GPUs.

``-n auto`` under ``--lora-bench`` on a machine with GPUs starts one worker per group; on a
machine without (or with ``--lora-device=cpu``) xdist chooses as it always does.

Tests that share a base share a worker: under ``-n`` the bench distributes by their group
(``shard.group_of``: the base, else the module) with ``--dist loadgroup``'s name and its own
scheduler (``scheduling``) unless the user chose another mode, so each base is built once per run,
as in a serial run.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Mapping

from ..results import provenance

WORKER_DEVICE = "lora_cuda_visible_device"  # the workerinput key of a worker's GPUs


def visible_devices(environ: Mapping[str, str], device_count: Callable[[], int]) -> list[str]:
    """The GPUs a run may use, as ``CUDA_VISIBLE_DEVICES`` entries.

    Set: its entries up to the first empty one (CUDA ignores the rest of the list from there);
    ``""`` means no GPU. Unset: ``0`` to ``device_count() - 1``.
    """
    text = environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return [str(index) for index in range(device_count())]
    entries = []
    for entry in text.split(","):
        if not entry.strip():
            break
        entries.append(entry.strip())
    return entries


def gpu_groups(devices: list[str], per_worker: int = 1) -> list[list[str]]:
    """The list cut into groups of ``per_worker`` consecutive entries; a shorter remainder is idle."""
    return [devices[start:start + per_worker] for start in range(0, len(devices) - per_worker + 1, per_worker)]


def worker_device(worker_id: str, devices: list[str], per_worker: int = 1) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` of worker ``gwN``: group N, round robin; ``None`` without a GPU."""
    match = re.fullmatch(r"gw(\d+)", worker_id)
    groups = gpu_groups(devices, per_worker)
    if not groups or match is None:
        return None
    return ",".join(groups[int(match[1]) % len(groups)])


def gpus_per_worker(setting: Any) -> int:
    """``--lora-gpus-per-worker``: a whole number >= 1 (default 1)."""
    from ..specs import whole_number

    value = whole_number(setting.value if setting.value is not None else 1)
    if value is None or value < 1:
        import pytest

        raise pytest.UsageError(f"{setting.describe()}: {setting.shown} is not a GPU count; allowed: an integer >= 1")
    return value


def nvml_device_count() -> int:
    """GPUs NVML sees, without initialising CUDA in this process; 0 without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or driver: a CPU machine
        return 0


def auto_workers(settings: Mapping[str, Any], environ: Mapping[str, str] = os.environ,
                 device_count: Callable[[], int] = nvml_device_count) -> int | None:
    """``-n auto``: one worker per GPU under ``--lora-bench``; ``None`` leaves xdist's own choice."""
    if not settings["bench"].value or str(settings["device"].value).lower() == "cpu":
        return None
    per_worker = gpus_per_worker(settings["gpus_per_worker"])
    return len(gpu_groups(visible_devices(environ, device_count), per_worker)) or None


def share_cpus(workerinput: Mapping[str, Any], environ: Any = os.environ, cpu_count: Callable[[], int] = provenance.cpu_count) -> int | None:
    """In a worker: torch's CPU threads, the worker's share of the cores, unless ``OMP_NUM_THREADS``
    says otherwise. Each worker would start one thread per core, and threads that outnumber the
    cores spin-wait on each other: on 2 cores the default CPU bench took 263 s under ``-n 2``
    against 101 s serially, and 69 s with a thread per worker."""
    if "OMP_NUM_THREADS" in environ:
        return None
    threads = max(1, cpu_count() // max(1, int(workerinput.get("workercount", 1))))  # the cores this process may use
    environ["OMP_NUM_THREADS"] = str(threads)  # read when torch starts its thread pool
    torch = sys.modules.get("torch")
    if torch is not None:  # a conftest imported it already
        torch.set_num_threads(threads)
    return threads


def pin(workerinput: Mapping[str, Any], environ: Any = os.environ) -> str | None:
    """In a worker: see only the GPUs the controller handed it (before CUDA starts)."""
    device = workerinput.get(WORKER_DEVICE)
    if device is not None:
        environ["CUDA_VISIBLE_DEVICES"] = device
    return device


