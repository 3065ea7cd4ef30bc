"""The CPU side of a timing: how many threads torch computes with, and how busy the rest of the
machine was meanwhile.

On a small shared CPU, torch's default of one thread per core makes step-time medians bimodal as
soon as another process wants a core (a tiny step measured 0.05 s and 0.9 s in the same run on 2
cores); with one thread they are steady. The step-time suite fixes the count (``threads``) and
measures, over exactly the timed steps, the CPU time the machine spent on other processes
(``OtherLoad``: from ``/proc/stat`` less this process's own CPU time), so a record can say that
its machine was busy.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

PROC_STAT = Path("/proc/stat")


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[int]:
    """torch's intra-op thread count set to ``count`` (``None``: left as it is), restored afterwards."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def busy_cpu_seconds(stat: Path = PROC_STAT) -> float | None:
    """CPU seconds the whole machine has spent not idle since boot (``None`` without /proc/stat)."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / 100.0  # USER_HZ is 100 on Linux


class OtherLoad:
    """Cores kept busy by other processes while the block ran (``cores``), on average."""

    def __init__(self, machine: Callable[[], float | None] | None = None, own: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.perf_counter):
        self.machine, self.own, self.clock = machine or busy_cpu_seconds, own, clock
        self.cores: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = (self.machine(), self.own(), self.clock())
        return self

    def __exit__(self, *exc: object) -> None:
        machine, own, wall = self.machine(), self.own(), self.clock()
        if machine is None or self._start[0] is None or wall <= self._start[2]:
            return
        other = (machine - self._start[0]) - (own - self._start[1])
        self.cores = max(other, 0.0) / (wall - self._start[2])

    def busy(self, cpu_count: int, threads: int) -> bool:
        """Whether other processes wanted the cores the timing left free, and more (a quarter of
        a core at least: the kernel and the harness's own helpers account for less)."""
        return self.cores is not None and self.cores > max(0.25, cpu_count - threads - 0.5)
