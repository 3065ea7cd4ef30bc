"""Memory of a LoRA / QLoRA training step, measured, and set beside an analytic model.

What is measured, on every device. The bytes the base's weights occupy (``weight_bytes``): every
parameter and buffer, with each format's quantization constants (bitsandbytes' block absmax and
code tables, LLM.int8's row scales, the tensors inside torchao's weights, HQQ's scales and zero
points), each storage once.
One training step (forward, backward, optimizer step) on ``batch`` x ``seq_len`` synthetic tokens,
with each optimizer of the matrix (AdamW; bitsandbytes' 8-bit, paged 8-bit and paged 32-bit
AdamW): the activations autograd saves for backward (``activation_bytes``, read through
saved-tensor hooks), and the adapter, its gradients and the optimizer's state (summed from the
tensors, each storage once).

What is measured on a GPU. torch's allocated bytes after each phase (base loaded, adapter added,
forward, backward, optimizer step) and the peak within each, with peaks reset between phases,
in a steady-state step (the second: AdamW's state exists); the peak reserved bytes, with the
cache emptied before the step; NVML's used bytes for the device, sampled after each phase, which
include the CUDA context torch does not see. The build of the base is not part of the step's peak,
and ``peak_over_analytic`` sets the peak less what the process held before the base was built
(cuBLAS's workspaces) against the analytic step. After the step, the
adapter, gradients and optimizer are dropped and allocated memory must be back where it was with
the base alone; a base left behind by the previous config shows as growth before the next build.
Both are failures. A config that runs out of memory is recorded as ``oom`` with the peak reached.

Against which reference. The analytic model of ``pytest_lora.measure.memory``: weights from the
architecture and the format's own arithmetic (``Format.tensor_bytes``; NF4 / FP4: half a byte
per weight and a 4-byte absmax per 64 weights; double quantization: 8/64 + 32/(64 x 256) = 0.127
extra bits per weight, QLoRA §3; LLM.int8: a byte per weight and a scale per row; torchao int8
and HQQ as their layouts store them) must agree with ``weight_bytes`` to 0.1%.
The adapter and gradients must equal 8 bytes per trainable parameter, and the optimizer's state its
closed form (``measure.optimizers``), exactly: AdamW two fp32 moments per parameter and a 4-byte
step per tensor; bitsandbytes' 8-bit AdamW a uint8 per moment and parameter, an fp32 absmax per
moment and block (the block size read from bitsandbytes) and its two 256-entry fp32 maps, with fp32
moments for tensors under its ``min_8bit_size``; its paged 32-bit AdamW two fp32 moments. A paged
optimizer's state in CUDA unified memory (``paged_state_bytes``) is outside torch's allocator, so
the GPU peaks do not hold it; on the CPU bitsandbytes falls back to ordinary tensors, and the record
says so instead of calling its figures paged. Under pressure (GPU, paged optimizers): the step of
the non-paged counterpart (8-bit or fp32 AdamW) is measured on the free device, then the device is
filled with a ballast tensor until only that step's need, less half of the state the paged
optimizer pages, is free, and both steps run there: their peaks, and which ran out of memory. Activations and the whole step are reported as measured / analytic ratios.

Figures to hold beside these (H200, plain transformers + peft + bitsandbytes, LoRA r=16 on all
linear layers, batch 2 x 2048): Llama-3-8B shape, nf4, 47.5 GiB peak allocated in the step with
5.37 GiB of weights; bf16 57.1 GiB; nf4 with gradient checkpointing 12.5 GiB. QLoRA §2: a 4-bit
7B LLaMA base takes 5,048 MB.
"""

from __future__ import annotations

import pytest

from pytest_lora.specs import OPTIMIZERS, QUANTIZATIONS, WorkloadSpec
from pytest_lora import references
from pytest_lora.models import registry

from pytest_lora.lazy import lazy_import

torch = lazy_import("torch")
peft = lazy_import("peft")
memory = lazy_import("pytest_lora.measure.memory")
optimizers = lazy_import("pytest_lora.measure.optimizers")
params = lazy_import("pytest_lora.measure.params")
train = lazy_import("pytest_lora.measure.train")
build = lazy_import("pytest_lora.models.build")

