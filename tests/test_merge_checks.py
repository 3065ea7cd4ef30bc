"""The merge checks: the formula against peft on random layers (hypothesis), and the merge suite
failing when a merge is planted wrong, on a full-precision and on a quantized base."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from pytest_lora.measure import merge
from pytest_lora.measure.merge import delta_error_bound, expected_delta, expected_merged, rounding_tolerance

SUITE = Path(__file__).parents[1] / "suites" / "test_merge.py"
ARGS = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=fp32,nf4", "--lora-ranks=8", "--lora-targets=q_proj", "-k", "full_precision or quantized")


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fan_in=st.integers(1, 96),
    fan_out=st.integers(1, 96),
    r=st.integers(1, 16),
    alpha=st.floats(0.5, 64),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    rslora=st.booleans(),
    dora=st.booleans(),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_peft_merges_by_the_formula(fan_in, fan_out, r, alpha, dtype, rslora, dora, conv1d, seed):
    """W' = W + s B A (alpha / r, or alpha / sqrt(r)), transposed for Conv1D, DoRA rescaled per row."""
    torch.manual_seed(seed)
    layer = Conv1D(fan_out, fan_in) if conv1d else nn.Linear(fan_in, fan_out)
    nn.init.normal_(layer.weight, std=0.05)
    model = OneLayer(layer.to(dtype))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=rslora, use_dora=dora, fan_in_fan_out=conv1d)
    lora = peft.get_peft_model(model, config)
    lora_layer = lora.base_model.model.proj
    with torch.no_grad():
        lora_layer.lora_B["default"].weight.normal_(std=0.05)
    before = lora_layer.get_base_layer().weight.detach().clone()
    expected = expected_merged(lora_layer, config, before)
    bound = delta_error_bound(lora_layer, config)
    merged = lora.merge_and_unload().proj.weight.double()
    tolerance = (4 if dora else 1) * rounding_tolerance(dtype, before.double(), expected - before.double()) + bound
    assert ((merged - expected).abs() <= tolerance).all()
    assert expected_delta(lora_layer, config).shape == before.shape


WRONG_MERGES = {
    "scaled by 1.01": "delta * 1.01",
    "transposed": "delta.T.contiguous()",
}


@pytest.fixture
def merge_suite(suite):
    return suite(SUITE.read_text(), name="test_merge_copy.py")


def plant(pytester, wrong: str) -> None:
    """Every LoRA layer class's delta made wrong the same way, for the inner run only."""
    pytester.makeconftest(
        f"""
        import pytest
        from peft.tuners.lora import bnb, layer

        @pytest.fixture(autouse=True)
        def wrong_merge(monkeypatch):
            for cls in (layer.Linear, bnb.Linear4bit, bnb.Linear8bitLt):
                real = cls.get_delta_weight

                def planted(self, adapter, real=real):
                    delta = real(self, adapter)
                    return {wrong}

                monkeypatch.setattr(cls, "get_delta_weight", planted)
        """
    )


def test_the_merge_suite_passes_on_peft_as_it_is(pytester, merge_suite):
    pytester.runpytest(*ARGS).assert_outcomes(passed=2, deselected=5)


@pytest.mark.parametrize("wrong", list(WRONG_MERGES), ids=list(WRONG_MERGES))
def test_the_merge_suite_fails_on_a_wrong_merge(pytester, merge_suite, wrong):
    plant(pytester, WRONG_MERGES[wrong])
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(failed=2, deselected=5)
    result.stdout.fnmatch_lines(["FAILED*test_merge_full_precision[[]llama-3.2-1b-tiny-fp32-*", "FAILED*test_merge_quantized[[]llama-3.2-1b-tiny-nf4-*"])
    import json

    records = {r["test"].split("::")[1].split("[")[0]: r for r in json.loads((pytester.path / "results" / "latest.json").read_text())["records"]}
    # the suite checks before it records, but a failed check stops nothing: every metric is kept
    assert records["test_merge_full_precision"]["status"] == "error" and "peft's delta is not s B A" in records["test_merge_full_precision"]["error"]
    assert {"merge_drift_k100", "merge_kl", "merge_top1"} <= set(records["test_merge_full_precision"]["metrics"])
    assert {"merge_kl_dequantize", "merge_kl_original", "requant_err_over_update", "merge_kl_requantize"} <= set(records["test_merge_quantized"]["metrics"])


# --------------------------------------------------------------------------- the recorded metrics


def test_logits_agreement_by_hand():
    reference = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    other = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    p, q = torch.softmax(torch.tensor([2.0, 0.0]), 0), torch.softmax(torch.tensor([0.0, 1.0]), 0)
    kl_second = float((p * (p.log() - q.log())).sum())  # the first position agrees exactly: KL 0
    agreement = merge.logits_agreement(reference, other)
    assert agreement["max_abs_err"] == 2.0
    assert agreement["kl"] == pytest.approx(kl_second / 2)
    assert agreement["top1"] == 0.5  # position 0 ties (argmax 0 both), position 1 disagrees
    # the reference's spread: values 0, 0, 2, 0 have mean 0.5 and squared deviations summing to 3, over n - 1 = 3
    assert merge.logit_spread(reference) == 1.0
    assert merge.logit_spread(10 * reference) == 10.0  # and it scales with the logits


