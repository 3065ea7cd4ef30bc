"""The layouts behind the analytic step: the registry's shipped ones are what the installed
transformers builds, and a layout counts the adapter's tensors as the meta model does
(``measure.params``, which reads the modules themselves) for every way peft names targets,
biases and saved modules; the cache and the shipped files are only ever used for their own config."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import peft
import pytest

from pytest_lora.measure import params, step
from pytest_lora.models import build, formats, layout, registry, storage
from pytest_lora.specs import OPTIMIZERS, QUANTIZATIONS, QuantSpec


def test_the_shipped_layouts_are_what_make_layouts_writes_with_the_installed_transformers(tmp_path, monkeypatch):
    """``make layouts`` again, into a scratch directory: every file equals the shipped one, so a
    transformers that changes a module's shape or name fails here (and on the GPU host's stack)."""
    monkeypatch.setattr(layout, "SHIPPED", tmp_path)
    layout.write_shipped()
    written = sorted(path.name for path in tmp_path.glob("*.json"))
    assert written == sorted(f"{name}.json" for name in registry.names())
    stale = [name for name in written if (tmp_path / name).read_bytes() != (layout.Path(layout.__file__).parent / "layouts" / name).read_bytes()]
    assert not stale, f"run `make layouts`: {stale} differ from what the installed transformers builds"


@pytest.mark.parametrize("quant", [quant for quant in QUANTIZATIONS.values() if quant.is_quantized], ids=lambda quant: quant.name)
def test_the_estimates_byte_arithmetic_is_each_formats_own(quant):
    """The estimate prices a quantized weight with ``storage`` (no torch), the memory suite asks
    the format (``Format.tensor_bytes``, the seam a planted formula replaces): they must agree,
    on square, ragged and padded shapes."""
    missing = formats.unavailable(quant, "cpu")
    if missing and "not installed" in missing:
        pytest.skip(missing)
    for rows, columns in [(4096, 4096), (1000, 3000), (8, 64), (151936, 896), (14336, 4096)]:
        assert storage.quantized_bytes(rows, columns, quant) == formats.of(quant).tensor_bytes(rows, columns, quant)


def test_a_backend_added_since_is_priced_by_its_format(monkeypatch):
    """A format of a backend that ``storage`` does not know (the recipe of a new one,
    ``tests/test_recipes.py``) is asked through its ``Format``."""
    backend = types.ModuleType("toy_backend")
    backend.FORMAT = types.SimpleNamespace(tensor_bytes=lambda rows, columns, quant: rows * columns + 1)
    monkeypatch.setitem(sys.modules, "toy_backend", backend)
    monkeypatch.setitem(formats.BACKENDS, "toy", "toy_backend")
    assert storage.quantized_bytes(8, 64, QuantSpec("toy-int8", "toy", "bfloat16", "int8")) == 8 * 64 + 1


LORAS = [
    {"r": 4, "target_modules": None},
    {"r": 4, "target_modules": "all-linear", "use_dora": True},
    {"r": 8, "target_modules": ["q_proj", "v_proj", "c_attn", "q", "v", "query", "value", "query_key_value"], "bias": "lora_only",
     "rank_pattern": {"v_proj": 2, "value": 2}},
    {"r": 4, "target_modules": r".*\.(k_proj|key|k|c_proj|dense)", "bias": "all"},
    {"r": 4, "target_modules": "all-linear", "modules_to_save": ["lm_head", "layers.0", "embed_tokens", "shared"]},
]


@pytest.mark.parametrize("name", ["llama-3.2-1b-tiny", "gpt2-medium-tiny", "flan-t5-base-tiny", "opt-125m-tiny", "bloom-176b-tiny"])
def test_a_layout_counts_the_adapter_as_the_meta_model_does(name):
    """Adapted layers and trainable tensor sizes, against ``measure.params`` on the model itself:
    peft's default targets, all-linear with DoRA, named targets with a rank pattern and the
    adapted layers' biases, a regular expression with every bias, and saved modules (Llama-3.2-1B
    ties its output layer to the embeddings: a saved lm_head is that one tensor)."""
    config = registry.load_config_dict(name)
    found, meta = layout.of(config, name), build.build_meta(config)
    for kwargs in LORAS:
        lora = peft.LoraConfig(**kwargs)
        assert found.adapted(lora) == params.adapted_layers(meta, lora), kwargs
        assert sorted(found.trainable_sizes(lora)) == sorted(params.trainable_tensor_sizes(meta, lora)), kwargs


def test_an_unmodelled_option_or_a_missing_default_is_refused():
    found = layout.of(registry.load_config_dict("llama-3.2-1b-tiny"), "llama-3.2-1b-tiny")
    with pytest.raises(layout.Unmodelled, match="layers_to_transform"):
        found.adapted(peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]))
    with pytest.raises(layout.Unmodelled, match="no default LoRA targets for model_type 'llama'"):
        dataclasses.replace(found, default_targets=None).adapted(peft.LoraConfig(r=4))
    with pytest.raises(ValueError, match="adamw8bit: an 8-bit optimizer's state needs"):
        step.optimizer_state_bytes(OPTIMIZERS["adamw8bit"], [4096])


def test_a_shipped_layout_serves_only_its_own_config(tmp_path, monkeypatch):
    """A registry name whose config differs from the shipped one's (a changed registry file) is
    built and cached, not read from the shipped file."""
    monkeypatch.setenv("PYTEST_LORA_CACHE", str(tmp_path))
    config = {**registry.load_config_dict("llama-3.2-1b-tiny"), "num_hidden_layers": 1}
    found = layout.of(config, "llama-3.2-1b-tiny")
    assert found == layout.built(config) != layout.of(registry.load_config_dict("llama-3.2-1b-tiny"), "llama-3.2-1b-tiny")
    assert [json.loads(path.read_text()) for path in (tmp_path / "layouts").glob("*.json")] == [found.as_json()]
    assert layout.of(config) == found  # from the cache


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PYTEST_LORA_CACHE", str(tmp_path / "file"))
    config = {**registry.load_config_dict("llama-3.2-1b-tiny"), "num_hidden_layers": 1}
    assert layout.of(config) == layout.built(config)
