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

import time
from dataclasses import dataclass
from typing import Callable

import torch
from pytest_benchmark.stats import Stats

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
DENSE_BF16_PEAK = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.1e12),
    ("L4", 121.0e12),
    ("A10", 125.0e12),
)


class StepTimer:
    """Times each call of a step with CUDA events (GPU) or the host's performance counter (CPU)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.times: list[float] = []

    def time(self, step: Callable[[], object]) -> None:
        """Run ``step`` once and record its duration in seconds; returns after the work is done."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            self.times.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            step()
            self.times.append(time.perf_counter() - started)


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


def table_peak(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a known GPU, else ``None``."""
    return next((peak for name, peak in DENSE_BF16_PEAK if name in device_name), None)


def measured_peak(device: str = "cuda", size: int = 8192, rounds: int = 10) -> float:
    """FLOP/s of a bf16 ``size``-cubed matrix product: the median of ``rounds`` after warm-up."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    timer = StepTimer(device)
    for _ in range(3):
        timer.time(lambda: a @ b)
    timer.times.clear()
    for _ in range(rounds):
        timer.time(lambda: a @ b)
    return 2 * size**3 / TimingStats.of(timer.times).median
