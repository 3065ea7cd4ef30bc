"""Memory of a LoRA / QLoRA training step: measured, and modelled from the architecture.

Measured everywhere:

* ``storage_bytes``: the bytes a model's weights really occupy: every parameter and buffer, and
  each quantization format's constants beside them (bitsandbytes' block absmax and code tables,
  torchao's scales inside its tensor subclasses, HQQ's scales and zero points). Each storage is
  counted once, however many tensors view it.
* ``saved_activation_bytes``: what autograd keeps for the backward pass, read with
  ``torch.autograd.graph.saved_tensors_hooks`` during the forward (storages counted once,
  parameters excluded). This is the activation memory of the step, on any device.
* the adapter, its gradients and AdamW's state, by summing the tensors themselves.

Measured on a GPU only (``step_phase_memory``, through ``gpu.Gpu``): torch's allocated and
reserved bytes with per-phase peaks, and NVML's used bytes for the whole device (the CUDA context included, which torch
doesn't see; peft #779 and #1469 are users confusing the three).

Modelled (``analytic_*``; the arithmetic is ``measure.step``'s, torch-free), from the architecture's
layout (``models.layout``: read on the meta device) and the quantization format:

* weights: each quantized weight costs what its format says (``Format.tensor_bytes``: the
  format's docstring gives the arithmetic, e.g. 4.5 bits a weight for nf4, QLoRA §3). Everything
  else stays in the base's dtype. Layers that transformers keeps in full precision are not
  quantized.
* the adapter: LoRA (and DoRA) parameters in fp32 (peft upcasts adapters of 16-bit bases), their
  fp32 gradients, AdamW's two fp32 moments and a step counter per tensor: 16 bytes per trainable
  parameter (ZeRO §3.1 counts the same for mixed-precision Adam) plus 4 per tensor.
* activations: ``activation_terms``, a per-layer count of what a decoder-only transformer step
  keeps for backward, per token (see its docstring); ``None`` where no model exists yet.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..specs import OPTIMIZERS, OptimizerSpec, QuantSpec, WorkloadSpec
from ..models import build, formats, layout, storage
from . import optimizers, step
from .step import ACTIVATION_FAMILIES, DROPOUT_MASK_BYTES, ActivationTerms, StepEstimate, StepModel, TrainingState, activation_terms  # noqa: F401  (the step's terms, named here too)
from .gpu import error_chain, is_out_of_memory

if TYPE_CHECKING:
    from .gpu import Gpu

# --------------------------------------------------------------------------- storage


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every distinct storage behind the model's parameters, buffers and quantization
    constants: each module's own tensors as its format stores them (``formats.stored_tensors``)."""
    seen: dict[tuple[str, int], int] = {}
    for module in model.modules():
        for tensor in formats.stored_tensors(module):
            seen.setdefault(_storage_key(tensor), tensor.untyped_storage().nbytes())
    return sum(seen.values())


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return tensor.device.type, tensor.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- analytic weights


def analytic_weight_bytes(config_dict: dict[str, Any], quant: QuantSpec) -> int:
    """Weight bytes of the architecture stored as ``quant``, from shapes and the format alone
    (``models.layout.Layout.weight_bytes``: ``Format.tensor_bytes`` for each weight the format
    quantizes, every other tensor in its dtype)."""
    element_bytes = storage.DTYPE_BYTES[storage.build_dtype(quant, config_dict)]
    return layout.built(config_dict).weight_bytes(quant, element_bytes, formats.of(quant).tensor_bytes)


