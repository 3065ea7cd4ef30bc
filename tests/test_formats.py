"""Quantization formats through the one seam (``pytest_lora.models.formats``): each backend's
storage against the backend's own layout, peft's LoRA layers dispatched on it (and the traps when
they are not), the memory suite failing on a planted wrong storage formula, the merge suite on
every new format, and formats that cannot run here skipping with their reason."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

from pytest_lora.matrix import MatrixError, _parse_quant
from pytest_lora.measure import memory, params
from pytest_lora.models import adapters, build, formats, registry
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS, LoraSpec

torchao = pytest.importorskip("torchao", reason="the torchao formats need torchao (pip install 'pytest-lora[torchao]')")
hqq = pytest.importorskip("hqq", reason="the HQQ formats need hqq (pip install 'pytest-lora[hqq]')")

NEW_FORMATS = ["torchao-int8", "hqq-4bit", "hqq-8bit", "hqq-2bit"]
MODELS = ["llama-3.2-1b-tiny", "gpt2-medium-tiny", "flan-t5-base-tiny"]
SUITES = Path(__file__).parents[1] / "suites"
SHAPES = [(64, 64), (96, 256), (24, 48)]


def built(model: str, quant: str):
    return build.build_base(resolve_model(model, "test"), QUANTIZATIONS[quant], "cpu")


# --------------------------------------------------------------------------- storage


def layout_bytes(layer: torch.nn.Module) -> int:
    """The layer's storage as the backend lays it out, read from the backend's own objects:
    torchao's tensor subclass through its ``__tensor_flatten__``, HQQ's ``W_q`` and ``meta``."""
    if isinstance(layer, hqq.core.quantize.HQQLinear):
        tensors = [layer.W_q] + [v for v in layer.meta.values() if isinstance(v, torch.Tensor)]
    else:
        names, _ = layer.weight.__tensor_flatten__()
        tensors = [getattr(layer.weight, name) for name in names]
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("quant", NEW_FORMATS + ["hqq-4bit-g32", "hqq-8bit-g128"])
def test_a_layer_stores_what_the_format_says(quant, shape):
    spec = _parse_quant(quant, "test")
    found = formats.of(spec)
    layer = found.quantize_layer(torch.randn(*shape, dtype=torch.bfloat16), None, spec)
    assert layout_bytes(layer) == found.tensor_bytes(*shape, spec)


def test_torchao_int8_keeps_a_zero_point_per_row_beside_the_scale():
    """torchao 0.18's layout: qdata int8 (out, in), an fp32 scale and an int8 zero point per row.
    A formula without the zero points (4 bytes a row) is 0.9% short on the tiny Llama."""
    layer = formats.of(QUANTIZATIONS["torchao-int8"]).quantize_layer(torch.randn(32, 64, dtype=torch.bfloat16), None, QUANTIZATIONS["torchao-int8"])
    parts = {name: (tuple(getattr(layer.weight, name).shape), getattr(layer.weight, name).dtype) for name in layer.weight.__tensor_flatten__()[0]}
    assert parts == {"qdata": ((32, 64), torch.int8), "scale": ((32, 1), torch.float32), "zero_point": ((32, 1), torch.int8)}


@pytest.mark.parametrize("quant", NEW_FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_a_base_stores_what_the_memory_model_says(name, quant):
    """The whole base: every storage counted once, against the architecture's arithmetic; and
    the count of weights is the unquantized model's (packing undone, HQQ's bias counted)."""
    base = built(name, quant)
    config = registry.load_config_dict(name)
    assert memory.storage_bytes(base) == memory.analytic_weight_bytes(config, QUANTIZATIONS[quant])
    assert params.count_model(base).total == params.count_model(build.build_meta(config)).total
    assert memory.storage_bytes(base) < memory.analytic_weight_bytes(config, QUANTIZATIONS["bf16"])


def test_hqq_bits_per_weight_are_the_packed_bits_plus_a_scale_and_zero_per_group():
    """4-bit, groups of 64, bf16 scale and zero: 4 + 2 x 16 / 64 = 4.5 bits a weight."""
    spec = QUANTIZATIONS["hqq-4bit"]
    assert formats.of(spec).tensor_bytes(4096, 4096, spec) * 8 / 4096**2 == 4.5
    eight = QUANTIZATIONS["hqq-8bit"]
    assert formats.of(eight).tensor_bytes(4096, 4096, eight) * 8 / 4096**2 == 8.5


def test_torchao_int4_is_tinygemm_s_padded_layout():
    """Unverified on a GPU here: the arithmetic of tinygemm's layout (two weights a byte of the
    weight padded to 8 x 1024, a bf16 scale and zero per group of 128)."""
    spec = QUANTIZATIONS["torchao-int4"]
    assert formats.of(spec).tensor_bytes(4096, 4096, spec) == 4096 * 4096 // 2 + 4 * 4096 * 32
    assert formats.of(spec).tensor_bytes(4100, 1000, spec) == 4104 * 1024 // 2 + 4 * 4104 * 8


@pytest.mark.parametrize("name", ["torchao-int8", "hqq-4bit"])
def test_quantizing_in_place_gives_what_a_checkpoint_loads(tmp_path, name):
    """The same weights saved as a checkpoint and loaded as the matrix loads one: through
    transformers' torchao loader with the format's ``TorchAoConfig``; for HQQ, whose loader
    refuses a CPU device map ("an HQQ model with a device_map that contains a CPU"), in the
    compute dtype and quantized in place. The same layers, bytes and flags either way."""
    spec, quant = resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS[name]
    assert formats.of(quant).loads_pretrained_on({"cpu"}) == (name != "hqq-4bit")
    assert formats.of(quant).loads_pretrained_on({"cuda"})
    build.full_precision_of(spec, quant, "cpu").save_pretrained(tmp_path)
    ours = build.build_base(spec, quant, "cpu")
    theirs = build.load_checkpoint(str(tmp_path), quant, "cpu", spec.config_dict())
    assert {n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in theirs.named_modules()}
    assert memory.storage_bytes(ours) == memory.storage_bytes(theirs)
    for (name, a), (_, b) in zip(ours.named_modules(), theirs.named_modules()):
        if formats.layer_format(a) is not None:
            assert torch.equal(formats.dequantized(a), formats.dequantized(b)), name
    assert (ours.is_quantized, ours.quantization_method) == (theirs.is_quantized, theirs.quantization_method)


# --------------------------------------------------------------------------- peft's layers


@pytest.mark.parametrize("quant", NEW_FORMATS + ["nf4", "int8"])
def test_peft_dispatches_the_format_s_own_lora_layer(quant):
    spec = QUANTIZATIONS[quant]
    config = adapters.lora_config_for(LoraSpec(r=8, alpha=16, targets="all-linear"), registry.load_config_dict("llama-3.2-1b-tiny"), spec)
    model = peft.get_peft_model(built("llama-3.2-1b-tiny", quant), config)
    layers = {type(m).__name__ for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert layers == {formats.of(spec).peft_layer(spec)}
    assert adapters.dispatch_problems(model, spec) == []


def test_the_trap_a_bitsandbytes_base_without_transformers_flags_gets_plain_linear_layers():
    """peft reads the model's flags, not its layers: unmarked, a 4-bit layer is wrapped as a
    plain Linear, and the dispatch check names it."""
    base = built("llama-3.2-1b-tiny", "nf4")
    del base.is_loaded_in_4bit
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj"]))
    problems = adapters.dispatch_problems(model, QUANTIZATIONS["nf4"])
    assert problems and "not Linear4bit" in problems[0]


def test_the_trap_peft_s_all_linear_finds_no_hqq_layer():
    """peft's ``all-linear`` looks for nn.Linear; on HQQ it finds nothing and refuses the config.
    ``lora_config_for`` names the layers instead: the same adapter as on every other format."""
    with pytest.raises(ValueError):
        peft.get_peft_model(built("llama-3.2-1b-tiny", "hqq-4bit"), peft.LoraConfig(r=8, target_modules="all-linear"))
    config = registry.load_config_dict("llama-3.2-1b-tiny")
    spec = LoraSpec(r=8, alpha=16, targets="all-linear")
    named = adapters.lora_config_for(spec, config, QUANTIZATIONS["hqq-4bit"])
    on_hqq = peft.get_peft_model(built("llama-3.2-1b-tiny", "hqq-4bit"), named)
    on_bf16 = peft.get_peft_model(built("llama-3.2-1b-tiny", "bf16"), adapters.lora_config_for(spec, config, QUANTIZATIONS["bf16"]))
    assert params.count_model(on_hqq) == params.count_model(on_bf16)


def test_peft_counts_hqq_s_packed_bytes_as_parameters():
    """Why the params suite counts by walking the layers: peft's total on an HQQ 4-bit base is
    short by half of every quantized weight."""
    spec = QUANTIZATIONS["hqq-4bit"]
    config = adapters.lora_config_for(LoraSpec(r=8, alpha=16, targets="all-linear"), registry.load_config_dict("llama-3.2-1b-tiny"), spec)
    model = peft.get_peft_model(built("llama-3.2-1b-tiny", "hqq-4bit"), config)
    trainable, total = model.get_nb_trainable_parameters()
    counted = params.count_model(model)
    assert trainable == counted.trainable and total < counted.total
    assert not formats.of(spec).peft_counts_weights


def test_a_torchao_base_not_marked_as_transformers_marks_it_trains_but_cannot_merge():
    """peft's torchao layer re-quantizes on merge with the config it reads from the model's
    ``hf_quantizer``; ``mark_model`` puts it there, as transformers' loader does."""
    base = built("llama-3.2-1b-tiny", "torchao-int8")
    del base.hf_quantizer
    with pytest.warns(UserWarning, match="get_apply_tensor_subclass"):
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="get_apply_tensor_subclass"):
        model.merge_and_unload()


