"""Trainable parameters of LoRA adapters.

What is measured. For every model x quantization x LoRA spec of the matrix, the base model is
built (the real architecture with random weights; quantized bases through their format's
backend: bitsandbytes, torchao or HQQ, on the bench device), the adapter is added with peft, and
the parameters are counted by a walk over the built model and by peft's own
``get_nb_trainable_parameters``, the numbers ``print_trainable_parameters`` shows.

Against which reference. The closed form, computed without peft from the unquantized
architecture on the meta device: r x (in + out) for every adapted layer (LoRA paper §4), plus
out for DoRA's magnitude vector, plus the biases that ``bias`` trains and a full copy of each
module in ``modules_to_save``. Two more ways must agree with it exactly: a direct walk over the
built model's parameters (4-bit packing undone), and ``pytest_lora.count_parameters`` on the meta
device. A quantized base has the same totals as the unquantized one; bitsandbytes' packing of two
4-bit weights per byte is where counts went wrong before (peft #1020, #1594), and HQQ's packing
is where peft's count is still wrong (recorded as ``peft_total_params``). peft must also have put
its own LoRA layer for the format on every quantized layer (``TorchaoLoraLinear``,
``HqqLoraLinear``, ``Linear4bit``...): the trap is a quantized layer wrapped as a plain Linear.

Published figures. ``count_parameters`` reproduces, digit for digit, the counts printed for
published models: the FLAN-T5-XXL seed article (8-bit base, r=16 on q and v), peft's README
(mt0-large; Qwen2.5-3B), peft's int8 OPT-6.7B notebook, and the LoRA paper's closed form
2 x L x d_model x r on Llama-2-7B's q and v projections. The 176B-parameter BLOOM is counted
too, with the time each count takes (``count_time_s``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from pytest_lora.lazy import lazy_import

peft = lazy_import("peft")
params = lazy_import("pytest_lora.measure.params")
build = lazy_import("pytest_lora.models.build")
adapters = lazy_import("pytest_lora.models.adapters")


pytestmark = pytest.mark.lora_params


def record_counts(lora_bench: Any, counts: params.ParamCount) -> None:
    lora_bench.record("trainable_params", counts.trainable, "params")
    lora_bench.record("total_params", counts.total, "params")
    lora_bench.record("trainable_pct", counts.pct, "%")


def test_trainable_parameters(lora_model, lora_config, model_spec, quant_spec, quant_format, lora_bench):
    """The built (possibly quantized) base with its adapter, counted three ways that must agree:
    a walk over its parameters (each quantized layer as its format stores it), the closed form on
    the architecture, and peft on the meta device. peft's own count on the built model must agree
    too where peft counts the format's weights (it does not unpack HQQ's); and peft must have
    dispatched the format's own LoRA layer on every quantized layer."""
    counted = params.count_model(lora_model)
    record_counts(lora_bench, counted)
    by_peft = params.ParamCount(*lora_model.get_nb_trainable_parameters())
    lora_bench.record("peft_total_params", by_peft.total, "params")

    config_dict = model_spec.config_dict()
    expected = params.closed_form(build.build_meta(config_dict), lora_config)
    lora_bench.check(counted == expected, f"the walk over the built model: {counted}; closed form: {expected}")
    lora_bench.check(params.count_parameters(config_dict, lora_config) == expected, "the meta-device count disagrees")
    if quant_format.peft_counts_weights:
        lora_bench.check(by_peft == expected, f"peft on the built base: {by_peft}; closed form: {expected}")
    else:
        lora_bench.check(by_peft.trainable == expected.trainable, f"peft's trainable count {by_peft.trainable:,d}; closed form {expected.trainable:,d}")
    wrong = adapters.dispatch_problems(lora_model, quant_spec)
    lora_bench.check(not wrong, f"peft did not dispatch {quant_format.peft_layer(quant_spec)}: {wrong}")


@dataclass(frozen=True)
class Published:
    """A count printed for a published model, and where it was printed."""

    model: str
    lora: dict[str, Any]
    trainable: int
    total: int
    source: str

    @property
    def id(self) -> str:
        return self.model


PUBLISHED = (
    Published(
        "flan-t5-xxl",
        dict(r=16, lora_alpha=32, target_modules=["q", "v"], lora_dropout=0.05, bias="none", task_type="SEQ_2_SEQ_LM"),
        18_874_368,
        11_154_206_720,
        "seed article, FLAN-T5-XXL loaded in 8-bit: 144 matrices x 16 x (4096 + 4096); untied lm_head",
    ),
    Published(
        "mt0-large",
        dict(r=8, lora_alpha=32, lora_dropout=0.1, task_type="SEQ_2_SEQ_LM"),
        2_359_296,
        1_231_940_608,
        "peft README quicktour (bigscience/mt0-large)",
    ),
    Published(
        "qwen2.5-3b",
        dict(r=16, task_type="CAUSAL_LM"),
        3_686_400,
        3_089_625_088,
        "peft README (Qwen/Qwen2.5-3B-Instruct, the same shapes as Qwen2.5-3B)",
    ),
    Published(
        "opt-6.7b",
        dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"),
        8_388_608,
        6_666_862_592,
        "peft's int8 training notebook for facebook/opt-6.7b",
    ),
    Published(
        "llama-2-7b",
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        2 * 64 * 4096 * 8,
        6_738_415_616 + 2 * 64 * 4096 * 8,
        "LoRA paper §5.1: 2 x L x d_model x r with L = 64 adapted 4096 x 4096 matrices, r = 8",
    ),
    Published(
        "bloom-176b",
        dict(r=16, task_type="CAUSAL_LM"),
        70 * 16 * (14336 + 3 * 14336),
        176_247_271_424 + 70 * 16 * (14336 + 3 * 14336),
        "BLOOM's published 176,247,271,424 parameters plus r x (in + out) on its 70 fused query_key_value layers",
    ),
)


@pytest.mark.parametrize("published", PUBLISHED, ids=[p.id for p in PUBLISHED])
def test_published_counts(published, lora_bench):
    """``count_parameters`` gives exactly the published counts, for the real architecture."""
    lora_bench.describe(model=published.model, quant="none", lora=peft.LoraConfig(**published.lora))
    started = time.perf_counter()
    counts = params.count_parameters(published.model, published.lora)
    lora_bench.record("count_time_s", time.perf_counter() - started, "s")
    record_counts(lora_bench, counts)
    lora_bench.record("published_trainable_params", published.trainable, "params")
    lora_bench.record("published_total_params", published.total, "params")
    assert (counts.trainable, counts.total) == (published.trainable, published.total), published.source
