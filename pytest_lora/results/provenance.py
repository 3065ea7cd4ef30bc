"""Where a number came from: the run (id, times, command line, git state) and the machine.

A figure without its commit, library versions and device can't be compared with another, so
every results document carries them. Versions are read from package metadata, not by importing
the packages.
"""

from __future__ import annotations

import datetime
import os
import platform
import secrets
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """Sortable by time, unique across parallel runs: ``20261128-155523-3fa9c2``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def run_info(run_id: str, started: str, argv: list[str], root: Path) -> dict[str, Any]:
    return {
        "id": run_id,
        "started": started,
        "finished": None,
        "argv": list(argv),
        "git": git_state(root),
        "status": "running",
    }


def git_state(root: Path) -> dict[str, Any]:
    """The commit checked out at ``root`` and whether the work tree differs from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def machine_info(gpu: Any = None) -> dict[str, Any]:
    """The device and software that produced the numbers (``gpu``: a ``measure.gpu.Gpu`` or ``None``)."""
    info: dict[str, Any] = {"device": "cpu" if gpu is None else "cuda", "gpu_name": None, "driver": None, "cuda": None}
    info.update({name: _version(name) for name in PACKAGES})
    info["python"] = platform.python_version()
    info["cpu"] = _cpu_name()
    info["cpu_count"] = cpu_count()
    torch = sys.modules.get("torch")
    if torch is not None:
        info["cuda"] = torch.version.cuda
    if gpu is not None:
        info["gpu_name"] = gpu.name
        info["driver"] = gpu.driver()
    return info


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, all of the machine's), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
