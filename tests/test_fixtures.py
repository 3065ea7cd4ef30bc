"""The fixtures: quantized bases that peft recognises, one build per base, a base that every test
leaves as it found it, local checkpoints, and a plugin that loads without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from peft.tuners.lora import bnb as lora_bnb
from peft.tuners.lora import layer as lora_layer

from pytest_lora import count_parameters
from pytest_lora.keys import SESSION_KEY
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS, MatrixError
from pytest_lora.models import adapters, build, registry

pytest_plugins = ["pytester"]

EXPECTED_LORA_LAYER = {
    "int8": lora_bnb.Linear8bitLt,
    "nf4": lora_bnb.Linear4bit,
    "fp4": lora_bnb.Linear4bit,
    "nf4-dq": lora_bnb.Linear4bit,
}


@pytest.mark.lora_matrix(
    models=["llama-3.2-1b-tiny", "gpt2-medium-tiny", "flan-t5-base-tiny"],
    quant=["none", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq"],
    ranks=[4],
    targets=["default"],
)
def test_lora_layers_are_peft_bnb_layers_on_quantized_bases(lora_model, quant_spec):
    lora_layers = [m for m in lora_model.modules() if isinstance(m, lora_layer.LoraLayer)]
    assert lora_layers
    expected = EXPECTED_LORA_LAYER.get(quant_spec.name, lora_layer.Linear)
    assert {type(m) for m in lora_layers} == {expected}
    weight = lora_layers[0].get_base_layer().weight
    if quant_spec.scheme in ("nf4", "fp4"):
        assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.uint8
        assert weight.quant_state.quant_type == quant_spec.scheme
        assert weight.quant_state.nested == quant_spec.double_quant
    elif quant_spec.scheme == "int8":
        assert type(weight).__name__ == "Int8Params" and weight.dtype == torch.int8
    elif quant_spec.dtype:
        assert weight.dtype == getattr(torch, quant_spec.dtype)


def test_swapped_layers_without_the_model_flags_are_wrapped_as_plain_linear():
    """The trap: bitsandbytes layers alone don't make peft treat a model as quantized."""
    spec = resolve_model("llama-3.2-1b-tiny", "test")
    base = build.build_base(spec, QUANTIZATIONS["nf4"], "cpu")
    assert base.is_loaded_in_4bit
    q_proj = lambda model: model.base_model.model.model.layers[0].self_attn.q_proj  # noqa: E731
    marked = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert type(q_proj(marked)) is lora_bnb.Linear4bit
    base = marked.unload()
    del base.is_loaded_in_4bit
    unmarked = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert type(q_proj(unmarked)) is lora_layer.Linear


def test_lora_model_restores_the_base_even_after_training_its_biases():
    spec = resolve_model("gpt2-medium-tiny", "test")
    base = build.build_base(spec, QUANTIZATIONS["fp32"], "cpu")
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    state = adapters.BaseState.of(base)
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], bias="all", modules_to_save=["ln_f"], use_dora=True, fan_in_fan_out=True)
    with adapters.attached(base, config) as model:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        ids = torch.randint(0, 256, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        assert not torch.equal(base.transformer.h[0].attn.c_attn.base_layer.bias, before["transformer.h.0.attn.c_attn.bias"])
    assert state.differences(base) == []
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize("quant", ["int8", "nf4-dq"])
def test_dora_on_a_quantized_base_leaves_the_original_weights_in_place(quant):
    """DoRA re-creates the base's ``Int8Params``; the originals (equal values) are put back."""
    base = build.build_base(resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS[quant], "cpu")
    weight = base.model.layers[0].self_attn.q_proj.weight
    state = adapters.BaseState.of(base)
    with adapters.attached(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)):
        pass
    assert base.model.layers[0].self_attn.q_proj.weight is weight
    assert state.differences(base) == []


def test_a_test_that_changes_the_base_is_an_error():
    spec = resolve_model("llama-3.2-1b-tiny", "test")
    base = build.build_base(spec, QUANTIZATIONS["fp32"], "cpu")
    with pytest.raises(adapters.BaseModelChanged, match="modules differ"):
        with adapters.attached(base, peft.LoraConfig(r=4, target_modules=["q_proj"])):
            base.model.layers[1].mlp = torch.nn.Identity()


ACROSS_TESTS = """
import pytest

pytestmark = pytest.mark.lora_params


def test_one(lora_model):
    assert lora_model.get_nb_trainable_parameters()[0] > 0


def test_two(lora_model, base_model):
    assert lora_model.base_model.model is base_model
"""


def test_each_base_is_built_once_for_every_lora_spec_and_test(pytester, suite):
    suite(ACROSS_TESTS)
    run = pytester.inline_run(
        "--lora-bench", "--lora-models=llama-3.2-1b-tiny,opt-125m-tiny", "--lora-quant=none,nf4", "--lora-ranks=4,8", "--lora-targets=q_proj,v_proj|all-linear"
    )
    run.assertoutcome(passed=2 * 2 * 2 * 2 * 2)
    session = run.getcalls("pytest_sessionfinish")[0].session
    builds = session.config.stash[SESSION_KEY].run.builds
    assert builds == {(m, q, "cpu"): 1 for m in ("llama-3.2-1b-tiny", "opt-125m-tiny") for q in ("none", "nf4")}


def test_local_checkpoint_directory(tmp_path):
    source = build.instantiate(registry.load_config_dict("llama-3.2-1b-tiny"), "cpu", torch.bfloat16)
    source.save_pretrained(tmp_path)
    spec = resolve_model(str(tmp_path), "--lora-models")
    assert spec.kind == "checkpoint" and spec.id == tmp_path.name

    loaded = build.build_base(spec, QUANTIZATIONS["none"], "cpu")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight)
    assert loaded.dtype == torch.bfloat16

    quantized = build.build_base(spec, QUANTIZATIONS["nf4"], "cpu")
    lora = peft.get_peft_model(quantized, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert type(lora.base_model.model.model.layers[0].self_attn.q_proj) is lora_bnb.Linear4bit
    assert count_parameters(tmp_path, {"r": 4, "target_modules": ["q_proj", "v_proj"]}).trainable == lora.get_nb_trainable_parameters()[0]


def test_a_config_json_path_works_like_a_registry_name(tmp_path):
    config = registry.config_path("mistral-7b")
    (tmp_path / "config.json").write_text(config.read_text())
    lora = {"r": 16, "target_modules": ["q_proj", "v_proj"]}
    assert resolve_model(str(tmp_path / "config.json"), "--lora-models").kind == "config"
    # a directory with a config.json and no weights is not taken for a checkpoint of random weights
    with pytest.raises(MatrixError, match="is a directory with a config.json and no weights .*; allowed: a checkpoint directory; "
                                          "for random weights of its architecture, the config.json itself"):
        resolve_model(str(tmp_path), "--lora-models")
    assert count_parameters(tmp_path / "config.json", lora) == count_parameters("mistral-7b", lora)
    assert count_parameters(transformers.AutoConfig.for_model(**json_of(config)), lora) == count_parameters("mistral-7b", lora)


def json_of(path):
    return json.loads(path.read_text())


def test_loading_the_plugin_imports_neither_torch_nor_transformers():
    code = "import sys, pytest_lora.plugin; heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; print(heavy)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_plain_pytest_run_does_not_pay_for_torch(pytester):
    pytester.makepyfile(test_plain="import sys\n\ndef test_plain():\n    assert 'torch' not in sys.modules\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)

