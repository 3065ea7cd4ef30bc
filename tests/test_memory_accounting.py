"""Memory accounting: storage against bitsandbytes' own serialised tensors, the analytic weights
against the QLoRA paper's bits per weight and against the dtype arithmetic of published shapes,
the training state against AdamW's real state, the activation model against the tensors
autograd saves, and bases that are released."""

from __future__ import annotations

import gc

import peft
import pytest
import torch

from fakes import FakeCudaRuntime, fake_gpu
from pytest_lora import references
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS, WorkloadSpec
from pytest_lora.measure import memory
from pytest_lora.models import storage
from pytest_lora.measure.train import TrainStep, synthetic_batch
from pytest_lora.models import adapters, build, registry

FORMATS = ["none", "fp32", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq"]


def serialised_bytes(model: torch.nn.Module) -> int:
    """What bitsandbytes and torch write for the model: state_dict tensors, each storage once,
    without bitsandbytes' JSON headers and format flags, plus the double-quantization offset that
    bitsandbytes keeps as a tensor but serialises inside that header, plus non-persistent buffers."""
    seen = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if ".quant_state.bitsandbytes__" in key or key.endswith("weight_format"):
            continue
        seen.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
    offsets = sum(4 for m in model.modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "nested", False))
    persistent = set(model.state_dict())
    transient = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name not in persistent)
    return sum(seen.values()) + offsets + transient


@pytest.mark.parametrize("quant", FORMATS)
@pytest.mark.parametrize("name", ["llama-3.2-1b-tiny", "gpt2-medium-tiny", "flan-t5-base-tiny"])
def test_storage_matches_what_bitsandbytes_serialises(name, quant):
    base = build.build_base(resolve_model(name, "test"), QUANTIZATIONS[quant], "cpu")
    assert memory.storage_bytes(base) == serialised_bytes(base)
    assert memory.storage_bytes(base) == memory.analytic_weight_bytes(registry.load_config_dict(name), QUANTIZATIONS[quant])


def test_int8_scales_are_counted_after_bitsandbytes_moves_them():
    base = build.build_base(resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS["int8"], "cpu")
    before = memory.storage_bytes(base)
    with torch.no_grad():
        base(input_ids=torch.randint(0, 256, (1, 8)))
    assert base.model.layers[0].self_attn.q_proj.weight.SCB is None  # now in the layer's matmul state
    assert memory.storage_bytes(base) == before


@pytest.mark.parametrize("quant, bits", [("nf4", 0.5), ("fp4", 0.5), ("nf4-dq", 8 / 64 + 32 / (64 * 256))])
def test_four_bit_constants_cost_what_qlora_says(quant, bits):
    """QLoRA §3: 32/64 = 0.5 bits per weight for the block absmax; 0.127 with double quantization."""
    spec = QUANTIZATIONS[quant]
    weights = 4096 * 4096
    tables = 4 * storage.CODE_4BIT + ((4 * storage.CODE_NESTED + 4) if spec.double_quant else 0)
    extra = storage.four_bit_bytes(weights, spec) - weights // 2 - tables
    assert extra * 8 / weights == pytest.approx(bits, rel=1e-12)


def test_published_shapes_in_sixteen_bits_are_two_bytes_a_parameter():
    config = registry.load_config_dict("llama-3.1-8b")
    rotary = 2 * 64 * 4  # fp32 inverse frequencies of head_dim / 2, and their unscaled original
    assert memory.analytic_weight_bytes(config, QUANTIZATIONS["bf16"]) == 2 * 8_030_261_248 + rotary


