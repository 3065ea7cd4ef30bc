"""One pytest-xdist worker per GPU: how many workers ``-n auto`` starts, and which GPU each owns.

The caller's ``CUDA_VISIBLE_DEVICES`` (indices, UUIDs or MIG ids, in any order; or unset: every
device NVML counts) lists the GPUs the run may use. Worker ``gwN`` owns entry N of that list
(round robin when there are more workers than GPUs) and sees only it: the controller hands the
entry to the worker, which sets ``CUDA_VISIBLE_DEVICES`` to it before anything initialises CUDA.
Inside the worker that GPU is ``cuda:0``, and ``measure.gpu`` finds its NVML handle by PCI bus id
or UUID, never by index, so NVML readings are of the worker's own GPU.

``-n auto`` under ``--lora-bench`` on a machine with GPUs starts one worker per listed GPU; on a
machine without (or with ``--lora-device=cpu``) xdist chooses as it always does.

Tests that share a base share a worker: each gets xdist's ``xdist_group`` mark named after its base
(``shard.group_of``), and under ``-n`` the bench distributes with ``--dist loadgroup`` unless the
user chose another mode, so each base is built once per run, as in a serial run.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

WORKER_DEVICE = "lora_cuda_visible_device"  # the workerinput key of a worker's GPU
GROUP_SEPARATOR = "@"  # xdist's loadgroup appends "@<group>" to the ids of the tests it groups


def without_group(nodeid: str) -> str:
    """A test id as a serial run has it: xdist's ``loadgroup`` appends ``@<group>`` in workers, and
    the records, seeds and progress line must name (and seed) a test the same with and without -n."""
    return nodeid.split(GROUP_SEPARATOR, 1)[0]


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


def worker_device(worker_id: str, devices: list[str]) -> str | None:
    """The entry worker ``gwN`` owns: the N-th, round robin; ``None`` when there is no GPU."""
    match = re.fullmatch(r"gw(\d+)", worker_id)
    if not devices or match is None:
        return None
    return devices[int(match[1]) % len(devices)]


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
    return len(visible_devices(environ, device_count)) or None


def pin(workerinput: Mapping[str, Any], environ: Any = os.environ) -> str | None:
    """In a worker: see only the GPU the controller handed it (before CUDA starts)."""
    device = workerinput.get(WORKER_DEVICE)
    if device is not None:
        environ["CUDA_VISIBLE_DEVICES"] = device
    return device
