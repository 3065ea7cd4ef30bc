"""A GPU on the CPU: fakes of the CUDA runtime and of NVML, for ``pytest_lora.measure.gpu.Gpu``.

The fakes keep the contracts the real libraries have, so that code which breaks them fails here:

* ``FakeCudaRuntime`` runs every torch operation through a dispatch mode (``Device``) that plays
  the device. Each operation is a kernel of ``kernel_s`` simulated seconds on the device clock,
  and each tensor storage it creates is allocated device memory until the storage dies, so
  allocated bytes and their peaks are exact, phase by phase. A cache like the caching
  allocator's keeps reserved bytes at their high-water mark until ``empty_cache``. The first
  matrix product of the forward and of the backward pass each leave a cuBLAS workspace behind for
  good, as the main and the autograd thread do on a real device. Past ``capacity`` an allocation
  raises ``torch.OutOfMemoryError``. Statistics are per device index: resetting or reading
  another index than the model's does not touch the model's.
* CUDA events record the device clock and complete only when someone waits (``synchronize`` on
  the event, which completes the events recorded before it on the stream too, or on the device):
  ``elapsed_time`` before that raises CUDA's "device not ready".
* ``FakeNvml`` numbers devices in PCI order, which is not CUDA's order here, and reports each
  device's used bytes: the CUDA context, what other processes hold, and this process's reserved
  bytes on the device the runtime uses.

``FakeGpuPlugin`` hands such a ``Gpu`` to pytest-lora through the ``pytest_lora_gpu`` hook and
plays the device for the whole test loop; it also keeps each test's peak allocated bytes.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_lora.measure.gpu import Gpu

MiB = 2**20
CUBLAS_WORKSPACE = 32 * MiB  # sm90: 4 MiB x 8 per handle (CUBLAS_WORKSPACE_CONFIG=:4096:8)
CACHE_BLOCK = 2 * MiB  # the caching allocator reserves large segments in 2 MiB multiples
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "matmul"}


@dataclass
class DeviceStats:
    allocated: int = 0
    peak_allocated: int = 0
    reserved: int = 0
    peak_reserved: int = 0


class Device(TorchDispatchMode):
    """Every operation is a kernel on the simulated device; every storage it creates is device memory."""

    def __init__(self, runtime: "FakeCudaRuntime"):
        super().__init__()
        self.runtime = runtime
        self._tracked: set[int] = set()
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.runtime.now += self.runtime.kernel_s
        if func.__name__.split(".")[0] in MATMULS:
            self.runtime.cublas_workspace("backward" if torch._C._current_autograd_node() is not None else "forward")
        for leaf in _pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                self.track(leaf)
        return out

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        with self._lock:
            if key in self._tracked or storage.nbytes() == 0:
                return
            self._tracked.add(key)
        size = storage.nbytes()
        self.runtime.allocate(size)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        with self._lock:
            self._tracked.discard(key)
        self.runtime.release(size)


class FakeEvent:
    """``torch.cuda.Event(enable_timing=True)`` on the simulated clock."""

    def __init__(self, runtime: "FakeCudaRuntime", enable_timing: bool = False):
        self.runtime, self.time, self.completed = runtime, None, False

    def record(self, stream: Any = None) -> None:
        self.time, self.completed = self.runtime.now, False
        self.runtime.pending.append(self)

    def synchronize(self) -> None:
        """Wait for this event, and so for every event recorded before it on the stream."""
        pending = self.runtime.pending
        done = pending[: pending.index(self) + 1] if self in pending else []
        for event in done:
            event.completed = True
        del pending[: len(done)]

    def query(self) -> bool:
        return self.completed

    def elapsed_time(self, end: "FakeEvent") -> float:
        if not (self.completed and end.completed):
            raise RuntimeError("CUDA error: device not ready")
        return (end.time - self.time) * 1000.0


class FakeCudaRuntime:
    """The part of ``torch.cuda`` that ``Gpu`` uses, on a simulated device."""

    def __init__(self, names=("NVIDIA H200", "NVIDIA H200"), current: int = 0, capacity: int = 64 * 2**30, kernel_s: float = 1e-4):
        self.names, self.current, self.capacity, self.kernel_s = names, current, capacity, kernel_s
        self.now = 0.0
        self.stats = [DeviceStats() for _ in names]
        self.pending: list[FakeEvent] = []
        self.workspaces: set[str] = set()
        self.calls: list[tuple[str, int | None]] = []  # (what, device index): the order code asked in
        self.device = Device(self)
        # CUDA_VISIBLE_DEVICES picks and reorders: this process's cuda:i is PCI bus 0x40 - 0x10 * i
        self.properties = [
            SimpleNamespace(name=n, pci_domain_id=0, pci_bus_id=0x40 - 0x10 * i, pci_device_id=0, uuid=f"0000000{i}-fake-uuid",
                            total_memory=capacity)
            for i, n in enumerate(names)
        ]

    # what Gpu calls
    def current_device(self) -> int:
        return self.current

    def get_device_name(self, index: int | None = None) -> str:
        return self.names[self.current if index is None else index]

    def get_device_properties(self, index: int) -> Any:
        return self.properties[index]

    def synchronize(self, index: int | None = None) -> None:
        self.calls.append(("synchronize", index))
        for event in self.pending:
            event.completed = True
        self.pending.clear()

    def Event(self, enable_timing: bool = False) -> FakeEvent:  # noqa: N802 (torch.cuda's name)
        return FakeEvent(self, enable_timing)

    def memory_allocated(self, index: int) -> int:
        self.calls.append(("memory_allocated", index))
        return self.stats[index].allocated

    def memory_reserved(self, index: int) -> int:
        return self.stats[index].reserved

    def max_memory_allocated(self, index: int) -> int:
        self.calls.append(("max_memory_allocated", index))
        return self.stats[index].peak_allocated

    def max_memory_reserved(self, index: int) -> int:
        return self.stats[index].peak_reserved

    def reset_peak_memory_stats(self, index: int) -> None:
        self.calls.append(("reset_peak_memory_stats", index))
        stats = self.stats[index]
        stats.peak_allocated, stats.peak_reserved = stats.allocated, stats.reserved

    def mem_get_info(self, index: int) -> tuple[int, int]:
        return self.capacity - self.stats[index].reserved, self.capacity

    def empty_cache(self) -> None:
        stats = self.stats[self.current]
        stats.reserved = _blocks(stats.allocated)

    # what the simulated device does
    def allocate(self, size: int) -> None:
        stats = self.stats[self.current]
        if stats.allocated + size > self.capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size / MiB:.2f} MiB (fake device of {self.capacity / 2**30:.0f} GiB)")
        stats.allocated += size
        stats.peak_allocated = max(stats.peak_allocated, stats.allocated)
        stats.reserved = max(stats.reserved, _blocks(stats.allocated))
        stats.peak_reserved = max(stats.peak_reserved, stats.reserved)

    def release(self, size: int) -> None:
        self.stats[self.current].allocated -= size

    def cublas_workspace(self, thread: str) -> None:
        if thread not in self.workspaces:
            self.workspaces.add(thread)
            self.allocate(CUBLAS_WORKSPACE)


def _blocks(size: int) -> int:
    return -(-size // CACHE_BLOCK) * CACHE_BLOCK


@dataclass
class FakeNvmlDevice:
    bus_id: str
    uuid: str
    other_processes: int = 0
    reserved_of: Any = None  # a callable: this process's reserved bytes on the device


@dataclass
class FakeNvml:
    """The part of ``pynvml`` that ``Gpu`` uses. Devices are in PCI order (bus 0x10, 0x20, ...)."""

    devices: list[FakeNvmlDevice] = field(default_factory=list)
    context: int = 512 * MiB
    driver: str = "580.95.05"

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        pass

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return self.driver

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str) -> FakeNvmlDevice:  # noqa: N802
        for device in self.devices:
            if device.bus_id.lower() == bus_id.lower():
                return device
        raise RuntimeError("NVML_ERROR_NOT_FOUND")

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeNvmlDevice:  # noqa: N802
        for device in self.devices:
            if device.uuid == uuid:
                return device
        raise RuntimeError("NVML_ERROR_NOT_FOUND")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeNvmlDevice:  # noqa: N802
        return self.devices[index]

    def nvmlDeviceGetMemoryInfo(self, device: FakeNvmlDevice) -> Any:  # noqa: N802
        mine = device.reserved_of() if device.reserved_of else 0
        return SimpleNamespace(used=self.context + mine + device.other_processes)


def fake_gpu(runtime: FakeCudaRuntime | None = None, nvml: FakeNvml | None = None, indices: tuple[int, ...] | None = None) -> Gpu:
    """A ``Gpu`` on a fake runtime and a fake NVML that numbers devices in the other order
    (``indices``: the devices it owns, for a worker of several GPUs)."""
    runtime = runtime or FakeCudaRuntime()
    if nvml is None:
        nvml = FakeNvml()
        for index in reversed(range(len(runtime.names))):  # PCI order is the reverse of CUDA's here
            p = runtime.properties[index]
            nvml.devices.append(
                FakeNvmlDevice(f"00000000:{p.pci_bus_id:02x}:00.0", f"GPU-{p.uuid}", other_processes=(index + 1) * 100 * MiB,
                               reserved_of=(lambda i=index: runtime.stats[i].reserved))
            )
    return Gpu(runtime, nvml, placement="cpu", clock=lambda: runtime.now, indices=indices)


class FakeGpuPlugin:
    """Hands pytest-lora a fake GPU and plays that device for the whole test loop.

    ``peaks[nodeid]`` is (allocated before the test's call, peak allocated during it).
    """

    def __init__(self, gpu: Gpu | None = None):
        self.gpu = gpu or fake_gpu()
        self.peaks: dict[str, tuple[int, int]] = {}

    @property
    def runtime(self) -> FakeCudaRuntime:
        return self.gpu.runtime

    @pytest.hookimpl(tryfirst=True)
    def pytest_lora_gpu(self, config):
        return self.gpu

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session):
        with self.runtime.device:
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        before = self.runtime.stats[self.runtime.current].allocated
        self.runtime.stats[self.runtime.current].peak_allocated = before
        try:
            return (yield)
        finally:
            self.peaks[item.nodeid] = (before, self.runtime.stats[self.runtime.current].peak_allocated)