# --------------------------------------------------------------------------- adapter and optimizer


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainingState:
    """Measured: sum the trainable tensors, their ``.grad`` and every tensor in ``optimizer.state``
    (each storage once)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    parameters = sum(p.numel() * p.element_size() for p in trainable)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    return TrainingState(parameters, gradients, optimizers.state_bytes(optimizer) if optimizer is not None else 0)


# --------------------------------------------------------------------------- activations


@contextlib.contextmanager
def saved_activations(model: nn.Module) -> Iterator[dict[tuple[str, int], int]]:
    """Collect the storages autograd saves for backward while the block runs (parameters excluded)."""
    weights = {_storage_key(part) for module in model.modules() for part in formats.stored_tensors(module)}
    saved: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for part in formats.plain_parts(tensor):  # a quantized weight saved whole: its parts
            key = _storage_key(part)
            if key not in weights:
                saved.setdefault(key, part.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


# --------------------------------------------------------------------------- the whole step


def analytic_step_model(config_dict: dict[str, Any], quant: QuantSpec, lora: Any, optimizer: OptimizerSpec | None = None,
                        device: str = "cuda") -> StepModel:
    """The step's memory from the architecture (its layout, read on the meta device), the
    quantization, the LoRA config and the optimizer (AdamW by default), for any workload, on a
    GPU (``device="cpu"``: as the CPU runs it, whose dropout keeps more)."""
    spec = optimizer or OPTIMIZERS["adamw"]
    return step.step_model(layout.built(config_dict), config_dict, quant, lora, spec, device, optimizers.eight_bit_constants(spec),
                           formats.of(quant).tensor_bytes)


def analytic_step(config_dict: dict[str, Any], quant: QuantSpec, lora: Any, workload: WorkloadSpec,
                  optimizer: OptimizerSpec | None = None, device: str = "cuda") -> StepEstimate:
    """The step's memory from the architecture, the quantization, the LoRA config, the workload,
    the optimizer (AdamW by default) and the device that runs it."""
    return analytic_step_model(config_dict, quant, lora, optimizer, device).at(workload)


# --------------------------------------------------------------------------- GPU


@dataclass(frozen=True)
class PhaseMemory:
    """torch's allocated bytes after each phase of a step and the peak within it (GPU)."""

    base_allocated: int
    adapter_allocated: int | None = None
    forward_peak: int | None = None
    forward_allocated: int | None = None
    backward_peak: int | None = None
    optimizer_peak: int | None = None
    after_step_allocated: int | None = None
    peak_reserved: int | None = None
    device_used: int | None = None
    released_allocated: int | None = None
    oom_peak: int | None = None
    oom: str | None = None
    device_peaks: dict[int, int] | None = None  # each GPU's peak in the step, when the base spans several
    paged_state: int | None = None  # optimizer state in CUDA unified memory (not in torch's allocator)

    @property
    def peak_allocated(self) -> int | None:
        """The step's peak (the build excluded); the peak reached when it ran out of memory."""
        peaks = [p for p in (self.forward_peak, self.backward_peak, self.optimizer_peak, self.oom_peak) if p is not None]
        return max(peaks) if peaks else None


def step_phase_memory(base: nn.Module, lora_config: Any, batch: dict[str, torch.Tensor], grad_ckpt: bool, gpu: "Gpu",
                      optimizer: OptimizerSpec | None = None) -> PhaseMemory:
    """Add the adapter, run one step phase by phase, take everything off again; measure throughout.

    The cache is emptied first, so that reserved bytes are the step's and not what the build or
    earlier configs left cached. Peaks are reset at the start of each phase. NVML's bytes are
    sampled after each phase (reserved bytes only grow within a step, so the largest sample is
    this process's peak; other processes on the device are in it too). The measured step is the
    second: the first creates AdamW's state, which every later step carries. An out-of-memory error
    ends the step: the peak reached is kept and everything is released before returning, so the
    next config starts clean.
    """
    from ..models import adapters

    gpu.warm_up()  # cuBLAS's workspaces are the process's, not this step's: they must not show as a leak
    build.free_memory(gpu)
    values: dict[str, Any] = {"base_allocated": gpu.allocated()}
    reserved: list[int] = []
    device: list[int] = []
    with adapters.attached(base, lora_config) as model:
        _measure_phases(model, batch, grad_ckpt, gpu, values, reserved, device, optimizer)
        del model  # the PeftModel holds the adapter: nothing may outlive the block
    build.free_memory(gpu)
    values["released_allocated"] = gpu.allocated()
    values["peak_reserved"] = max(reserved) if reserved else None
    values["device_used"] = max(device) if device else None
    return PhaseMemory(**values)


