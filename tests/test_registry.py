"""The model registry: shipped configs reproduce the published models, tiny variants keep their
architecture."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from pytest_lora.measure.params import count_model
from pytest_lora.models import build, registry, tiny

REQUIRED = ("flan-t5-xxl", "flan-t5-base", "llama-3.2-1b", "llama-3.1-8b", "llama-2-7b", "llama-2-70b", "mistral-7b", "qwen2.5-7b", "gpt2-medium", "roberta-base", "opt-125m")


def test_the_registry_has_the_models_users_ask_for():
    assert set(REQUIRED) <= set(registry.MODELS)
    assert all(registry.is_known(name + "-tiny") for name in registry.MODELS)
    assert not registry.is_known("llama-9b") and not registry.is_known("llama-9b-tiny")


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_shipped_config_has_the_published_parameter_count(name):
    """Counted on the meta device; the figure is the published checkpoint's (tied tensors once)."""
    meta = build.build_meta(registry.load_config_dict(name))
    assert count_model(meta).total == registry.MODELS[name].published_params
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_flan_t5_keeps_its_untied_lm_head():
    """transformers 5 ties T5's lm_head to the shared embedding; the published FLAN-T5 doesn't."""
    meta = build.build_meta(registry.load_config_dict("flan-t5-xxl"))
    assert meta.lm_head.weight is not meta.shared.weight
    assert meta.encoder.embed_tokens.weight is meta.shared.weight  # these stay tied, as published


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_tiny_variant_keeps_the_architecture(name):
    real = registry.load_config_dict(name)
    small = registry.load_config_dict(name + "-tiny")
    model = build.instantiate(small, "cpu", torch.float32)
    meta = build.build_meta(real)
    assert type(model) is type(meta)
    assert count_model(model).total < 500_000
    layer_kinds = lambda m: {type(module) for module in m.modules()}  # noqa: E731
    assert layer_kinds(model) == layer_kinds(meta), "same module types (gated MLP, Conv1D, norms, ...)"
    tied = lambda m: m.get_output_embeddings() is not None and m.get_output_embeddings().weight is m.get_input_embeddings().weight  # noqa: E731
    assert tied(model) == tied(meta)
    if "num_key_value_heads" in real:
        assert small["num_key_value_heads"] / small["num_attention_heads"] == pytest.approx(
            max(real["num_key_value_heads"] / real["num_attention_heads"], 1 / tiny.HEADS)
        )
    ids = torch.randint(0, tiny.VOCAB, (1, 8))
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids) if real.get("is_encoder_decoder") else model(input_ids=ids)
    assert out.logits.shape[-1] == tiny.VOCAB


def test_gpt2_tiny_uses_conv1d_like_gpt2():
    model = build.instantiate(registry.load_config_dict("gpt2-medium-tiny"), "cpu", torch.float32)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


def test_unknown_architecture_has_no_tiny_variant():
    with pytest.raises(ValueError, match="no tiny variant for model_type 'mamba'"):
        tiny.shrink({"model_type": "mamba"})


def test_a_config_without_model_type_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="has no 'model_type'"):
        registry.load_config_dict(path)


def test_a_model_name_resolves_to_the_registry_a_config_file_or_a_checkpoint(tmp_path):
    """``models.resolve``: what a name in the matrix means, and the error for each wrong one."""
    from pytest_lora.models.resolve import resolve_model
    from pytest_lora.specs import MatrixError

    assert resolve_model("llama-3.2-1b", "--lora-models").kind == "registry"
    with pytest.raises(MatrixError, match="is neither a registry model nor an existing path"):
        resolve_model(str(tmp_path / "missing"), "--lora-models")
    with pytest.raises(MatrixError, match="is a directory without a config.json"):
        resolve_model(str(tmp_path), "--lora-models")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text(registry.config_path("llama-3.2-1b-tiny").read_text())
    by_file = resolve_model("mine/config.json", "--lora-models", base_dir=tmp_path)
    assert (by_file.kind, by_file.id) == ("config", "mine")
    (mine / "broken.json").write_text("{not json")
    with pytest.raises(MatrixError, match="is not a usable config.json"):
        resolve_model(str(mine / "broken.json"), "--lora-models")