def adapted_pair(dtype=torch.float32):
    torch.manual_seed(0)
    model = OneLayer(nn.Linear(32, 24).to(dtype))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])
    return peft.get_peft_model(model, config), config


def test_relative_update_is_what_was_asked():
    model, config = adapted_pair()
    largest = merge.set_relative_update(model, config, 0.01, torch.Generator().manual_seed(1))
    layer = model.base_model.model.proj
    by_hand = (config.lora_alpha / config.r) * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert float(by_hand.norm() / layer.get_base_layer().weight.norm()) == pytest.approx(0.01, rel=1e-5)
    assert largest == pytest.approx(0.01, rel=1e-5)


def test_requantization_error_reads_what_the_merge_lost():
    model, config = adapted_pair()
    merge.set_relative_update(model, config, 0.01, torch.Generator().manual_seed(1))
    layer = model.base_model.model.proj
    name = "base_model.model.proj"
    original = layer.get_base_layer().weight.detach().clone()
    expected = {name: merge.expected_merged(layer, config, original)}
    merged = model.merge_and_unload()
    assert merge.requantization_error(merged, expected, {name: original}) < 1e-5  # float32: nothing lost
    update = expected[name] - original.double()
    with torch.no_grad():
        merged.proj.weight += (0.5 * update).float()  # as if half the update were rounded away twice over
    assert merge.requantization_error(merged, expected, {name: original}) == pytest.approx(0.5, rel=1e-4)


def test_cycle_drift_reads_what_unmerging_leaves():
    model, config = adapted_pair()
    merge.set_relative_update(model, config, 0.01, torch.Generator().manual_seed(1))
    layers = merge.lora_layers(model)
    before = {n: l.get_base_layer().weight.detach().clone() for n, l in layers.items()}
    assert max(merge.cycle_drift(layers, before, (1, 10)).values()) < 1e-6  # float32 merges and unmerges cleanly
    layer = next(iter(layers.values()))
    real_unmerge = type(layer).unmerge

    def leaky_unmerge(self):
        real_unmerge(self)
        with torch.no_grad():
            self.get_base_layer().weight += 1e-3  # leaves a residue each cycle

    type(layer).unmerge = leaky_unmerge
    try:
        drift = merge.cycle_drift(layers, {n: w.clone() for n, w in before.items()}, (1, 10))
    finally:
        type(layer).unmerge = real_unmerge
    scale = float(before[next(iter(before))].abs().max())
    assert drift[1] == pytest.approx(1e-3 / scale, rel=0.01)
    assert drift[10] == pytest.approx(10e-3 / scale, rel=0.01)


@pytest.mark.parametrize("name", ["gpt2-medium-tiny", "flan-t5-base-tiny"])
def test_a_merged_model_is_compared_in_eval_mode(name):
    """A model built from its config is in training mode: GPT-2's and T5's dropout (0.1) made the
    dequantize and original merges differ from the unmerged adapter by 0.3 and 25 logits, on every
    format. Merged, the dequantized GPT-2 agrees with its unmerged nf4 adapter as Llama does."""
    from pytest_lora.models import adapters, build
    from pytest_lora.models.resolve import resolve_model
    from pytest_lora.specs import QUANTIZATIONS

    spec = resolve_model(name, "test")
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0)
    ids = torch.randint(0, spec.config_dict()["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
            return model(input_ids=ids, **kwargs).logits.float()

    with adapters.attached(build.build_base(spec, QUANTIZATIONS["nf4"], "cpu"), config) as qlora:
        qlora.eval()
        merge.set_relative_update(qlora, config, 0.01, torch.Generator().manual_seed(1))
        merged = merge.merge_into(build.instantiate(spec.config_dict(), "cpu", torch.bfloat16), qlora, config, dequantize_base=True)
        assert not merged.training and torch.equal(logits(merged), logits(merged))  # no dropout between two calls
        agreement = merge.logits_agreement(logits(qlora), logits(merged))
        spread = merge.logit_spread(logits(qlora))
    # relative to its logits' spread the merge errs as little on T5 as on GPT-2 (both about 0.045 here)
    assert agreement["max_abs_err"] / spread < 0.2, (agreement, spread)
    if name.startswith("gpt2"):
        assert agreement["kl"] < 1e-5, agreement  # Llama's on nf4: 4e-7; with dropout: 2e-3
        assert spread < 0.5, spread  # its output layer is drawn with std 0.02: 0.17
    else:  # a random T5's output layer is drawn with std 1.0 (transformers' T5 _init_weights): 8.2, and KL ~ spread squared
        assert spread > 2.0, spread
