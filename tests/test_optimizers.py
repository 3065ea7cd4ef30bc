"""The optimizer dimension: each optimizer's state against its closed form, bitsandbytes' block
size read rather than assumed, the paged optimizers' fallback on the CPU said in the record, and
the memory suite failing on a planted wrong formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch

from pytest_lora.matrix import build, mapping_layer
from pytest_lora.measure import memory, optimizers, params
from pytest_lora.measure.train import TrainStep, synthetic_batch
from pytest_lora.models import adapters
from pytest_lora.models import build as build_model
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import OPTIMIZERS, QUANTIZATIONS, MatrixError, WorkloadSpec

SUITES = Path(__file__).parents[1] / "suites"

# Around bitsandbytes' min_8bit_size (4096) and its block size (256): fp32 and 8-bit state, full
# and partial last blocks.
SIZES = (100, 4095, 4096, 5000, 70_000, 257 * 256 + 1)


def stepped(spec, sizes=SIZES):
    parameters = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    built = optimizers.make(spec, parameters, lr=1e-3)
    sum(p.sum() for p in parameters).backward()
    with optimizers.quiet_fallback():
        built.optimizer.step()
    return built


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_bytes_equal_the_closed_form(name):
    built = stepped(OPTIMIZERS[name])
    assert optimizers.state_bytes(built.optimizer) == optimizers.analytic_state_bytes(OPTIMIZERS[name], SIZES)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_8bit_share_of_the_state_equals_the_closed_form(name):
    """The parameters whose moments are uint8, read off the stepped optimizer, against the sizes:
    for the 8-bit optimizers, all but the tensors under 4096 elements (100 and 4095 of SIZES)."""
    built = stepped(OPTIMIZERS[name])
    share = optimizers.eight_bit_share(built.optimizer)
    assert share == optimizers.analytic_eight_bit_share(OPTIMIZERS[name], SIZES)
    assert share == ((sum(SIZES) - 100 - 4095) / sum(SIZES) if OPTIMIZERS[name].bits == 8 else 0.0)


def test_an_optimizer_with_no_state_yet_has_no_8bit_share():
    built = optimizers.make(OPTIMIZERS["adamw8bit"], [torch.nn.Parameter(torch.randn(8192))], lr=1e-3)
    assert optimizers.eight_bit_share(built.optimizer) == 0.0 == optimizers.analytic_eight_bit_share(OPTIMIZERS["adamw8bit"], [])
    assert optimizers.analytic_eight_bit_share(OPTIMIZERS["adamw8bit"], [4095]) == 0.0  # an fp32 state under an 8-bit name


def test_the_closed_forms_by_hand():
    """AdamW: 8 bytes a parameter and a 4-byte step a tensor. 8-bit: tensors under 4096 elements
    in fp32; 2 bytes a parameter, 2 x 4 bytes a block of 256, and two 256-entry fp32 maps once."""
    small, large = 4095, 5000
    assert optimizers.analytic_state_bytes(OPTIMIZERS["adamw"], [small, large]) == 8 * (small + large) + 2 * 4
    assert optimizers.analytic_state_bytes(OPTIMIZERS["paged_adamw"], [small, large]) == 8 * (small + large)
    blocks = math.ceil(large / 256)
    eight_bit = 8 * small + 2 * large + 2 * 4 * blocks + 2 * 256 * 4
    assert optimizers.analytic_state_bytes(OPTIMIZERS["adamw8bit"], [small, large]) == eight_bit
    assert optimizers.analytic_state_bytes(OPTIMIZERS["paged_adamw8bit"], [small, large]) == eight_bit
    assert optimizers.analytic_state_bytes(OPTIMIZERS["adamw8bit"], [small]) == 8 * small  # no maps without an 8-bit tensor


def test_the_block_size_is_read_from_bitsandbytes():
    """The probe reads bitsandbytes' own block size (256 since 0.45; 2048 before): the closed form
    with another block size misses the absmax bytes of the installed library."""
    assert optimizers.block_size() == 256
    built = stepped(OPTIMIZERS["adamw8bit"])
    blocks = {n: built.optimizer.state[p]["absmax1"].numel() for p, n in zip(built.optimizer.param_groups[0]["params"], SIZES) if n >= 4096}
    assert blocks == {n: math.ceil(n / 256) for n in SIZES if n >= 4096}


def test_shared_maps_are_counted_once():
    """Every 8-bit tensor's state names the optimizer's two maps: summing per tensor would count
    them once a tensor."""
    built = stepped(OPTIMIZERS["adamw8bit"])
    per_tensor = sum(v.numel() * v.element_size() for s in built.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    eight_bit_tensors = sum(1 for n in SIZES if n >= 4096)
    assert per_tensor - optimizers.state_bytes(built.optimizer) == (eight_bit_tensors - 1) * 2 * 256 * 4


def test_paged_optimizers_on_the_cpu_say_they_fell_back():
    built = stepped(OPTIMIZERS["paged_adamw8bit"])
    assert built.fell_back and "falls back to non-paged" in built.fell_back
    assert optimizers.paged_bytes(built.optimizer) == 0 == optimizers.analytic_paged_bytes(OPTIMIZERS["paged_adamw8bit"], SIZES, "cpu")
    assert stepped(OPTIMIZERS["adamw8bit"]).fell_back is None


def test_analytic_paged_bytes_on_a_gpu():
    """bitsandbytes pages the moments of tensors of at least 1e5 elements (8-bit: also over min_8bit_size)."""
    sizes = [99_999, 100_000, 300_000]
    assert optimizers.analytic_paged_bytes(OPTIMIZERS["paged_adamw"], sizes, "cuda") == 8 * 400_000
    assert optimizers.analytic_paged_bytes(OPTIMIZERS["paged_adamw8bit"], sizes, "cuda") == 2 * 400_000
    assert optimizers.analytic_paged_bytes(OPTIMIZERS["adamw8bit"], sizes, "cuda") == 0


def test_release_takes_paged_buffers_out_of_the_page_manager():
    """bitsandbytes' global page manager keeps every paged buffer for the process: release drops ours."""
    built = stepped(OPTIMIZERS["paged_adamw"])
    state = next(iter(built.optimizer.state.values()))
    state["state1"].is_paged = True  # as bitsandbytes marks its unified-memory buffers on a GPU
    manager = built.optimizer.page_mng
    others = list(manager.paged_tensors)
    manager.paged_tensors.append(state["state1"])
    optimizers.release(built.optimizer)
    assert manager.paged_tensors == others and not built.optimizer.state


