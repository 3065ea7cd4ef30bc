"""The one place where the harness talks to a GPU: its clock, its allocator, NVML and its name.

Every CUDA-only line of the measurements goes through a ``Gpu``: the step timer's events, the
per-phase memory statistics, NVML's device bytes, the device name for the MFU peak, emptying the
cache between configs. A ``Gpu`` is built on two objects it is handed: a CUDA runtime (the
``torch.cuda`` module) and an NVML library (the ``pynvml`` module). The tests hand it a fake of
each (``tests/fakes.py``: events on a simulated clock that complete only when waited for, an
allocator that counts the bytes of live tensors and can run out of memory, an NVML that numbers
devices differently from CUDA), so every line here runs in CI on the CPU; a GPU host runs the
same lines on the real modules.

What the code here gets right, and why:

* CUDA events are asynchronous: ``elapsed_time`` is only defined once the end event has completed
  (CUDA returns ``cudaErrorNotReady`` before). The timer waits for it, and the host clock around a
  step is read after that wait, so both clocks measure the same work.
* Allocator statistics are per device: peaks are reset and read on the devices the model lives on
  (``indices``: the current device, or every GPU of a worker that owns several, over which a base
  too large for one is spread), after a synchronise. Allocated, reserved and NVML bytes are the sum
  over those devices, and ``per_device`` gives each one's. A sum of per-device peaks is what the
  GPUs must hold between them: each must fit its own peak, whenever it is reached.
* NVML numbers devices by PCI order, CUDA by ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, in any
  order) or by speed: the NVML device is found through the PCI bus id, else the UUID, never an index.
* An out-of-memory error comes in several types (``is_out_of_memory``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

OOM_MESSAGES = (
    "out of memory",  # torch.OutOfMemoryError, cudaErrorMemoryAllocation in AcceleratorError / RuntimeError
    "cublas_status_alloc_failed",  # cuBLAS could not allocate its workspace
    "cudnn_status_alloc_failed",
    "cuda_error_out_of_memory",  # the driver API (bitsandbytes' kernels, triton)
)


def is_out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, means the device ran out of memory.

    torch raises ``torch.OutOfMemoryError`` from its allocator, but an allocation outside it
    fails differently: cuBLAS's workspace as ``RuntimeError: CUDA error:
    CUBLAS_STATUS_ALLOC_FAILED``, a kernel launch as ``torch.AcceleratorError`` ("out of
    memory"), bitsandbytes' and triton's kernels as ``RuntimeError`` with the driver's message.
    """
    return any(
        type(link).__name__ == "OutOfMemoryError" or (isinstance(link, RuntimeError) and any(text in str(link).lower() for text in OOM_MESSAGES))
        for link in error_chain(error)
    )


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


