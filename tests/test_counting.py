"""Parameter counts: the closed form against peft on random architectures and random LoRA
configs (hypothesis), against counts worked out by hand from config numbers, and on real
quantized bases."""

from __future__ import annotations

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_lora import ParamCount, count_parameters
from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS
from pytest_lora.measure.params import ClosedFormUnsupported, closed_form, count_model
from pytest_lora.models import build, registry

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@st.composite
def llama_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": heads * head_dim,
        "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0])),
        "intermediate_size": 16 * draw(st.integers(1, 32)),
        "num_hidden_layers": draw(st.integers(1, 4)),
        "vocab_size": draw(st.integers(32, 1000)),
        "tie_word_embeddings": draw(st.booleans()),
        "max_position_embeddings": 128,
    }


def llama_by_hand(config: dict, targets: tuple[str, ...], r: int) -> ParamCount:
    """Trainable and total parameters from the config's numbers, as one would work them out on paper."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {  # (in, out) of each projection
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }  # fmt: skip
    lora = layers * sum(r * sum(shapes[t]) for t in targets)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h  # projections and two RMSNorms
    embeddings = config["vocab_size"] * h * (1 if config["tie_word_embeddings"] else 2)
    return ParamCount(lora, embeddings + layers * per_layer + h + lora)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=llama_configs(),
    targets=st.lists(st.sampled_from(LLAMA_TARGETS), min_size=1, max_size=7, unique=True),
    r=st.integers(1, 64),
)
def test_llama_counts_match_a_count_by_hand(config, targets, r):
    lora = {"r": r, "target_modules": targets}
    expected = llama_by_hand(config, tuple(targets), r)
    assert count_parameters(config, lora) == expected
    assert closed_form(build.build_meta(config), peft.LoraConfig(**lora)) == expected


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=llama_configs(),
    targets=st.one_of(
        st.lists(st.sampled_from(LLAMA_TARGETS), min_size=1, max_size=7, unique=True),
        st.just("all-linear"),
        st.none(),
        st.just(r".*\.(q|v)_proj"),
    ),
    r=st.integers(1, 64),
    dora=st.booleans(),
    rslora=st.booleans(),
    bias=st.sampled_from(["none", "lora_only", "all"]),
    save_head=st.booleans(),
    pattern=st.one_of(st.none(), st.tuples(st.sampled_from(LLAMA_TARGETS), st.integers(1, 32))),
)
def test_closed_form_matches_peft_on_random_architectures(config, targets, r, dora, rslora, bias, save_head, pattern):
    lora = {"r": r, "target_modules": targets, "use_dora": dora, "use_rslora": rslora, "bias": bias}
    if save_head and not config["tie_word_embeddings"]:
        lora["modules_to_save"] = ["lm_head"]
    if pattern:
        lora["rank_pattern"] = {pattern[0]: pattern[1]}
    assert count_parameters(config, lora) == closed_form(build.build_meta(config), peft.LoraConfig(**lora))


@settings(max_examples=30, deadline=None)
@given(
    width=st.sampled_from([16, 32, 64]),
    heads=st.sampled_from([1, 2, 4]),
    layers=st.integers(1, 3),
    targets=st.lists(st.sampled_from(["c_attn", "c_proj", "c_fc"]), min_size=1, max_size=3, unique=True),
    r=st.integers(1, 32),
    bias=st.sampled_from(["none", "lora_only", "all"]),
)
def test_gpt2_conv1d_counts_match_a_count_by_hand(width, heads, layers, targets, r, bias):
    """GPT-2 has biases everywhere: ``bias`` trains those of adapted layers, or all of them."""
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": width, "n_head": heads, "n_layer": layers, "n_positions": 64, "vocab_size": 100}
    shapes = {"c_attn": [(width, 3 * width)], "c_proj": [(width, width), (4 * width, width)], "c_fc": [(width, 4 * width)]}
    lora = layers * sum(r * (i + o) for t in targets for i, o in shapes[t])
    adapted_biases = layers * sum(o for t in targets for _, o in shapes[t])
    all_biases = layers * (3 * width + width + 4 * width + width + 2 * width) + width  # 4 projections, 2 LayerNorms; ln_f
    trained = {"none": 0, "lora_only": adapted_biases, "all": all_biases}[bias]
    counts = count_parameters(config, {"r": r, "target_modules": targets, "bias": bias})
    assert counts.trainable == lora + trained
    assert counts == closed_form(build.build_meta(config), peft.LoraConfig(r=r, target_modules=targets, bias=bias))


def test_bias_all_trains_biases_not_t5_relative_attention_bias():
    """``bias="all"`` trains parameters named ``bias``; T5 has none. Its relative position table,
    ``relative_attention_bias.weight``, is an embedding and stays frozen (peft releases that matched
    "bias" anywhere in a name trained it: the closed form would then disagree, as it should)."""
    lora = {"r": 8, "target_modules": ["q", "v"], "bias": "all"}
    assert count_parameters("flan-t5-base", lora) == count_parameters("flan-t5-base", {**lora, "bias": "none"})
    assert count_parameters("flan-t5-base", lora) == closed_form(build.build_meta(registry.load_config_dict("flan-t5-base")), peft.LoraConfig(**lora))


class RandomMLP(nn.Module):
    """Linear layers of arbitrary shapes, outside transformers: peft adapts any nn.Module."""

    def __init__(self, widths: list[int], bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 300), min_size=2, max_size=6),
    r=st.integers(1, 48),
    bias=st.booleans(),
    data=st.data(),
)
def test_random_shapes_give_r_times_in_plus_out(widths, r, bias, data):
    model = RandomMLP(widths, bias)
    names = [f"layers.{i}" for i in range(len(widths) - 1)]
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    config = peft.LoraConfig(r=r, target_modules=chosen)
    by_hand = sum(r * (widths[int(n.split(".")[1])] + widths[int(n.split(".")[1]) + 1]) for n in chosen)
    base_total = sum(p.numel() for p in model.parameters())
    assert closed_form(model, config) == ParamCount(by_hand, base_total + by_hand)
    peft_model = peft.get_peft_model(model, config)
    assert ParamCount(*peft_model.get_nb_trainable_parameters()) == ParamCount(by_hand, base_total + by_hand)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    quant=st.sampled_from(["int8", "nf4", "fp4", "nf4-dq", "bf16", "fp16"]),
    targets=st.one_of(st.lists(st.sampled_from(LLAMA_TARGETS), min_size=1, max_size=7, unique=True), st.just("all-linear")),
    r=st.integers(1, 32),
    dora=st.booleans(),
)
def test_quantized_bases_count_the_same_as_the_architecture(quant, targets, r, dora):
    """4-bit packing halves ``numel``; the counts on a real quantized base must not notice."""
    spec = resolve_model("llama-3.1-8b-tiny", "test")
    base = build.build_base(spec, QUANTIZATIONS[quant], "cpu")
    lora = {"r": r, "target_modules": targets, "use_dora": dora}
    expected = closed_form(build.build_meta(spec.config_dict()), peft.LoraConfig(**lora))
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    assert ParamCount(*peft_model.get_nb_trainable_parameters()) == expected
    assert count_model(peft_model) == expected


def test_four_bit_storage_really_holds_half_a_byte_per_weight():
    spec = resolve_model("llama-3.2-1b-tiny", "test")
    base = build.build_base(spec, QUANTIZATIONS["nf4"], "cpu")
    weight = base.model.layers[0].mlp.up_proj.weight
    assert weight.numel() * 2 == 64 * 128 and weight.dtype == torch.uint8
    assert count_model(base).total == count_model(build.build_meta(spec.config_dict())).total


# --------------------------------------------------------------------------- published figures


def test_flan_t5_xxl_seed_figure():
    seed = {"r": 16, "lora_alpha": 32, "target_modules": ["q", "v"], "lora_dropout": 0.05, "bias": "none", "task_type": "SEQ_2_SEQ_LM"}
    counts = count_parameters("flan-t5-xxl", seed)
    assert (counts.trainable, counts.total) == (18_874_368, 11_154_206_720)
    assert counts.trainable == 144 * 16 * (4096 + 4096)  # 24 x 2 encoder + 24 x 4 decoder matrices
    assert str(counts) == "trainable params: 18,874,368 || all params: 11,154,206,720 || trainable%: 0.1692"
    assert counts.pct == pytest.approx(0.16921300163961817, rel=1e-12)


def test_a_peft_lora_config_object_counts_like_its_arguments():
    arguments = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "task_type": "SEQ_2_SEQ_LM"}
    assert count_parameters("mt0-large", peft.LoraConfig(**arguments)) == count_parameters("mt0-large", arguments)
    assert count_parameters("mt0-large", arguments) == ParamCount(2_359_296, 1_231_940_608)


def test_a_176b_config_counts_without_memory():
    """BLOOM-176B's fused query_key_value (14336 -> 43008) is peft's default target."""
    counts = count_parameters("bloom-176b", {"r": 16})
    assert counts.trainable == 70 * 16 * (14336 + 3 * 14336)
    assert counts.total == 176_247_271_424 + counts.trainable


def test_options_the_closed_form_does_not_model_are_refused():
    with pytest.raises(ClosedFormUnsupported, match="layers_to_transform"):
        closed_form(build.build_meta(registry.load_config_dict("llama-3.2-1b-tiny")), peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]))
