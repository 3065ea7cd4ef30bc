"""ARCHITECTURE.md's recipes, each followed once: a new storage format, a new suite, a new kind of
metric for the gate (``test_gate_rules.py``, next to the gate's other tests) and a new headline
table. Each adds a small one the way the recipe says, and nothing else, and shows that the rest
of pytest-lora takes it up."""

from __future__ import annotations

import json

import torch

from pytest_lora import specs
from pytest_lora.measure import memory
from pytest_lora.models import build, formats, registry
from pytest_lora.models.resolve import resolve_model
from pytest_lora.report import catalog, headline, markdown, terminal

# A storage format as its own backend module: weights as int8 with an fp32 scale per row.
ROW_INT8 = '''
import torch
from torch import nn

from pytest_lora.models.formats.base import Format


class RowInt8Linear(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(weight.float() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, (self.qweight.float() * self.scale).to(x.dtype), bias)


class RowInt8(Format):
    backend = "row_int8"

    def quantize_layer(self, weight, bias, quant):
        return RowInt8Linear(weight, bias)

    def owns(self, module):
        return isinstance(module, RowInt8Linear)

    def dequantize(self, module):
        return module.qweight.float() * module.scale

    def weights_in(self, module):
        return module.qweight.numel() + (0 if module.bias is None else module.bias.numel())

    def tensor_bytes(self, rows, columns, quant):
        return rows * columns + 4 * rows


FORMAT = RowInt8()
'''


def test_a_new_format_is_one_backend_module_and_its_table_entries(tmp_path, monkeypatch):
    """The recipe: a module with a ``FORMAT``, its line in ``formats.BACKENDS`` and its format in
    ``specs.QUANTIZATIONS``. A base built in it stores what its ``tensor_bytes`` says, the memory
    model counts it so, its layers dequantize to the weights they were made from, and the format
    of each layer is found through the seam."""
    (tmp_path / "row_int8.py").write_text(ROW_INT8)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(formats.BACKENDS, "row_int8", "row_int8")
    quant = specs.QuantSpec("row-int8", "row_int8", "bfloat16", scheme="int8")
    monkeypatch.setitem(specs.QUANTIZATIONS, quant.name, quant)
    name = "llama-3.2-1b-tiny"
    config = registry.load_config_dict(name)
    full = build.build_base(resolve_model(name, "test"), specs.QUANTIZATIONS["bf16"], "cpu")
    base = build.build_base(resolve_model(name, "test"), quant, "cpu")
    assert formats.unavailable(quant, "cpu") is None
    layers = {module_name: module for module_name, module in base.named_modules() if formats.layer_format(module) is formats.of(quant)}
    assert layers and all(type(module).__name__ == "RowInt8Linear" for module in layers.values())
    assert memory.storage_bytes(base) == memory.analytic_weight_bytes(config, quant) < memory.analytic_weight_bytes(config, specs.QUANTIZATIONS["bf16"])
    original = dict(full.named_modules())
    for module_name, module in layers.items():
        weight = original[module_name].weight.float()
        assert (formats.dequantized(module) - weight).abs().max() <= weight.abs().amax(dim=1).max() / 127
    tokens = torch.randint(0, config["vocab_size"], (1, 8))
    assert torch.isfinite(base(tokens).logits).all()


TOY_SUITE = '''
import pytest

pytestmark = pytest.mark.lora_quality


def test_toy_quality(lora_bench):
    lora_bench.describe(model="toy")
    lora_bench.record("heldout_loss", 2.5, "nats")
'''


def test_a_new_suite_is_its_file_and_one_catalog_entry(pytester, monkeypatch):
    """The recipe: the suite's file and its ``catalog.SUITES`` entry. Its marker is registered
    (``--strict-markers`` passes), its short name selects it, its records carry its name, and the
    report counts it as a built-in suite's test, not a user's own."""
    quality = catalog.Suite("lora_quality", "quality of the fine-tune", {"test_toy_quality": ()})
    monkeypatch.setattr(catalog, "SUITES", (*catalog.SUITES, quality))
    pytester.makepyfile(test_quality=TOY_SUITE)
    result = pytester.runpytest("--lora-bench", "--strict-markers", "-m", "quality", "-p", "no:cacheprovider", "test_quality.py")
    result.assert_outcomes(passed=1)
    (record,) = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    assert (record["suite"], record["metrics"]) == ("quality", {"heldout_loss": 2.5})
    assert headline.without_headline([record]) == [] and catalog.readers("test_toy_quality") == ()
    pytester.runpytest("--markers", "-p", "no:cacheprovider").stdout.fnmatch_lines(
        ["@pytest.mark.lora_quality: benchmark suite: quality of the fine-tune*", "@pytest.mark.quality: alias of lora_quality*"])


def test_a_new_headline_table_is_one_builder(monkeypatch):
    """The recipe: a function from records to a ``headline.Section`` in ``headline.BUILDERS``,
    reading its test through the catalog. The markdown report and the terminal's headline show
    it, from the records alone."""
    def quality_section(records, compact=False):
        found = grid.ok_records(records, catalog.STEP_TIME)
        if not found:
            return None
        rows = [[r["quant"], f"{r['metrics']['tokens_per_s']:.0f}"] for r in found]
        return headline.Section("quality", "Tokens per second, by format", ["quant", "tokens/s"], rows, 1)

    from pytest_lora.report import grid

    monkeypatch.setattr(headline, "BUILDERS", (*headline.BUILDERS, quality_section))
    record = {"suite": "step_time", "test": f"suites/test_step_time.py::{catalog.STEP_TIME}[x]", "model": "m", "quant": "nf4",
              "lora": None, "workload": None, "status": "ok", "metrics": {"tokens_per_s": 1234.0}, "units": {"tokens_per_s": "tokens/s"},
              "error": None, "warnings": [], "samples": {}}
    document = {"schema_version": 1, "run": {"id": "r", "status": "passed", "argv": [], "git": {}, "builds": []},
                "machine": {"device": "cpu"}, "records": [record]}
    assert "Tokens per second, by format" in markdown.render_run(document) and "| nf4 | 1234 |" in markdown.render_run(document)
    assert "Tokens per second, by format" in terminal.render_headline_terminal([record], 120, False)

