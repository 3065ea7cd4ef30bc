"""The CPU side of a timing: how many threads torch computes with, and how busy the rest of the
machine was meanwhile.

On a small shared CPU, torch's default of one thread per core makes step-time medians bimodal as
soon as another process wants a core (a tiny step measured 0.05 s and 0.9 s in the same run on 2
cores); with one thread they are steady. The step-time suite fixes the count (``threads``) and
measures, over exactly the timed steps, how busy the rest of the machine was (``MachineLoad``),
so a record can say that its numbers are not comparable:

* ``pressure``: the share of the time some task was ready to run but waited for a CPU (Linux's
  pressure stall information, ``/proc/pressure/cpu``). This is contention itself: on 2 cores it
  read 0.002 idle, 0.005 with one CPU-bound process beside a one-thread timing (which then timed
  as fast as idle), and 0.50 with two.
* ``other_cores``: the cores other processes used (``/proc/stat`` less this process's own CPU
  time), for kernels without pressure information. Use is not demand: a process that waited for
  a core used less than it wanted.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator

import torch


PROC_STAT = Path("/proc/stat")
PROC_PRESSURE = Path("/proc/pressure/cpu")
BUSY_PRESSURE = 0.1  # some task waited for a CPU 10% of the time (idle step-time records here: at most 0.051)


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


def cpu_stall_seconds(pressure: Path = PROC_PRESSURE) -> float | None:
    """Seconds during which some task waited for a CPU since boot (``None`` without PSI)."""
    try:
        some = pressure.read_text().splitlines()[0]
    except OSError:
        return None
    return int(some.rsplit("total=", 1)[1].split()[0]) / 1e6


class MachineLoad:
    """How busy the machine was while the block ran: ``pressure`` (the share of the time some task
    waited for a CPU) and ``other_cores`` (cores other processes used), each ``None`` where the
    kernel doesn't say."""

    def __init__(self, machine: Callable[[], float | None] | None = None, own: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.perf_counter, stall: Callable[[], float | None] | None = None):
        self.machine, self.own, self.clock = machine or busy_cpu_seconds, own, clock
        self.stall = stall or cpu_stall_seconds
        self.other_cores: float | None = None
        self.pressure: float | None = None

    def __enter__(self) -> MachineLoad:
        self._start = (self.machine(), self.own(), self.clock(), self.stall())
        return self

    def __exit__(self, *exc: object) -> None:
        machine, own, wall, stall = self.machine(), self.own(), self.clock(), self.stall()
        elapsed = wall - self._start[2]
        if elapsed <= 0:
            return
        if machine is not None and self._start[0] is not None:
            self.other_cores = max((machine - self._start[0]) - (own - self._start[1]), 0.0) / elapsed
        if stall is not None and self._start[3] is not None:
            self.pressure = min(max(stall - self._start[3], 0.0) / elapsed, 1.0)

    def busy(self, cpu_count: int, threads: int) -> bool:
        """Whether the timing competed for a CPU: by pressure where the kernel reports it, else
        when other processes used more than the cores the timing left free (half a core of slack,
        a quarter at least: the kernel and the harness's helpers use less)."""
        if self.pressure is not None:
            return self.pressure > BUSY_PRESSURE
        return self.other_cores is not None and self.other_cores > max(0.25, cpu_count - threads - 0.5)

    def describe(self, cpu_count: int, threads: int) -> str:
        """The warning's words: what was measured."""
        waited = f"a task waited for a CPU {100 * self.pressure:.0f}% of the time; " if self.pressure is not None else ""
        used = f"other processes used {self.other_cores:.2f} of {cpu_count} CPUs" if self.other_cores is not None else ""
        plural = "s" if threads != 1 else ""
        return f"{waited}{used} beside {threads} timing thread{plural}; its times are not comparable"


@contextlib.contextmanager
def recorded_conditions(thread_count: int | None, recorder) -> Iterator[None]:
    """Time the block with torch's thread count fixed, and record into ``recorder`` how busy the
    machine was meanwhile (``cpu_pressure``, ``other_cpu_load``), warning when it competed for a CPU."""
    from ..results import provenance

    with threads(thread_count) as used, MachineLoad() as load:
        yield
    recorder.record("cpu_pressure", load.pressure, "share of time a task waited for a CPU")
    recorder.record("other_cpu_load", load.other_cores, "cores")
    cpus = provenance.cpu_count()
    if load.busy(cpus, used):
        recorder.timed_while_busy(load.describe(cpus, used))