def test_int8_is_a_byte_a_weight_plus_a_scale_per_row():
    config = registry.load_config_dict("llama-2-7b")
    h, inter, layers, vocab = 4096, 11008, 32, 32000
    linear = layers * (4 * h * h + 3 * h * inter)
    rows = layers * (4 * h + 2 * inter + h)
    sixteen_bit = 2 * (2 * vocab * h + layers * 2 * h + h)  # embeddings, lm_head, norms in fp16
    assert memory.analytic_weight_bytes(config, QUANTIZATIONS["int8"]) == linear + 4 * rows + sixteen_bit + 2 * 64 * 4


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_training_state_is_sixteen_bytes_a_parameter_and_four_a_tensor(quant, dora):
    spec = resolve_model("llama-3.2-1b-tiny", "test")
    base = build.build_base(spec, QUANTIZATIONS[quant], "cpu")
    config = peft.LoraConfig(r=4, target_modules="all-linear", use_dora=dora)
    with adapters.attached(base, config) as model:
        step = TrainStep(model)
        step.run(synthetic_batch(256, WorkloadSpec(16, 2), "cpu", 0))
        step.forward(synthetic_batch(256, WorkloadSpec(16, 2), "cpu", 1))
        step.backward()  # gradients present again, and AdamW state from the first step
        measured = memory.training_state_bytes(model, step.optimizer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tensors = sum(1 for p in model.parameters() if p.requires_grad)
        step.close()
    assert measured == memory.TrainingState(4 * trainable, 4 * trainable, 8 * trainable + 4 * tensors)
    estimate = memory.analytic_step(spec.config_dict(), QUANTIZATIONS[quant], peft.LoraConfig(r=4, target_modules="all-linear", use_dora=dora), WorkloadSpec(16, 2))
    assert estimate.training == measured


def test_activation_model_scales_with_tokens_and_checkpointing_cuts_it():
    config = registry.load_config_dict("llama-3.1-8b")
    lora = peft.LoraConfig(r=16, target_modules="all-linear")
    one = memory.analytic_step(config, QUANTIZATIONS["nf4"], lora, WorkloadSpec(2048, 1)).activations
    two = memory.analytic_step(config, QUANTIZATIONS["nf4"], lora, WorkloadSpec(2048, 2)).activations
    ckpt = memory.analytic_step(config, QUANTIZATIONS["nf4"], lora, WorkloadSpec(2048, 2, grad_ckpt=True)).activations
    assert two == 2 * one
    assert ckpt < two / 5
    assert memory.analytic_step(registry.load_config_dict("flan-t5-xxl"), QUANTIZATIONS["nf4"], lora, WorkloadSpec(512, 1)).total is None


RELEASE_SUITE = """
import weakref
import pytest

pytestmark = pytest.mark.lora_memory


def test_uses_base(base_model, lora_model, tracker):
    tracker.bases.append(weakref.ref(base_model))
    tracker.adapted.append(weakref.ref(lora_model))
"""


class Tracker:
    """Handed to the inner run as a plugin: its ``tracker`` fixture collects weak references."""

    def __init__(self):
        self.bases, self.adapted = [], []

    @pytest.fixture(name="tracker")
    def tracker_fixture(self):
        return self


def test_bases_and_adapters_are_released(pytester, suite):
    """After N configs nothing of the earlier ones is alive (the CPU form of the GPU leak check)."""
    suite(RELEASE_SUITE, name="test_release.py")
    tracker = Tracker()
    args = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny,opt-125m-tiny", "--lora-quant=none,nf4", "--lora-ranks=4,8", "--lora-targets=q_proj")
    pytester.inline_run(*args, plugins=[tracker]).assertoutcome(passed=8)
    gc.collect()
    assert len(tracker.bases) == 8 and len(tracker.adapted) == 8
    assert [ref() for ref in tracker.bases + tracker.adapted] == [None] * 16


def test_no_gpu_means_the_gpu_part_is_skipped_with_a_reason(pytester, suite):
    suite((__import__("pathlib").Path(__file__).parents[1] / "suites" / "test_memory.py").read_text(), name="test_memory_copy.py")
    result = pytester.runpytest("--lora-bench", "--lora-device=cpu", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=nf4", "--lora-ranks=4", "--lora-targets=q_proj", "-rs")
    result.assert_outcomes(passed=3 + 5, skipped=2)  # weights, step, the 8-bit step and the five published shapes; peak and pressure
    result.stdout.fnmatch_lines(["SKIPPED*needs a CUDA device: allocator peaks and NVML bytes are GPU measurements*"])


@pytest.mark.parametrize("figure", references.H200, ids=lambda f: "-".join(map(str, f.key)))
def test_analytic_step_agrees_with_peaks_measured_on_an_h200(figure):
    """Peak allocated over LoRA r=16 all-linear training steps at sequence 2048, measured with
    plain transformers + peft + bitsandbytes on an H200 (shared/device/README.md). Checkpointing
    is modelled coarsely (one layer rebuilt at a time), hence the wider tolerance."""
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    workload = WorkloadSpec(2048, figure.batch, figure.grad_ckpt)
    estimate = memory.analytic_step(registry.load_config_dict(figure.model), QUANTIZATIONS[figure.quant], lora, workload)
    assert estimate.total / 2**30 == pytest.approx(figure.peak_allocated_gib, rel=0.15 if figure.grad_ckpt else 0.05)


def test_analytic_weights_of_the_8b_shape_beside_the_h200():
    """bf16 weights: 14.96 GiB allocated on the H200, 2 bytes a parameter here."""
    config = registry.load_config_dict("llama-3.1-8b")
    assert memory.analytic_weight_bytes(config, QUANTIZATIONS["bf16"]) / 2**30 == pytest.approx(14.96, abs=0.005)


@pytest.mark.parametrize(
    "error",
    [None, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")],
    ids=["fits", "torch-oom", "cublas-oom"],
)
def test_the_phases_of_a_step_are_measured_and_everything_is_released(monkeypatch, error):
    runtime = FakeCudaRuntime()
    with runtime.device:
        base = build.build_base(resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS["fp32"], "cpu")
    state = adapters.BaseState.of(base)
    backward = TrainStep.backward
    calls = []

    def runs_out_in_the_measured_step(self):
        calls.append(1)
        if len(calls) == 2:  # the first backward is the unmeasured step that creates AdamW's state
            raise error
        backward(self)

    if error is not None:
        monkeypatch.setattr(TrainStep, "backward", runs_out_in_the_measured_step)
    batch = synthetic_batch(256, WorkloadSpec(16, 2), "cpu", 0)
    gpu = fake_gpu(runtime)
    with runtime.device:
        phases = memory.step_phase_memory(base, peft.LoraConfig(r=4, target_modules="all-linear"), batch, False, gpu)
    assert phases.base_allocated >= memory.storage_bytes(base)
    # NVML's bytes of the model's device (cuda:0, NVML's device 1): context + its other processes
    # (100 MiB) + this process's reserved bytes, which only grow within the step
    assert phases.device_used == gpu._nvml.context + 100 * 2**20 + phases.peak_reserved
    assert phases.adapter_allocated > phases.base_allocated
    assert phases.forward_peak >= phases.forward_allocated > phases.adapter_allocated
    if error is not None:
        assert phases.oom == str(error)
        assert phases.backward_peak is None and phases.peak_allocated >= phases.forward_peak
    else:
        assert phases.oom is None and phases.after_step_allocated > phases.adapter_allocated  # AdamW state
        assert phases.peak_allocated == max(phases.forward_peak, phases.backward_peak, phases.optimizer_peak)
    assert phases.released_allocated == phases.base_allocated  # adapter, activations, optimizer and the error's frames gone
    assert state.differences(base) == []


def test_an_error_that_is_not_out_of_memory_is_raised(monkeypatch):
    base = build.build_base(resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS["fp32"], "cpu")

    def broken(self):
        raise ValueError("a bug, not a full device")

    monkeypatch.setattr(TrainStep, "backward", broken)
    with pytest.raises(ValueError, match="a bug"):
        memory.step_phase_memory(base, peft.LoraConfig(r=4, target_modules=["q_proj"]), synthetic_batch(256, WorkloadSpec(16, 2), "cpu", 0), False, fake_gpu())
