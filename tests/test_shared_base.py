"""A base shared by every test must leave each test as it entered, on the GPU paths too:
checkpointing's hooks, 4-bit copies that point back at the shared layers, the memory a build
holds while it quantizes, files a test saves, and the exception of a test that failed."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

from fakes import FakeCudaRuntime, FakeGpuPlugin, fake_gpu
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS, WorkloadSpec
from pytest_lora.measure import memory
from pytest_lora.measure.train import TrainStep, checkpointing, synthetic_batch
from pytest_lora.models import adapters, build, quantize, registry

SUITES = Path(__file__).parents[1] / "suites"


def tiny(quant: str):
    return build.build_base(resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS[quant], "cpu")


def test_checkpointed_steps_leave_no_hook_on_a_shared_base():
    base = tiny("nf4")
    state = adapters.BaseState.of(base)
    for _ in range(2):
        with adapters.attached(base, peft.LoraConfig(r=4, target_modules="all-linear")) as model:
            with checkpointing(model, True):
                TrainStep(model).run(synthetic_batch(256, WorkloadSpec(16, 2), "cpu", 0))
    assert adapters.hooks_of(base) == ()
    assert state.differences(base) == []


def test_the_base_check_sees_a_hook_transformers_leaves():
    """transformers' own enable / disable pair leaves the input-embedding hook on a peft model."""
    base = tiny("bf16")
    state = adapters.BaseState.of(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().gradient_checkpointing_disable()
    model.unload()
    assert any("hooks differ" in problem for problem in state.differences(base))


def test_checkpointing_on_a_quantized_base_trains_every_adapter():
    """Non-reentrant checkpointing, input gradients on, no KV cache: every adapter gets a gradient."""
    base = tiny("nf4")
    with adapters.attached(base, peft.LoraConfig(r=4, target_modules="all-linear")) as model, checkpointing(model, True):
        layers = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
        assert layers and all(m._gradient_checkpointing_func.keywords["use_reentrant"] is False for m in layers)
        assert len(base._require_grads_hooks) == 1
        step = TrainStep(model)
        assert step._kwargs == {"use_cache": False}
        step.forward(synthetic_batch(256, WorkloadSpec(16, 2), "cpu", 0))
        step.backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None][:3]
        step.close()


def test_a_merge_on_a_private_copy_leaves_the_shared_4bit_layers_alone():
    base = tiny("nf4")
    layer = base.model.layers[0].self_attn.q_proj
    state_before = layer.quant_state
    copy = quantize.private_copy(base)
    assert copy.model.layers[0].self_attn.q_proj.weight.module is copy.model.layers[0].self_attn.q_proj
    model = peft.get_peft_model(copy, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.merge_and_unload()
    assert layer.quant_state is state_before and layer.weight.module is layer


def test_a_plain_deepcopy_merges_into_the_shared_layer():
    """The trap ``private_copy`` avoids, shown on bitsandbytes and peft as they are."""
    import copy

    base = tiny("nf4")
    layer = base.model.layers[0].self_attn.q_proj
    state_before = layer.quant_state
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.merge_and_unload()
    assert layer.quant_state is not state_before


def test_quantizing_frees_each_full_precision_layer_as_it_goes():
    """The build's peak: the bf16 model and one layer's quantized copy, not every bf16 Linear to
    the end (8B-tiny nf4: 2,436 B over the bf16 model; keeping the modules to the end, 40,132 B)."""
    runtime = FakeCudaRuntime()
    gpu = fake_gpu(runtime)
    spec = resolve_model("llama-3.1-8b-tiny", "test")
    with runtime.device:
        model = build.instantiate(spec.config_dict(), "cpu", torch.bfloat16)
        kept = quantize.modules_kept_unquantized(model)
        largest = max(m.weight.nbytes for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in kept)
        full = gpu.allocated()
        gpu.reset_peak()
        quantize.quantize_model(model, QUANTIZATIONS["nf4"])
        peak, after = gpu.peak_allocated(), gpu.allocated()
    assert after == memory.storage_bytes(model)
    assert peak <= full + largest, f"peak {peak:,d} B over the bf16 model's {full:,d} B"


SAVE_SUITE_ARGS = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=nf4", "--lora-ranks=4", "--lora-targets=q_proj", "-k", "save_and_reload")


def test_saved_models_are_removed_when_the_test_ends(pytester, suite, tmp_path):
    suite((SUITES / "test_merge.py").read_text(), name="test_merge_copy.py")
    (pytester.path / "suites" / "conftest.py").write_text((SUITES / "conftest.py").read_text())
    temporary = tmp_path / "system-temp"
    temporary.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(temporary))
        import tempfile

        patch.setattr(tempfile, "tempdir", None)
        pytester.runpytest(*SAVE_SUITE_ARGS, f"--basetemp={tmp_path / 'base'}").assert_outcomes(passed=1)
    assert list(temporary.iterdir()) == []
    assert not list((tmp_path / "base").rglob("*.safetensors"))


