"""Parsing the matrix: layers, value forms, the cross product, ids and peft arguments."""

from __future__ import annotations

import pytest

from pytest_lora import matrix
from pytest_lora.matrix import MatrixError
from pytest_lora.specs import LoraSpec


def build(**keys):
    layer = matrix.mapping_layer({"models": ["llama-3.2-1b-tiny"], "quant": ["none"], "ranks": [8], **keys}, "test")
    return matrix.build([layer])


def test_the_cross_product_of_every_key():
    m = build(quant=["none", "nf4"], ranks=[4, 8], targets=["q_proj,v_proj", "all-linear"], variants=["lora", "dora"], seq_len=[64, 128], grad_ckpt=[False, True])
    assert (len(m.models), len(m.quants), len(m.loras), len(m.workloads)) == (1, 2, 2 * 2 * 2, 4)
    assert m.size == 1 * 2 * 8 * 4


def test_alpha_as_a_multiple_of_the_rank_or_a_number():
    assert [s.alpha for s in build(ranks=[4, 16], alpha=["2r"]).loras] == [8, 32]
    assert [s.alpha for s in build(ranks=[4, 16], alpha=[32]).loras] == [32, 32]
    assert [s.alpha for s in build(ranks=[4], alpha=["r", "0.5r"]).loras] == [4, 2]


def test_target_forms():
    assert build(targets="q_proj,v_proj").loras[0].targets == ("q_proj", "v_proj")
    assert build(targets=["q_proj", "v_proj"]).loras[0].targets == ("q_proj", "v_proj"), "a flat list is one set, as in peft"
    assert [s.targets for s in build(targets=[["q_proj"], ["v_proj"]]).loras] == [("q_proj",), ("v_proj",)]
    assert [s.targets for s in build(targets=["q_proj,v_proj", "all-linear"]).loras] == [("q_proj", "v_proj"), "all-linear"]
    assert build(targets="DEFAULT").loras[0].targets == "default"


def test_later_layers_win_key_by_key():
    base = matrix.mapping_layer({"models": ["opt-125m-tiny"], "quant": ["none"], "ranks": [8], "dropout": [0.1]}, "default")
    options = matrix.option_layer({"ranks": ("4,16", "--lora-ranks", None), "targets": ("q_proj|all-linear", "--lora-targets", None)})
    m = matrix.build([base, options])
    assert [(s.r, s.targets, s.dropout) for s in m.loras] == [(4, ("q_proj",), 0.1), (4, "all-linear", 0.1), (16, ("q_proj",), 0.1), (16, "all-linear", 0.1)]


def test_duplicates_collapse():
    m = build(quant=["nf4", "NF4"], ranks=[8, 8])
    assert len(m.quants) == 1 and len(m.loras) == 1


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"ranks": [0]}, "test: ranks: 0 is not a valid rank; allowed: a positive integer"),
        ({"ranks": [True]}, "test: ranks: True is not a valid rank"),
        ({"ranks": []}, "test: ranks: [] is empty; allowed: at least one value"),
        ({"alpha": []}, "test: alpha: [] is empty; allowed: at least one value"),
        ({"optimizers": ["sgd"]}, "test: optimizers: 'sgd' is not a known optimizer; allowed: adamw, adamw8bit, paged_adamw8bit, paged_adamw"),
        ({"alpha": [-1]}, "test: alpha: -1 is not a valid alpha"),
        ({"alpha": ["2x"]}, "test: alpha: '2x' is not a valid alpha"),
        ({"dropout": [1.0]}, "test: dropout: 1.0 is not a valid dropout; allowed: a number in [0, 1)"),
        ({"variants": ["lokr"]}, "test: variants: 'lokr' is not a LoRA variant; allowed: lora, dora, rslora"),
        ({"bias": ["some"]}, "test: bias: 'some' is not a bias mode; allowed: none, lora_only, all"),
        ({"targets": ["q proj"]}, "test: targets: 'q proj' is not a module name"),
        ({"grad_ckpt": ["maybe"]}, "test: grad_ckpt: 'maybe' is not a boolean"),
        ({"seq_len": [0]}, "test: seq_len: 0 is not a valid sequence length"),
        ({"batch": ["x"]}, "test: batch: 'x' is not a batch size"),
        ({"lr": [1e-4]}, "test: 'lr' is not a matrix key; allowed: models, quant, ranks"),
    ],
)
def test_bad_values_say_where_what_and_what_is_allowed(keys, message):
    with pytest.raises(MatrixError) as error:
        build(**keys)
    assert str(error.value).startswith(message)


def test_spec_ids_and_peft_arguments():
    spec = LoraSpec(r=16, alpha=32.0, targets=("q", "v"), dropout=0.05, variant="dora", bias="all", modules_to_save=("lm_head",))
    assert spec.id == "r16-a32-q+v-dora-d0.05-bias-all-save-lm_head"
    assert spec.peft_kwargs() == {
        "r": 16, "lora_alpha": 32.0, "target_modules": ["q", "v"], "lora_dropout": 0.05, "bias": "all",
        "use_dora": True, "use_rslora": False, "modules_to_save": ["lm_head"],
    }  # fmt: skip
    assert LoraSpec(r=4, alpha=8, targets="default").peft_kwargs()["target_modules"] is None
    assert LoraSpec(r=4, alpha=8, targets="all-linear", variant="rslora").peft_kwargs()["use_rslora"] is True


def test_default_matrices_are_valid_and_small_on_the_cpu():
    cpu = matrix.build([matrix.default_layer("cpu")])
    assert all(model.name.endswith("-tiny") for model in cpu.models)
    assert {q.name for q in cpu.quants} >= {"fp32", "bf16", "int8", "nf4"}
    assert [o.name for o in cpu.optimizers] == ["adamw", "adamw8bit"] and len(cpu.serving) == 1
    cuda = matrix.build([matrix.default_layer("cuda")])
    assert [m.name for m in cuda.models] == ["llama-3.2-1b", "llama-3.1-8b"]