def _measure_phases(model: nn.Module, batch: dict[str, torch.Tensor], grad_ckpt: bool, gpu: "Gpu", values: dict[str, Any],
                    reserved: list[int], device: list[int], optimizer: OptimizerSpec | None = None) -> None:
    """The phases of one step; the step (activations, gradients, optimizer) dies with this frame."""
    from .train import TrainStep, checkpointing

    step = TrainStep(model, optimizer=optimizer)
    phases = (("forward", lambda: step.forward(batch)), ("backward", step.backward), ("optimizer", step.optimizer_step))

    def sample() -> None:
        reserved.append(gpu.peak_reserved())
        used = gpu.device_used()
        if used is not None:
            device.append(used)
        if len(gpu.indices) > 1:  # a phase's peak on each GPU; the step's is the largest of its phases
            peaks = values.setdefault("device_peaks", {})
            for index, peak in gpu.per_device("max_memory_allocated").items():
                peaks[index] = max(peaks.get(index, 0), peak)

    try:
        with checkpointing(model, grad_ckpt):
            values["adapter_allocated"] = gpu.allocated()
            step.run(batch)  # a first step creates AdamW's state: the measured one is a steady-state step
            step.zero_grad()
            for phase, run in phases:
                values[f"{phase}_peak"] = phase_peak(gpu, run)
                sample()
                if phase == "forward":
                    values["forward_allocated"] = gpu.allocated()
            values["after_step_allocated"] = gpu.allocated()
            values["paged_state"] = optimizers.paged_bytes(step.optimizer)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        message = str(error).strip()
        values["oom"] = message.splitlines()[0] if message else type(error).__name__
        values["oom_peak"] = gpu.peak_allocated()
        sample()
        drop_frames(error)
    finally:
        step.close()


@dataclass(frozen=True)
class Pressure:
    """A paged optimizer's step beside its non-paged counterpart's, with the device filled so that
    only ``headroom`` bytes are free: what the counterpart's step needs, less half of the state the
    paged optimizer would page out."""

    unconstrained: PhaseMemory  # the counterpart's step on the free device
    headroom: int | None = None
    non_paged: PhaseMemory | None = None
    paged: PhaseMemory | None = None

    def verdict(self) -> tuple[bool, str | None]:
        """Whether the run shows what paging is for (the non-paged step out of memory at this
        headroom, the paged one not), and what is wrong if the paged step fared worse. Both
        steps fitting, or both out of memory, shows nothing: the run is inconclusive."""
        non_paged, paged = self.non_paged.oom is not None, self.paged.oom is not None
        if paged and not non_paged:
            return False, "the paged optimizer's step ran out of memory where its non-paged counterpart's did not"
        return non_paged and not paged, None


def under_pressure(base: nn.Module, lora_config: Any, batch: dict[str, torch.Tensor], grad_ckpt: bool, gpu: "Gpu",
                   paged: OptimizerSpec, counterpart: OptimizerSpec, paged_state: int) -> Pressure:
    """Measure the counterpart's step, then both steps with all but the headroom of the device
    taken by a ballast tensor. Paging is the claim: unified memory lets the driver move the paged
    state to the host when the device is short, where the counterpart runs out of memory."""
    unconstrained = step_phase_memory(base, lora_config, batch, grad_ckpt, gpu, counterpart)
    if unconstrained.oom or unconstrained.peak_allocated is None:
        return Pressure(unconstrained)
    headroom = unconstrained.peak_allocated - unconstrained.base_allocated - paged_state // 2
    build.free_memory(gpu)
    free = gpu.free()
    ballast = torch.empty(free - min(max(headroom, 0), free), dtype=torch.uint8, device=gpu.placement)
    try:
        non_paged = step_phase_memory(base, lora_config, batch, grad_ckpt, gpu, counterpart)
        paged_step = step_phase_memory(base, lora_config, batch, grad_ckpt, gpu, paged)
    finally:
        del ballast
        build.free_memory(gpu)
    return Pressure(unconstrained, headroom, non_paged, paged_step)


def drop_frames(error: BaseException) -> None:
    """Cut an error (and those it was raised from) loose from its traceback: the frames hold the
    failed step's tensors, and whoever keeps the error (a logger, a test) would keep them alive."""
    for link in list(error_chain(error)):
        link.__traceback__ = None


def phase_peak(gpu: "Gpu", run: Any) -> int:
    """The peak allocated bytes while ``run`` runs: reset first, read after."""
    gpu.reset_peak()
    run()
    return gpu.peak_allocated()
