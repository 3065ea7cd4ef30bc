"""The rarer branches of the measurements and the model code, each against what it must say."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS, LoraSpec
from pytest_lora.measure import flops, forgetting, memory, merge, params
from pytest_lora.models import adapters, build, registry, tiny, validate


def test_conv1d_layers_count_their_weights_in_the_flops():
    meta = build.build_meta(registry.load_config_dict("gpt2-medium-tiny"))
    expected = sum(m.nx * m.nf for m in meta.modules() if isinstance(m, Conv1D))
    expected += sum(m.in_features * m.out_features for m in meta.modules() if isinstance(m, torch.nn.Linear))
    assert flops.matmul_weights(meta) == expected and expected > 0


def test_too_little_text_for_one_block_is_an_error():
    class Words:
        def __call__(self, text):
            return {"input_ids": list(range(len(text.split())))}

    with pytest.raises(ValueError, match="3 tokens: too few for one block of 64"):
        forgetting.blocks(Words(), ["a b c"], 64)


def test_int8_weights_dequantize_from_the_row_scales_wherever_they_are():
    base = build.build_base(resolve_model("llama-3.2-1b-tiny", "t"), QUANTIZATIONS["int8"], "cpu")
    layer = base.model.layers[0].self_attn.q_proj
    on_weight = merge.dequantized(layer)
    with torch.no_grad():
        base(input_ids=torch.randint(0, 256, (1, 4)))  # bitsandbytes moves the scales into the layer
    assert layer.weight.SCB is None
    assert torch.equal(merge.dequantized(layer), on_weight)
    assert on_weight.shape == (layer.out_features, layer.in_features)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_counted_as_tensors(bias):
    meta = build.build_meta(registry.load_config_dict("gpt2-medium-tiny"))
    lora = peft.LoraConfig(r=4, target_modules=["c_attn"], bias=bias)
    model = peft.get_peft_model(build.build_meta(registry.load_config_dict("gpt2-medium-tiny")), lora)
    assert params.trainable_tensor_count(meta, lora) == sum(1 for p in model.parameters() if p.requires_grad)


def test_default_targets_of_an_unknown_architecture_are_refused():
    meta = build.build_meta(registry.load_config_dict("llama-3.2-1b-tiny"))
    with pytest.raises(params.ClosedFormUnsupported, match="no default LoRA targets for model_type 'nonesuch'"):
        params.adapted_layers(meta, peft.LoraConfig(r=4), model_type="nonesuch")


def test_an_adapted_embedding_has_its_vocabulary_and_width():
    meta = build.build_meta(registry.load_config_dict("llama-3.2-1b-tiny"))
    assert params.layer_shape(meta.model.embed_tokens) == (256, 64)


def test_the_base_check_sees_a_changed_training_mode():
    base = build.build_base(resolve_model("llama-3.2-1b-tiny", "t"), QUANTIZATIONS["fp32"], "cpu")
    state = adapters.BaseState.of(base)
    base.train(not base.training)
    assert any("training mode" in problem for problem in state.differences(base))


def test_stripping_takes_out_lora_layers_peft_left_behind():
    base = build.build_base(resolve_model("llama-3.2-1b-tiny", "t"), QUANTIZATIONS["fp32"], "cpu")
    state = adapters.BaseState.of(base)
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))  # as if it failed before unload
    adapters.strip_adapters(base)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in base.modules())
    assert {n: type(m) for n, m in base.named_modules()} == dict(state.modules)


def test_a_model_type_without_a_class_is_an_error():
    with pytest.raises(ValueError, match="transformers has no model class for model_type 'nonesuch'"):
        build.model_class({"model_type": "nonesuch"})


def test_an_architecture_without_a_tiny_variant_is_an_error():
    with pytest.raises(ValueError, match="no tiny variant for model_type 'nonesuch'; known: "):
        tiny.shrink({"model_type": "nonesuch"})


def test_lists_of_special_token_ids_move_into_the_tiny_vocabulary():
    config = registry.load_config_dict("llama-3.1-8b")
    small = tiny.shrink({**config, "eos_token_id": [128001, 128008, 5]})
    assert all(t < small["vocab_size"] for t in small["eos_token_id"]) and small["eos_token_id"][2] == 5


def test_validation_explains_defaults_it_cannot_find_and_modules_to_save_it_cannot_match(monkeypatch):
    spec = resolve_model("llama-3.2-1b-tiny", "t")
    problems = validate.problems(spec, LoraSpec(r=4, alpha=8, modules_to_save=("nonesuch",)), validate.architecture(spec))
    assert problems == ["modules_to_save 'nonesuch' matches no module of llama-3.2-1b-tiny"]
    original, found = spec.config_dict(), validate.architecture(spec)
    monkeypatch.setattr(type(spec), "config_dict", lambda self: {**original, "model_type": "nonesuch"})
    (problem,) = validate.problems(spec, LoraSpec(r=4, alpha=8), dataclasses.replace(found, peft_defaults=False))
    assert problem.startswith("targets 'default': peft has no default targets for llama-3.2-1b-tiny (model_type 'nonesuch')")


class DictCache:
    """pytest's ``config.cache`` interface (``get`` / ``set`` of JSON values) over a dict."""

    def __init__(self):
        self.values = {}

    def get(self, key, default):
        return json.loads(self.values[key]) if key in self.values else default

    def set(self, key, value):
        self.values[key] = json.dumps(value)


def test_the_architecture_read_from_the_cache_is_the_one_inspected(monkeypatch):
    """A second look (another pytest run) reads the cache and builds nothing; the key changes
    with the config, so a changed config.json is inspected again."""
    cache = DictCache()
    spec, other = resolve_model("llama-3.2-1b-tiny", "t"), resolve_model("opt-125m-tiny", "t")
    inspected = validate.architecture(spec, cache)
    assert list(cache.values) == [validate.cache_key(spec)] and validate.cache_key(other) != validate.cache_key(spec)
    assert ("model.layers.0.self_attn.q_proj", True) in inspected.modules and inspected.peft_defaults
    monkeypatch.setattr(validate, "inspect_architecture", lambda model: pytest.fail("the cache was not read"))
    assert validate.architecture(spec, cache) == inspected
    assert validate.problems(spec, LoraSpec(r=4, alpha=8, targets=("q_prj",)), inspected)[0].startswith("target 'q_prj' matches no")


def test_an_unreadable_config_json_is_an_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        registry.load_config_dict(path)