pytestmark = pytest.mark.lora_memory

LEAK_TOLERANCE = 64 * 2**20  # cuBLAS workspaces and similar caches that live for the process


def test_weight_storage(base_model, model_spec, quant_spec, lora_bench):
    """The bytes the base occupies equal the format's arithmetic on the architecture."""
    measured = memory.storage_bytes(base_model)
    analytic = memory.analytic_weight_bytes(model_spec.config_dict(), quant_spec)
    lora_bench.record("weight_bytes", measured, "bytes")
    lora_bench.record("analytic_weight_bytes", analytic, "bytes")
    assert abs(measured - analytic) <= 0.001 * analytic, f"measured {measured:,d} B, analytic {analytic:,d} B"


def test_step_memory(lora_model, lora_config, lora_batch, model_spec, quant_spec, workload_spec, optimizer_spec, lora_device, lora_bench):
    """One step: activations kept for backward, and the adapter's training state, on any device."""
    step_memory(lora_model, lora_config, lora_batch, model_spec, quant_spec, workload_spec, optimizer_spec, lora_device, lora_bench)


@pytest.mark.lora_matrix(ranks=[64], targets=["default"], optimizers=["adamw8bit"], quant=["bf16"])
def test_step_memory_with_an_8bit_state(model_spec, quant_spec, lora_spec, workload_spec, optimizer_spec, lora_device, lora_gpu, lora_bench,
                                        request):
    """The step with 8-bit AdamW at rank 64, where a tiny model's adapter tensors (64 x 64 and up)
    reach bitsandbytes' ``min_8bit_size`` (4,096 elements): 8-bit moments, against the closed
    form. At the matrix's rank 16 every tensor of the tiny models is smaller, and the state is
    fp32. Real shapes reach it at any rank (``test_step_memory``): on a GPU this is skipped before
    its base is built."""
    if lora_gpu is not None:
        pytest.skip("real shapes' adapter tensors reach min_8bit_size at the matrix's own ranks: test_step_memory has them")
    fixtures = [request.getfixturevalue(name) for name in ("lora_model", "lora_config", "lora_batch")]
    step_memory(*fixtures, model_spec, quant_spec, workload_spec, optimizer_spec, lora_device, lora_bench)
    assert lora_bench.metrics["optimizer_8bit_share"] > 0, "no tensor of this adapter reached min_8bit_size"


def step_memory(lora_model, lora_config, lora_batch, model_spec, quant_spec, workload_spec, optimizer_spec, lora_device, lora_bench) -> None:
    config = model_spec.config_dict()
    # as this device runs it: the CPU's dropout keeps fp32 noise where a GPU keeps a bool mask
    device_type = "cpu" if str(lora_device).startswith("cpu") else "cuda"
    estimate = memory.analytic_step(config, quant_spec, lora_config, workload_spec, optimizer_spec, device=device_type)
    batch = lora_batch
    step = train.TrainStep(lora_model, optimizer=optimizer_spec)
    try:
        with train.checkpointing(lora_model, workload_spec.grad_ckpt):
            with memory.saved_activations(lora_model) as saved:
                step.forward(batch)
            activations = sum(saved.values())
            step.backward()
            step.optimizer_step()
            measured = memory.training_state_bytes(lora_model, step.optimizer)
            paged = optimizers.paged_bytes(step.optimizer)
            eight_bit = optimizers.eight_bit_share(step.optimizer)
    finally:
        step.close()

    # Checkpointed layers save through their own hooks: only the unsaved remainder would show.
    activation_bytes = None if workload_spec.grad_ckpt else activations
    lora_bench.record("activation_bytes", activation_bytes, "bytes")
    lora_bench.record("analytic_activation_bytes", estimate.activations, "bytes")
    if activation_bytes is not None and estimate.activations:
        lora_bench.record("activation_ratio", activation_bytes / estimate.activations, "measured/analytic")
    lora_bench.record("adapter_bytes", measured.parameters, "bytes")
    lora_bench.record("gradient_bytes", measured.gradients, "bytes")
    lora_bench.record("optimizer_state_bytes", measured.optimizer, "bytes")
    lora_bench.record("analytic_optimizer_state_bytes", estimate.training.optimizer, "bytes")
    sizes = params.trainable_tensor_sizes(build.build_meta(config), lora_config)
    lora_bench.record("optimizer_8bit_share", eight_bit, "share of trainable parameters")
    lora_bench.check(eight_bit == optimizers.analytic_eight_bit_share(optimizer_spec, sizes),
                     f"8-bit share of the state {eight_bit}, closed form {optimizers.analytic_eight_bit_share(optimizer_spec, sizes)}")
    record_paging(lora_bench, step.built, paged, optimizers.analytic_paged_bytes(optimizer_spec, sizes, lora_device))
    lora_bench.record("analytic_bytes", estimate.total, "bytes")
    assert measured == estimate.training, f"measured {measured}, analytic {estimate.training}"