def test_a_shared_base_is_left_as_it_was_by_a_merge_on_a_private_copy():
    from pytest_lora.models import quantize

    for quant in NEW_FORMATS:
        base = built("llama-3.2-1b-tiny", quant)
        before = {name: formats.dequantized(m).clone() for name, m in base.named_modules() if formats.layer_format(m)}
        config = adapters.lora_config_for(LoraSpec(r=8, alpha=16, targets="all-linear"), registry.load_config_dict("llama-3.2-1b-tiny"), QUANTIZATIONS[quant])
        model = peft.get_peft_model(quantize.private_copy(base), config)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, peft.tuners.lora.LoraLayer) and layer.lora_B:
                    layer.lora_B["default"].weight.fill_(0.1)
        model.merge_and_unload()
        after = {name: formats.dequantized(m) for name, m in base.named_modules() if formats.layer_format(m)}
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), quant


# --------------------------------------------------------------------------- the suites


def test_the_memory_suite_passes_on_each_new_format(pytester, suite):
    suite((SUITES / "test_memory.py").read_text(), name="test_memory_copy.py")
    result = pytester.runpytest("--lora-bench", "--lora-models=llama-3.2-1b-tiny", f"--lora-quant={','.join(NEW_FORMATS)}",
                                "--lora-ranks=8", "--lora-targets=all-linear", "-k", "(weight_storage or step_memory) and not with_an")
    result.assert_outcomes(passed=2 * len(NEW_FORMATS))