class Gpu:
    """One CUDA device as the harness sees it, through a CUDA runtime and an NVML library.

    ``runtime`` is ``torch.cuda`` or a fake of it; ``nvml`` is the ``pynvml`` module or a fake
    (``None``: device bytes are unknown); ``placement`` is where tensors go (``"cuda"``; a fake
    keeps them on the CPU).
    """

    def __init__(self, runtime: Any, nvml: Any = None, placement: str = "cuda", clock: Callable[[], float] = time.perf_counter,
                 indices: tuple[int, ...] | None = None):
        self.runtime = runtime
        self.index = runtime.current_device()
        self.indices = tuple(indices) if indices else (self.index,)  # the devices measured (and owned)
        self.placement = placement
        self.clock = clock  # the host clock that StepTimer compares with the events
        self._nvml = nvml
        self._nvml_handles_found: Any = "unresolved"

    # ----------------------------------------------------------------- identity

    @property
    def name(self) -> str:
        return self.runtime.get_device_name(self.index)

    # ----------------------------------------------------------------- time

    def synchronize(self) -> None:
        for index in self.indices:
            self.runtime.synchronize(index)

    def event(self) -> Any:
        return self.runtime.Event(enable_timing=True)

    # ----------------------------------------------------------------- allocator

    def allocated(self) -> int:
        return self._statistic("memory_allocated")

    def reserved(self) -> int:
        return self._statistic("memory_reserved")

    def peak_allocated(self) -> int:
        return self._statistic("max_memory_allocated")

    def peak_reserved(self) -> int:
        return self._statistic("max_memory_reserved")

    def reset_peak(self) -> None:
        """Start a new phase: the peaks from here on are this phase's."""
        self.synchronize()
        for index in self.indices:
            self.runtime.reset_peak_memory_stats(index)

    def _statistic(self, name: str) -> int:
        """The allocator's ``torch.cuda.<name>`` summed over the devices, once queued work has finished."""
        return sum(self.per_device(name).values())

    def per_device(self, name: str) -> dict[int, int]:
        """The allocator's ``torch.cuda.<name>`` (e.g. ``max_memory_allocated``) of each device."""
        self.synchronize()
        return {index: int(getattr(self.runtime, name)(index)) for index in self.indices}

    def capacities(self) -> dict[int, int]:
        """Each device's memory in bytes: where a base may go (``models.placement``)."""
        return {index: int(self.runtime.get_device_properties(index).total_memory) for index in self.indices}

    def free(self) -> int:
        """The device's free bytes as the driver sees them (other processes and the CUDA context
        taken, torch's cached blocks too: empty the cache first to count those as free)."""
        self.synchronize()
        return int(self.runtime.mem_get_info(self.index)[0])

    def empty_cache(self) -> None:
        """Return cached blocks to the device, so that reserved bytes start from what is allocated."""
        self.synchronize()
        self.runtime.empty_cache()

    def warm_up(self) -> None:
        """Create what the process keeps once a step has run, so that it is in every "before" and
        never looks like a leak: cuBLAS keeps a handle and a workspace per thread that has run a
        matrix product (the main thread and autograd's backward thread; 32 MiB each on sm90),
        allocated through torch's allocator and never returned."""
        import torch

        x = torch.ones(64, 64, device=self.placement, requires_grad=True)
        (x @ x).sum().backward()
        del x
        self.synchronize()

    # ----------------------------------------------------------------- NVML

    def device_used(self) -> int | None:
        """NVML's used bytes of this device: every process, and the CUDA context torch doesn't see."""
        handles = self._nvml_handles()
        if handles is None:
            return None
        return sum(int(self._nvml.nvmlDeviceGetMemoryInfo(handle).used) for handle in handles)

    def driver(self) -> str | None:
        """The driver version NVML reports (``None`` without NVML)."""
        if self._nvml_handles() is None:
            return None
        version = self._nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)

    def _nvml_handles(self) -> list[Any] | None:
        """NVML's handle of each device, or ``None`` if NVML can't name every one."""
        if self._nvml_handles_found == "unresolved":
            handles = [] if self._nvml is None else [nvml_handle(self._nvml, self.runtime.get_device_properties(i)) for i in self.indices]
            self._nvml_handles_found = handles if handles and None not in handles else None
        return self._nvml_handles_found


def nvml_handle(nvml: Any, properties: Any) -> Any:
    """NVML's handle of the device CUDA describes by ``properties``, by PCI bus id, else by UUID.

    A raw index would be wrong whenever ``CUDA_VISIBLE_DEVICES`` selects or reorders devices
    (NVML ignores it) or CUDA orders by speed. ``None`` when NVML can't say (no library, no
    permission): device bytes are then unknown rather than another device's.
    """
    try:
        nvml.nvmlInit()
    except Exception:  # no NVML library or driver
        return None
    bus = getattr(properties, "pci_bus_id", None)
    if bus is not None:
        bus_id = f"{getattr(properties, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(properties, 'pci_device_id', 0):02x}.0"
        try:
            return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:
            pass
    uuid = str(getattr(properties, "uuid", "") or "")
    if uuid:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception:
            pass
    return None


def cuda_gpu() -> Gpu | None:
    """The current CUDA device through ``torch.cuda`` and ``pynvml``, or ``None`` without one."""
    if not gpu_driver_present():
        return None  # torch can't see a GPU: don't import it (a second) to ask
    import torch

    return _real_gpu() if torch.cuda.is_available() else None


GPU_DRIVERS = {"linux": ("libcuda.so.1", "libamdhip64.so"), "win32": ("nvcuda.dll", "amdhip64.dll")}


def gpu_driver_present(load: Callable[[str], Any] | None = None) -> bool:
    """Whether the CUDA driver (or ROCm's HIP runtime) can be loaded: without it torch sees no GPU.

    ``load`` opens a shared library by name (``ctypes.CDLL``, the same ``dlopen`` torch does).
    """
    import ctypes
    import sys

    load = load or ctypes.CDLL
    for name in GPU_DRIVERS.get(sys.platform, ()):
        try:
            load(name)
            return True
        except OSError:
            continue
    return sys.platform not in GPU_DRIVERS  # elsewhere, ask torch


def _real_gpu() -> Gpu:  # pragma: no cover - a GPU host only; the tests build Gpu on fakes of these two modules
    import torch

    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is a dependency; without it device bytes are unknown
        pynvml = None
    return Gpu(torch.cuda, pynvml, indices=tuple(range(torch.cuda.device_count())))  # every GPU this worker owns