def record_paging(lora_bench, built, paged: int, analytic: int) -> None:
    """How much of the state is in unified memory; where a paged optimizer fell back, a warning
    says so (its figures are the non-paged optimizer's)."""
    if not built.spec.paged:
        return
    lora_bench.record("paged_state_bytes", paged, "bytes")
    lora_bench.record("analytic_paged_state_bytes", analytic, "bytes")
    if built.fell_back:
        lora_bench.warn(built.fell_back)
    lora_bench.check(paged == analytic, f"{paged:,d} B of optimizer state paged, {analytic:,d} B expected")


def test_step_peak_memory(base_model, base_build, lora_config, lora_batch, model_spec, quant_spec, workload_spec, optimizer_spec, lora_gpu, lora_bench):
    """GPU: allocated, reserved and device bytes through one step; released afterwards."""
    if lora_gpu is None:
        pytest.skip("needs a CUDA device: allocator peaks and NVML bytes are GPU measurements; "
                    "weights, activations and training state are measured by the other memory tests")
    config = model_spec.config_dict()
    estimate = memory.analytic_step(config, quant_spec, lora_config, workload_spec, optimizer_spec)
    phases = memory.step_phase_memory(base_model, lora_config, lora_batch, workload_spec.grad_ckpt, lora_gpu, optimizer_spec)

    for name in ("base_allocated", "adapter_allocated", "forward_peak", "forward_allocated", "backward_peak", "optimizer_peak", "after_step_allocated"):
        lora_bench.record(f"{name}_bytes", getattr(phases, name), "bytes")
    baseline = base_build.allocated_before  # the process without this base: cuBLAS workspaces, ...
    lora_bench.record("process_baseline_bytes", baseline, "bytes")
    lora_bench.record("peak_allocated_bytes", phases.peak_allocated, "bytes")
    for index, peak in (phases.device_peaks or {}).items():  # a base spread over the worker's GPUs
        lora_bench.record(f"peak_allocated_bytes_cuda{index}", peak, "bytes")
    lora_bench.record("peak_reserved_bytes", phases.peak_reserved, "bytes")
    lora_bench.record("peak_device_bytes", phases.device_used, "bytes")
    if optimizer_spec.paged:  # in unified memory: outside the allocator's peaks, inside NVML's bytes while resident
        lora_bench.record("paged_state_bytes", phases.paged_state, "bytes")
    lora_bench.record("analytic_bytes", estimate.total, "bytes")
    if estimate.total and phases.peak_allocated and not phases.oom:
        lora_bench.record("peak_over_analytic", (phases.peak_allocated - baseline) / estimate.total, "measured/analytic")
    leaked = phases.released_allocated - phases.base_allocated
    lora_bench.record("leaked_bytes", leaked, "bytes")
    growth = base_build.allocated_before - base_build.allocated_before_first
    lora_bench.record("growth_between_bases_bytes", growth, "bytes")
    if phases.oom:
        raise torch.OutOfMemoryError(phases.oom)
    assert leaked <= LEAK_TOLERANCE, f"{leaked:,d} B still allocated after the step was released"
    assert growth <= LEAK_TOLERANCE, f"{growth:,d} B more allocated before this base's build than before the first"