@pytest.mark.parametrize("lora", [
    dict(r=8, target_modules="all-linear"),
    dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    dict(r=8, target_modules=["q_proj"], bias="all"),
    dict(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
])
def test_trainable_tensor_sizes_against_the_model_and_the_closed_form(lora):
    spec = resolve_model("llama-3.2-1b-tiny", "test")
    meta = build_model.build_meta(spec.config_dict())
    config = peft.LoraConfig(**lora)
    sizes = params.trainable_tensor_sizes(meta, config)
    assert sum(sizes) == params.closed_form(meta, config).trainable
    base = build_model.build_base(spec, QUANTIZATIONS["fp32"], "cpu")
    with adapters.attached(base, peft.LoraConfig(**lora)) as model:
        assert sorted(sizes) == sorted(p.numel() for p in model.parameters() if p.requires_grad)


WIDE_LLAMA = {  # adapter tensors of 4096 and more elements: the 8-bit optimizer quantizes them
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
    "num_attention_heads": 8, "num_key_value_heads": 8, "num_hidden_layers": 1, "vocab_size": 256,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_training_state_of_a_step_against_the_closed_form(tmp_path, name):
    path = tmp_path / "wide" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(WIDE_LLAMA))
    spec = resolve_model(str(path), "test")
    base = build_model.build_base(spec, QUANTIZATIONS["nf4"], "cpu")
    config = peft.LoraConfig(r=8, target_modules="all-linear")
    workload = WorkloadSpec(16, 2)
    with adapters.attached(base, config) as model:
        step = TrainStep(model, optimizer=OPTIMIZERS[name])
        step.run(synthetic_batch(256, workload, "cpu", 0))
        measured = memory.training_state_bytes(model, step.optimizer)
        step.close()
    estimate = memory.analytic_step(spec.config_dict(), QUANTIZATIONS["nf4"], config, workload, OPTIMIZERS[name])
    assert measured.optimizer == estimate.training.optimizer
    if name == "adamw8bit":  # every tensor is quantized here: 2 bytes a parameter and the block statistics
        trainable = sum(params.trainable_tensor_sizes(build_model.build_meta(spec.config_dict()), config))
        assert measured.optimizer < 2.1 * trainable + 2048


def test_the_matrix_takes_optimizers_and_refuses_unknown_ones():
    layer = mapping_layer({"models": ["llama-3.2-1b-tiny"], "quant": ["bf16"], "ranks": [8], "optimizers": ["adamw8bit", "paged_adamw"]}, "test")
    assert [o.name for o in build([layer]).optimizers] == ["adamw8bit", "paged_adamw"]
    with pytest.raises(MatrixError, match="'sgd' is not a known optimizer; allowed: adamw, adamw8bit, paged_adamw8bit, paged_adamw"):
        build([mapping_layer({"models": ["llama-3.2-1b-tiny"], "quant": ["bf16"], "ranks": [8], "optimizers": ["sgd"]}, "test")])


OPTIMIZER_RUN = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=bf16", "--lora-ranks=8", "--lora-targets=default")


def test_the_memory_suite_records_each_optimizer_and_the_fallback(pytester, suite):
    suite((SUITES / "test_memory.py").read_text(), name="test_memory_copy.py")
    result = pytester.runpytest(*OPTIMIZER_RUN, "--lora-optimizers=adamw,adamw8bit,paged_adamw8bit,paged_adamw",
                                "-k", "test_step_memory and not with_an")
    result.assert_outcomes(passed=4)
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    by_optimizer = {r["workload"]["optimizer"]: r for r in records}
    assert sorted(by_optimizer) == sorted(OPTIMIZERS)
    for name, record in by_optimizer.items():
        metrics = record["metrics"]
        assert metrics["optimizer_state_bytes"] == metrics["analytic_optimizer_state_bytes"]
        assert metrics["optimizer_8bit_share"] == 0.0  # every tensor of this adapter is under min_8bit_size
        paged = OPTIMIZERS[name].paged
        assert ("paged_state_bytes" in metrics) == paged
        assert any("falls back to non-paged" in w for w in record["warnings"]) == paged


def test_the_default_matrix_has_a_real_8bit_state(pytester, suite):
    """The memory suite's 8-bit config (rank 64 on the tiny model: 64 x 64 adapter tensors) keeps
    8-bit moments, and its state is the closed form's to the byte."""
    suite((SUITES / "test_memory.py").read_text(), name="test_memory_copy.py")
    result = pytester.runpytest("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "-k", "8bit_state")
    result.assert_outcomes(passed=1)
    (record,) = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    metrics = record["metrics"]
    assert record["lora"]["r"] == 64 and record["workload"]["optimizer"] == "adamw8bit" and metrics["optimizer_8bit_share"] > 0.5
    assert metrics["optimizer_state_bytes"] == metrics["analytic_optimizer_state_bytes"]


def test_a_wrong_block_size_fails_the_memory_suite(pytester, suite):
    """bitsandbytes before 0.45 used blocks of 2048: a closed form that assumes it is wrong for 0.50."""
    pytester.makepyfile(planted_block="""
        import pytest
        from pytest_lora.measure import optimizers

        @pytest.fixture(autouse=True)
        def old_block_size(monkeypatch):
            monkeypatch.setattr(optimizers, "block_size", lambda: 2048)
        """)
    pytester.syspathinsert()
    (pytester.path / "wide").mkdir()
    (pytester.path / "wide" / "config.json").write_text(json.dumps(WIDE_LLAMA))
    suite((SUITES / "test_memory.py").read_text(), name="test_memory_copy.py")
    result = pytester.runpytest("-p", "planted_block", "--lora-bench", "--lora-models=wide/config.json", "--lora-quant=bf16", "--lora-ranks=8",
                                "--lora-targets=all-linear", "--lora-optimizers=adamw,adamw8bit", "-k", "test_step_memory and not with_an")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED*test_step_memory*adamw8bit*"])


def test_a_counterpart_that_runs_out_of_memory_on_the_free_device_ends_the_pressure_test(monkeypatch):
    """No headroom can be set where the non-paged step does not fit at all: no ballast, no more steps."""
    calls = []

    def oom(*args):
        calls.append(args)
        return memory.PhaseMemory(base_allocated=0, oom="CUDA out of memory")

    monkeypatch.setattr(memory, "step_phase_memory", oom)
    pressure = memory.under_pressure(None, None, None, False, None, OPTIMIZERS["paged_adamw"], OPTIMIZERS["adamw"], 0)
    assert pressure.headroom is None and pressure.non_paged is None and len(calls) == 1
