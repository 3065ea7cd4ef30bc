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