NON_PAGED = {"paged_adamw8bit": "adamw8bit", "paged_adamw": "adamw"}


def test_paged_optimizer_under_pressure(base_model, lora_config, lora_batch, model_spec, workload_spec, optimizer_spec, lora_gpu, lora_bench):
    """GPU, paged optimizers: the step with the device filled to just under what the non-paged
    counterpart's step needs (less half the state the paged optimizer pages), both steps recorded.
    What paging is for shows when the non-paged step runs out of memory there and the paged one
    does not (``pressure_conclusive``); both fitting or both out of memory is inconclusive, and
    says so; the paged step out of memory alone fails the test."""
    if lora_gpu is None:
        pytest.skip("needs a CUDA device: a paged optimizer keeps its state in CUDA unified memory")
    if not optimizer_spec.paged:
        pytest.skip(f"{optimizer_spec.name} is not a paged optimizer")
    counterpart = OPTIMIZERS[NON_PAGED[optimizer_spec.name]]
    sizes = params.trainable_tensor_sizes(build.build_meta(model_spec.config_dict()), lora_config)
    paged_state = optimizers.analytic_paged_bytes(optimizer_spec, sizes, "cuda")
    pressure = memory.under_pressure(base_model, lora_config, lora_batch, workload_spec.grad_ckpt, lora_gpu, optimizer_spec, counterpart, paged_state)
    lora_bench.record("analytic_paged_state_bytes", paged_state, "bytes")
    lora_bench.record("unconstrained_peak_allocated_bytes", pressure.unconstrained.peak_allocated, "bytes")
    if pressure.headroom is None:
        raise torch.OutOfMemoryError(pressure.unconstrained.oom)
    lora_bench.record("pressure_headroom_bytes", pressure.headroom, "bytes")
    for name, phases in (("non_paged", pressure.non_paged), ("paged", pressure.paged)):
        lora_bench.record(f"{name}_under_pressure_peak_allocated_bytes", phases.peak_allocated, "bytes")
        lora_bench.record(f"{name}_under_pressure_oom", int(phases.oom is not None), "1 if out of memory")
    lora_bench.record("paged_state_bytes", pressure.paged.paged_state, "bytes")
    conclusive, wrong = pressure.verdict()
    lora_bench.record("pressure_conclusive", int(conclusive), "1 if only the non-paged step ran out of memory")
    if not conclusive and wrong is None:
        both = "ran out of memory" if pressure.paged.oom is not None else "fit"
        lora_bench.warn(f"inconclusive: both steps {both} at this headroom ({paged_state} bytes of state to page)")
    assert wrong is None, wrong


GIB = 2**30


@pytest.mark.parametrize("figure", references.H200, ids=lambda f: f"{f.model}-{f.quant}-b{f.batch}{'-ckpt' if f.grad_ckpt else ''}")
def test_analytic_step_of_published_shapes(figure, lora_bench):
    """The analytic model for the real shapes, beside peaks measured on an H200 (sequence 2048)."""
    workload = WorkloadSpec(seq_len=2048, batch=figure.batch, grad_ckpt=figure.grad_ckpt)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    lora_bench.describe(model=figure.model, quant=figure.quant, lora=lora, workload=workload)
    estimate = memory.analytic_step(registry.load_config_dict(figure.model), QUANTIZATIONS[figure.quant], lora, workload)
    reference = int(figure.peak_allocated_gib * GIB)
    lora_bench.record("analytic_weight_bytes", estimate.weights, "bytes")
    lora_bench.record("analytic_activation_bytes", estimate.activations, "bytes")
    lora_bench.record("analytic_bytes", estimate.total, "bytes")
    lora_bench.record("reference_peak_bytes", reference, "bytes")
    lora_bench.record("reference_over_analytic", reference / estimate.total, "measured/analytic")