PLANTED_FORMULAS = {
    "torchao-int8": ("ao", "Torchao", "lambda self, rows, columns, quant: rows * columns + 4 * rows"),  # no zero points
    "hqq-4bit": ("hqq", "Hqq", "lambda self, rows, columns, quant: rows * columns // 2 + 2 * rows * columns // quant.group_size"),  # no zero points
}


@pytest.mark.parametrize("quant", list(PLANTED_FORMULAS))
def test_a_wrong_storage_formula_fails_the_memory_suite_for_that_format(pytester, suite, quant):
    """The plant is a plugin module named after the format (a conftest.py of the same name in
    two in-process runs would be imported once)."""
    module, cls, formula = PLANTED_FORMULAS[quant]
    plugin = f"planted_{module}"
    pytester.makepyfile(**{plugin: f"""
        import pytest
        from pytest_lora.models.formats import {module}

        @pytest.fixture(autouse=True)
        def wrong_formula(monkeypatch):
            monkeypatch.setattr({module}.{cls}, "tensor_bytes", {formula})
        """})
    pytester.syspathinsert()
    suite((SUITES / "test_memory.py").read_text(), name="test_memory_copy.py")
    result = pytester.runpytest("-p", plugin, "--lora-bench", "--lora-models=llama-3.2-1b-tiny", f"--lora-quant={quant},nf4", "-k", "weight_storage")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"FAILED*test_weight_storage[[]llama-3.2-1b-tiny-{quant}[]]*"])


def test_the_merge_suite_runs_on_each_new_format(pytester, suite):
    """Every merge test of a quantized base, with the three strategies recorded."""
    suite((SUITES / "test_merge.py").read_text(), name="test_merge_copy.py")
    (pytester.path / "conftest.py").write_text((SUITES / "conftest.py").read_text())
    result = pytester.runpytest("--lora-bench", "--lora-models=llama-3.2-1b-tiny,gpt2-medium-tiny", f"--lora-quant={','.join(NEW_FORMATS)}",
                                "--lora-ranks=8", "--lora-targets=default", "-k", "quantized or save_and_reload")
    result.assert_outcomes(passed=4 * len(NEW_FORMATS))  # 2 models x (merge, save and reload)
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    merged = [r for r in records if "test_merge_quantized" in r["test"]]
    assert sorted({r["quant"] for r in merged}) == sorted(NEW_FORMATS)
    strategies = {"merge_kl_requantize", "merge_kl_dequantize", "merge_kl_original", "requant_err_over_update"}
    assert all(strategies <= set(r["metrics"]) for r in merged)


