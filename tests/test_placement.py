"""A worker of several GPUs, without a GPU: which bases are spread and how (accelerate's map over
the real architectures on the meta device), that a spread base computes what an unspread one
does, and that memory is read on every GPU the worker owns and reported per GPU and in total."""

from __future__ import annotations

import peft
import pytest
import torch
from accelerate.utils import compute_module_sizes

from fakes import FakeCudaRuntime, fake_gpu
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS, WorkloadSpec
from pytest_lora.measure import memory
from pytest_lora.measure.train import synthetic_batch
from pytest_lora.models import build, placement, registry

GIB = 2**30


@pytest.fixture(scope="module")
def llama_1b():
    """Llama 3.2 1B on the meta device: 1,235,814,400 parameters, 2.47 GB in bf16 (tied embeddings)."""
    return build.build_meta(registry.load_config_dict("llama-3.2-1b"))


def test_the_weight_bytes_are_the_parameters_in_the_dtype(llama_1b):
    parameters = sum(p.numel() for p in llama_1b.parameters())
    assert parameters == 1_235_814_400
    buffers = sum(b.numel() * (2 if b.is_floating_point() else b.element_size()) for b in llama_1b.buffers())
    assert placement.weight_bytes(llama_1b, torch.bfloat16) == 2 * parameters + buffers
    assert placement.weight_bytes(llama_1b, torch.float32) == 4 * parameters + 2 * buffers


def test_a_base_that_fits_on_one_gpu_is_not_spread(llama_1b):
    assert placement.device_map(llama_1b, {0: 80 * GIB, 1: 80 * GIB}, torch.bfloat16) is None
    assert placement.device_map(llama_1b, {0: 2 * GIB}, torch.bfloat16) is None  # one GPU: nothing to spread over


def test_a_base_too_large_for_one_gpu_is_spread_in_whole_blocks_within_each_budget(llama_1b):
    capacities = {0: 2 * GIB, 1: 2 * GIB}  # 1.6 GiB each for weights: 2.3 GiB of bf16 weights need both
    mapping = placement.device_map(llama_1b, capacities, torch.bfloat16)
    assert set(mapping.values()) == {0, 1}
    layers = [name for name in mapping if name.startswith("model.layers.")]
    assert all(name.count(".") == 2 for name in layers)  # a decoder layer is never split (_no_split_modules)
    sizes = compute_module_sizes(llama_1b, dtype=torch.bfloat16)
    for index, budget in placement.budgets(capacities).items():
        assert sum(sizes[name] for name, device in mapping.items() if device == index) <= budget
    assert sum(sizes[name] for name in mapping) == sizes[""]  # every weight has a place, once


def test_a_base_larger_than_every_gpu_is_out_of_memory_before_anything_is_built(llama_1b):
    from pytest_lora.measure.gpu import is_out_of_memory

    with pytest.raises(torch.OutOfMemoryError, match=r"need 2\.3 GiB in torch.bfloat16; the worker's 2 GPUs hold 1\.6 GiB") as error:
        placement.device_map(llama_1b, {0: GIB, 1: GIB}, torch.bfloat16)
    assert is_out_of_memory(error.value)  # recorded as oom, and the run goes on


def block_map(model) -> dict[str, object]:
    """Every top-level block of a Llama on its own entry, all on the CPU: the first half spelt
    ``"cpu"``, the rest ``torch.device("cpu")``, which accelerate counts as two devices, so it
    dispatches with its hooks as over two GPUs (a spread without GPUs)."""
    layers = len(model.model.layers)
    return {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" if i < layers // 2 else torch.device("cpu") for i in range(layers)},
            "model.norm": torch.device("cpu"), "model.rotary_emb": "cpu", "lm_head": torch.device("cpu")}


def test_a_spread_base_computes_what_the_one_built_on_one_device_does(monkeypatch):
    spec = resolve_model("llama-3.2-1b-tiny", "test")
    plain = build.build_base(spec, QUANTIZATIONS["fp32"], "cpu")
    maps = []
    monkeypatch.setattr(placement, "device_map", lambda meta, capacities, dtype: maps.append(capacities) or block_map(plain))
    spread = build.build_base(spec, QUANTIZATIONS["fp32"], "cpu", capacities={0: GIB, 1: GIB})
    assert maps == [{0: GIB, 1: GIB}]
    assert all(hasattr(spread.model.layers[i], "_hf_hook") for i in range(len(spread.model.layers)))  # accelerate's hooks
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(spread(ids).logits, plain(ids).logits)


def test_a_checkpoint_is_loaded_onto_the_map(tmp_path, monkeypatch):
    source = build.instantiate(registry.load_config_dict("llama-3.2-1b-tiny"), "cpu", torch.bfloat16)
    source.save_pretrained(tmp_path)
    monkeypatch.setattr(placement, "device_map", lambda meta, capacities, dtype: block_map(source))
    loaded = build.build_base(resolve_model(str(tmp_path), "--lora-models"), QUANTIZATIONS["none"], "cpu", capacities={0: GIB, 1: GIB})
    assert loaded.hf_device_map == block_map(source)  # transformers placed each block where the map says
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, source.model.layers[1].mlp.up_proj.weight)


def test_a_gpu_of_several_devices_reads_and_resets_every_one():
    runtime = FakeCudaRuntime(names=("NVIDIA H200",) * 3, capacity=8 * GIB)
    gpu = fake_gpu(runtime, indices=(0, 2))
    runtime.stats[0].allocated, runtime.stats[1].allocated, runtime.stats[2].allocated = 100, 7, 30
    runtime.stats[0].peak_allocated, runtime.stats[2].peak_allocated = 150, 40
    assert gpu.allocated() == 130  # device 1 is not the worker's
    assert gpu.per_device("max_memory_allocated") == {0: 150, 2: 40} and gpu.peak_allocated() == 190
    assert gpu.capacities() == {0: 8 * GIB, 2: 8 * GIB}
    runtime.calls.clear()
    gpu.reset_peak()
    assert [call for call in runtime.calls if call[0] == "reset_peak_memory_stats"] == [("reset_peak_memory_stats", 0), ("reset_peak_memory_stats", 2)]
    assert gpu.peak_allocated() == 130
    # NVML: each device's used bytes (context, other processes, this process's reserved), summed
    nvml = gpu._nvml
    expected = sum(nvml.context + (index + 1) * 100 * 2**20 + runtime.stats[index].reserved for index in (0, 2))
    assert gpu.device_used() == expected
    assert fake_gpu(runtime).indices == (0,)  # one device unless told: the current one


def test_a_step_over_several_gpus_records_each_ones_peak():
    runtime = FakeCudaRuntime()
    with runtime.device:
        base = build.build_base(resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS["fp32"], "cpu")
    gpu = fake_gpu(runtime, indices=(0, 1))
    batch = synthetic_batch(256, WorkloadSpec(16, 2), "cpu", 0)
    with runtime.device:
        phases = memory.step_phase_memory(base, peft.LoraConfig(r=4, target_modules="all-linear"), batch, False, gpu)
    # the fake allocates on the current device only: the step's peak is all on cuda:0
    assert phases.device_peaks == {0: phases.peak_allocated, 1: 0}
    one = memory.step_phase_memory(base, peft.LoraConfig(r=4, target_modules="all-linear"), batch, False, fake_gpu(FakeCudaRuntime()))
    assert one.device_peaks is None  # one GPU: its peak is the total