FAILING_SUITE = """
import pytest
import torch

pytestmark = pytest.mark.lora_memory


def test_runs_out(base_model, lora_bench):
    activations = torch.ones(1024, 1024)  # held by this frame when it fails
    pytest.held = __import__("weakref").ref(activations)
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_next_config(base_model, lora_bench):
    pass
"""

WATCHER = """
import pytest


@pytest.hookimpl(trylast=True)
def pytest_runtest_setup(item):
    held = getattr(pytest, "held", None)
    if held is not None and item.originalname == "test_next_config":
        (item.config.rootpath / "alive_at_setup.txt").write_text(str(held() is not None))
"""


@pytest.mark.slow
def test_a_failed_tests_frames_are_gone_before_the_next_setup(pytester, suite):
    """pytest keeps the last exception until the next test's call; the plugin drops it before setup.
    (A subprocess: pytester's in-process runs record every hook call, the failed call included.)"""
    suite(FAILING_SUITE, name="test_failing.py")
    (pytester.path / "suites" / "conftest.py").write_text(WATCHER)
    result = pytester.runpytest_subprocess("suites", "--lora-bench", "--lora-device=cpu", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=none")
    result.assert_outcomes(passed=1, skipped=1)
    assert (pytester.path / "alive_at_setup.txt").read_text() == "False"
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    assert [r["status"] for r in records] == ["oom", "ok"]


def test_the_full_precision_merge_check_holds_one_layer_at_a_time(pytester, suite):
    """The check's own peak (the test's call, after the base and its private copy exist) stays
    under the base's size plus the logits it compares; holding every layer's float64 formula
    would be four times the base's bf16 weights."""
    suite((SUITES / "test_merge.py").read_text(), name="test_merge_copy.py")
    (pytester.path / "suites" / "conftest.py").write_text((SUITES / "conftest.py").read_text())
    plugin = FakeGpuPlugin()
    args = ("--lora-bench", "--lora-models=llama-3.1-8b-tiny", "--lora-quant=bf16", "--lora-ranks=4", "--lora-targets=all-linear",
            "-k", "merge_full_precision")
    pytester.runpytest(*args, plugins=[plugin]).assert_outcomes(passed=1)
    (before, peak), = plugin.peaks.values()
    config = registry.load_config_dict("llama-3.1-8b-tiny")
    base = memory.analytic_weight_bytes(config, QUANTIZATIONS["bf16"])
    logits = 2 * 32 * config["vocab_size"]  # token_ids: batch 2 x 32 tokens
    # logits_agreement holds up to eight float64 tensors of the logits' size; on the tiny model they
    # outweigh the layers (this check held 1.05 MB; with every layer's float64 terms at once, 2.76 MB)
    assert peak - before <= base + 8 * 8 * logits, f"the check held {peak - before:,d} B over a {base:,d} B base"


FREEZE_SEEN = """
import gc

import pytest

pytestmark = pytest.mark.lora_params


def test_the_heap_seen(lora_bench):
    lora_bench.record("frozen_objects", gc.get_freeze_count(), "objects")
"""


@pytest.fixture
def thawed():
    """This test process's own freeze (conftest's ``pytest_runtestloop``) lifted for the test, and
    made again after it."""
    import gc

    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    yield
    if frozen:
        gc.collect()
        gc.freeze()


def test_what_lives_before_the_first_test_is_collected_once_and_frozen_until_the_last(pytester, suite, thawed):
    """The bench's collections walk only what its tests made (``models.heap``): the garbage of
    before the run is collected first (frozen garbage would never be freed), what is alive is
    frozen while the tests run, and thawed when they are done."""
    import gc
    import weakref

    class Node:
        pass

    suite(FREEZE_SEEN)
    gc.disable()  # no collection of the cycle but the run's own
    try:
        cycle = Node()
        cycle.itself = cycle
        gone = weakref.ref(cycle)
        del cycle
        result = pytester.runpytest("--lora-bench", "-p", "no:cacheprovider")
    finally:
        gc.enable()
    result.assert_outcomes(passed=1)
    assert gone() is None
    [record] = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    assert record["metrics"]["frozen_objects"] > 100_000  # torch's, transformers' and pytest's objects at least
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_before_the_run_is_left_to_whoever_made_it(pytester, suite, thawed):
    """A conftest (here: this test) froze its objects before the run: the run's tests see that
    freeze, and the run ends without thawing it."""
    import gc

    suite(FREEZE_SEEN)
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    result = pytester.runpytest("--lora-bench", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    [record] = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    # no new freeze (a frozen object freed by its reference count leaves the frozen generation) ...
    assert 100_000 < record["metrics"]["frozen_objects"] <= frozen
    assert gc.get_freeze_count() > 100_000  # ... and no thaw