def test_a_merge_that_does_not_requantize_fails_the_merge_suite(pytester, suite):
    """A planted peft merge that leaves W + s B A in the compute dtype instead of re-quantizing."""
    pytester.makepyfile(planted_merge="""
        import pytest
        import torch
        from peft.tuners.lora import torchao as peft_torchao

        def merge_without_requantizing(self, safe_merge=False, adapter_names=None):
            base = self.get_base_layer()
            weight = (base.weight.dequantize() + self.get_delta_weight("default")).to(base.weight.dtype)
            del base.weight
            base.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.merged_adapters.append("default")

        @pytest.fixture(autouse=True)
        def planted(monkeypatch):
            monkeypatch.setattr(peft_torchao.TorchaoLoraLinear, "merge", merge_without_requantizing)
        """)
    pytester.syspathinsert()
    suite((SUITES / "test_merge.py").read_text(), name="test_merge_copy.py")
    (pytester.path / "conftest.py").write_text((SUITES / "conftest.py").read_text())
    result = pytester.runpytest("-p", "planted_merge", "--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=torchao-int8",
                                "--lora-ranks=8", "--lora-targets=default", "-k", "merge_quantized")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*peft's merge left [[]*[]] not stored as torchao-int8*"])


# --------------------------------------------------------------------------- availability


def test_torchao_int4_says_why_it_cannot_run_on_the_cpu():
    reason = formats.unavailable(QUANTIZATIONS["torchao-int4"], "cpu")
    assert reason is not None and reason.startswith("torchao cannot run torchao-int4 on cpu (")


def test_a_missing_backend_skips_its_formats_with_how_to_install_it(pytester, suite, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    formats.unavailable.cache_clear()
    try:
        assert formats.unavailable(QUANTIZATIONS["hqq-4bit"], "cpu") == "hqq-4bit needs hqq, which is not installed (pip install 'pytest-lora[hqq]')"
        suite()
        result = pytester.runpytest("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=hqq-4bit,bf16", "--lora-ranks=8",
                                    "--lora-targets=q_proj", "-rs")
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED*hqq-4bit needs hqq, which is not installed*"])
    finally:
        formats.unavailable.cache_clear()


def test_group_sizes_are_a_parameter_of_grouped_formats():
    assert _parse_quant("hqq-4bit-g128", "--lora-quant").group_size == 128
    assert _parse_quant("hqq-4bit-g128", "--lora-quant").name == "hqq-4bit-g128"
    with pytest.raises(MatrixError, match="group size hqq does not support; allowed: 8, 16"):
        _parse_quant("hqq-4bit-g7", "--lora-quant")
    with pytest.raises(MatrixError, match="is not a quantization"):
        _parse_quant("torchao-int8-g64", "--lora-quant")  # per row: no groups


def test_every_format_of_the_table_names_a_backend_with_a_format_object():
    for spec in QUANTIZATIONS.values():
        assert formats.of(spec).backend == spec.backend


def test_hqq_checkpoints_get_transformers_hqq_config_of_the_format():
    """What a checkpoint in the matrix is loaded with (transformers' HQQ loader runs on a GPU only)."""
    spec = _parse_quant("hqq-4bit-g128", "test")
    config = formats.of(spec).pretrained_config(spec)
    assert type(config).__name__ == "HqqConfig"
    assert (config.quant_config["weight_quant_params"]["nbits"], config.quant_config["weight_quant_params"]["group_size"]) == (4, 128)


def test_the_unquantized_format_quantizes_nothing():
    plain = formats.of(QUANTIZATIONS["bf16"])
    assert plain.pretrained_config(QUANTIZATIONS["bf16"]) is None
    layer = torch.nn.Linear(3, 2)
    assert not plain.owns(layer) and formats.layer_format(layer) is None
    assert plain.weights_in(layer) == 8 and torch.equal(formats.dequantized(layer), layer.weight.data)
    with pytest.raises(NotImplementedError):
        plain.quantize_layer(torch.ones(2, 2), None, QUANTIZATIONS["bf16"])
    with pytest.raises(NotImplementedError):
        plain.tensor_bytes(2, 2, QUANTIZATIONS["bf16"])
