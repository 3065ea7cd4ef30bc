"""Timing training steps honestly, and the device's peak for MFU.

GPU kernels run asynchronously: a host clock read right after a step measures the launch, not the
work. ``StepTimer`` records a CUDA event before and after each step and waits for the second one;
its times are the GPU's own, and since it waits, a host clock around the step (pytest-benchmark's)
reads the same time (they agree within 0.07% on an H200). On the CPU it reads
``time.perf_counter``. Warm-up steps (allocator growth, cuBLAS handles, autotuning: the first
step of the Llama-3.2-1B shape took 2.45 s on an H200, the others 0.23 s) are never counted.

Statistics are pytest-benchmark's own (``pytest_benchmark.stats.Stats``), so the median and IQR
here are the ones ``pytest-benchmark compare`` shows.

Peaks: dense bf16 tensor-core FLOP/s from the vendors' data sheets for GPUs we know, or measured
once per session with a bf16 8192 x 8192 x 8192 matrix product (784 TFLOP/s on an H200, whose data
sheet says 989).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from pytest_benchmark.stats import Stats

if TYPE_CHECKING:
    from .gpu import Gpu

# Dense bf16 tensor-core peak FLOP/s (no sparsity), from the vendors' data sheets, by model name.
# A name matches only as a whole: "H200" is not "H200 NVL", "L4" is not "L40", "A10" is not "A10G".
DENSE_BF16_PEAK = {
    "H200": 989.4e12,  # H200 SXM
    "H200 NVL": 835.5e12,
    "H100": 989.4e12,  # H100 SXM ("H100 80GB HBM3")
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.5e12,
    "A100": 312.0e12,  # SXM, 40 and 80 GB
    "A100 PCIe": 312.0e12,
    "L40S": 362.05e12,
    "L40": 181.05e12,
    "L4": 121.0e12,
    "A10": 125.0e12,
}
# Words of a device name that say its memory, not which chip it is.
_MEMORY_WORDS = re.compile(r"^(\d+GB|HBM\d?e?|SXM\d?)$", re.IGNORECASE)


class StepTimer:
    """Times each call of a step with CUDA events (GPU) or the host's performance counter (CPU).

    On a GPU it also reads the host clock around each step, after waiting for the end event
    (``host_times``): the two must agree, or the events measure something else than the step.
    """

    def __init__(self, gpu: "Gpu | None"):
        self.gpu = gpu
        self.times: list[float] = []
        self.host_times: list[float] = []

    def time(self, step: Callable[[], object]) -> None:
        """Run ``step`` once and record its duration in seconds; returns after the work is done."""
        if self.gpu is None:
            started = time.perf_counter()
            step()
            self.times.append(time.perf_counter() - started)
            self.host_times.append(self.times[-1])
            return
        start, end = self.gpu.event(), self.gpu.event()
        host_started = self.gpu.clock()
        start.record()
        step()
        end.record()
        end.synchronize()  # elapsed_time is undefined until the end event has completed
        self.host_times.append(self.gpu.clock() - host_started)
        self.times.append(start.elapsed_time(end) / 1000.0)


@dataclass(frozen=True)
class TimingStats:
    """Median, spread and count of timed steps (seconds)."""

    median: float
    iqr: float
    min: float
    mean: float
    stddev: float
    rounds: int

    @classmethod
    def of(cls, times: list[float]) -> "TimingStats":
        stats = Stats()
        for duration in times:
            stats.update(duration)
        return cls(stats.median, stats.iqr, stats.min, stats.mean, stats.stddev, stats.rounds)


def timing_metrics(stats: TimingStats, tokens: int, flops: int, peak: float | None) -> dict[str, tuple[float | None, str]]:
    """What a step-time record carries: the step's statistics, tokens/s = tokens / median, and
    MFU = FLOPs per step / median / peak (``None`` without a peak, i.e. on the CPU)."""
    return {
        "step_time_median_s": (stats.median, "s"),
        "step_time_iqr_s": (stats.iqr, "s"),
        "step_time_min_s": (stats.min, "s"),
        "step_time_rounds": (stats.rounds, "steps"),
        "tokens_per_s": (tokens / stats.median, "tokens/s"),
        "flops_per_step": (flops, "FLOP"),
        "mfu": (flops / stats.median / peak if peak else None, "fraction of peak"),
    }


def per_step_samples(times: list[float], tokens: int, flops: int, peak: float | None) -> dict[str, list[float]]:
    """Each timed step as a sample of the metrics derived from the median: the gate tests a
    change of ``tokens_per_s`` or ``mfu`` on the same steps as one of the step time."""
    samples = {"step_time_median_s": list(times), "tokens_per_s": [tokens / t for t in times]}
    if peak:
        samples["mfu"] = [flops / t / peak for t in times]
    return samples


def resolve_peak(gpu: "Gpu", choice: str, described: str) -> tuple[float, str]:
    """The GPU's dense bf16 FLOP/s for MFU and where it came from: ``choice`` in TFLOP/s (the
    ``--lora-peak`` option, ``described``), the data sheet of a known GPU (``auto``), or a
    measured bf16 matrix product (``measure``, or ``auto`` on a GPU the table lacks)."""
    choice = choice.lower()
    if choice not in ("auto", "measure"):  # a positive number: the option's own check
        return float(choice) * 1e12, described
    known = table_peak(gpu.name) if choice == "auto" else None
    if known:
        return known, f"data sheet, dense bf16: {gpu_model(gpu.name)}"
    return measured_peak(gpu), "measured: bf16 8192^3 matrix product"


def table_peak(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a known GPU, else ``None``.

    ``torch.cuda.get_device_name()`` says e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
    "NVIDIA A100-SXM4-80GB" or "NVIDIA H200 NVL": the vendor and the memory words are dropped and
    what is left must be a whole entry of the table.
    """
    return DENSE_BF16_PEAK.get(gpu_model(device_name))


def gpu_model(device_name: str) -> str:
    """The chip and its variant in a device name: "NVIDIA A100-SXM4-80GB" -> "A100",
    "NVIDIA H100 PCIe" -> "H100 PCIe", "NVIDIA H200 NVL" -> "H200 NVL"."""
    words = [w for w in re.split(r"[\s\-_]+", device_name) if w and w.upper() not in ("NVIDIA", "TESLA")]
    return " ".join(words[:1] + [w for w in words[1:] if not _MEMORY_WORDS.match(w)])


def measured_peak(gpu: "Gpu", size: int = 8192, rounds: int = 10) -> float:
    """FLOP/s of a bf16 ``size``-cubed matrix product: the median of ``rounds`` after warm-up."""
    a = torch.randn(size, size, device=gpu.placement, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=gpu.placement, dtype=torch.bfloat16)
    timer = StepTimer(gpu)
    for _ in range(3):
        timer.time(lambda: a @ b)
    timer.times.clear()
    for _ in range(rounds):
        timer.time(lambda: a @ b)
    return 2 * size**3 / TimingStats.of(timer.times).median
