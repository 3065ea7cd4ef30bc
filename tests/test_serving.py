"""The serving suite's numbers against independent references: greedy decoding with the KV cache
against full forwards, mixed batches against single adapters (and a planted misrouted row), the
adapter file against the parameter count (and a planted half-precision save), every latency
variant on the same token ids; and what the gate and the report make of the new metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pytest_lora.measure import serving
from pytest_lora.models import build
from pytest_lora.models.resolve import resolve_model
from pytest_lora.report import headline
from pytest_lora.gate import kinds, rules
from pytest_lora.specs import QUANTIZATIONS

SUITES = Path(__file__).parents[1] / "suites"
# r8 on q (64 -> 64) and v (64 -> 16: one key-value head of 16) in each of the tiny Llama's 2 layers
TINY_ADAPTER = 2 * (8 * (64 + 64) + 8 * (64 + 16))
SERVING_RUN = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-ranks=8", "--lora-targets=default")


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["llama-3.2-1b-tiny", "gpt2-medium-tiny", "flan-t5-base-tiny"])
def test_decoding_with_the_cache_equals_full_forwards(name):
    """Each token decoded with the KV cache has the logits a full forward over the prompt and the
    tokens so far gives (for T5, over the decoder's inputs)."""
    model = build.build_base(resolve_model(name, "test"), QUANTIZATIONS["fp32"], "cpu").eval()
    ids = serving.prompt_ids(model.config.vocab_size, 2, 8, "cpu", 0)
    generation = serving.Generation(model, ids)
    tokens, steps = [], []
    with torch.no_grad():
        generation.prefill()
        for _ in range(3):
            tokens.append(generation.next_token)
            generation.decode()
            steps.append(generation.logits)
        for index, logits in enumerate(steps):
            so_far = torch.cat(tokens[:index + 1], dim=1)
            if generation.encoder_decoder:
                start = torch.full((2, 1), model.config.decoder_start_token_id, dtype=torch.long)
                full = model(input_ids=ids, decoder_input_ids=torch.cat([start, so_far], dim=1)).logits[:, -1]
            else:
                full = model(input_ids=torch.cat([ids, so_far], dim=1)).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


def test_latency_times_warmup_apart_and_every_token():
    class Clock:
        def __init__(self):
            self.times = []

        def time(self, step):
            step()
            self.times.append(float(len(self.times)))

    model = build.build_base(resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS["fp32"], "cpu").eval()
    ids = serving.prompt_ids(256, 1, 4, "cpu", 0)
    measured = serving.latency(model, ids, new_tokens=3, timer_factory=Clock, warmup=2, rounds=2)
    assert measured.prefill == [2.0, 3.0]  # the third and fourth prefill: two warm-up rounds dropped
    assert measured.decode == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]


def test_overhead_is_pefts_definition():
    assert serving.overhead_pct(1.2, 1.0) == pytest.approx(20.0)
    assert serving.overhead_pct(0.9, 1.0) == pytest.approx(-10.0)


# --------------------------------------------------------------------------- mixed batches


def test_rows_per_adapter():
    assert serving.rows_per_adapter(1, 2) == [0, 0]
    assert serving.rows_per_adapter(4, 2) == [0, 1, 2, 3]
    assert serving.rows_per_adapter(4, 6) == [0, 1, 2, 3, 0, 1, 2, 3]


def test_a_misrouted_row_is_found():
    generator = torch.Generator().manual_seed(0)
    alone = {name: torch.randn(4, 32, generator=generator) for name in ("base", "a", "b")}
    routed = ["a", "b", "a", "b"]
    mixed = torch.stack([alone[name][row] for row, name in enumerate(routed)])
    assert serving.check_mixed_batch(mixed, alone, routed).wrong_rows == []
    mixed[2] = alone["b"][2]  # row 2 computed with the other adapter
    check = serving.check_mixed_batch(mixed, alone, routed)
    assert check.wrong_rows == [2] and check.beyond_rounding == [2]
    mixed[2] = alone["base"][2]  # row 2 lost its adapter
    assert serving.check_mixed_batch(mixed, alone, routed).wrong_rows == [2]


def test_rounding_tolerance_follows_the_dtype():
    alone = {"base": torch.zeros(1, 4, dtype=torch.bfloat16), "a": torch.full((1, 4), 64.0, dtype=torch.bfloat16)}
    one_ulp = torch.full((1, 4), 64.5, dtype=torch.bfloat16)  # bf16 steps by 0.5 at 64
    assert serving.check_mixed_batch(one_ulp, alone, ["a"]).beyond_rounding == []
    assert serving.check_mixed_batch(one_ulp.float(), {k: v.float() for k, v in alone.items()}, ["a"]).beyond_rounding == [0]


def test_the_tolerance_widens_to_the_measured_batch_shape_noise_and_misrouting_is_still_found():
    """A half-precision model's rows move by up to a logit with the batch's shape: measured, that
    noise widens the tolerance, and a row sent to another adapter is still found."""
    alone = {"base": torch.zeros(2, 4), "a": torch.full((2, 4), 4.0), "b": torch.full((2, 4), -4.0)}
    routed = ["a", "b"]
    mixed = torch.stack([alone["a"][0] + 0.5, alone["b"][1]])  # half a logit off: far beyond float32's rounding
    assert serving.check_mixed_batch(mixed, alone, routed).beyond_rounding == [0]
    assert serving.check_mixed_batch(mixed, alone, routed, noise_floor=0.3).beyond_rounding == []  # within 2 x 0.3
    assert serving.check_mixed_batch(mixed, alone, routed, noise_floor=0.2).beyond_rounding == [0]
    mixed[1] = alone["a"][1]
    assert serving.check_mixed_batch(mixed, alone, routed, noise_floor=10.0).wrong_rows == [1]


def test_batch_shape_noise_runs_each_row_alone_with_its_adapter(monkeypatch):
    calls = []

    class Model:
        def set_adapter(self, name):
            self.active = name

    model = Model()
    ids = torch.arange(6).view(3, 2)
    alone = {"a": torch.zeros(3, 4), "b": torch.ones(3, 4)}
    monkeypatch.setattr(serving, "last_logits", lambda m, row: calls.append((m.active, row.tolist())) or torch.full((1, 4), 0.25 if m.active == "a" else 1.0))
    assert serving.batch_shape_noise(model, ids, alone, ["a", "b", "a"]) == 0.25
    assert calls == [("a", [[0, 1]]), ("b", [[2, 3]]), ("a", [[4, 5]])]


def test_peft_s_mixed_path_rounds_in_half_precision_and_its_noise_is_measured_with_no_routing():
    """peft's mixed-batch path rounds each LoRA term to bf16 before adding it, a plain forward
    adds it in float32: every row routed to one adapter already differs from that adapter alone
    in bf16 (0 in float32), and ``mixed_path_noise`` is that difference, per adapter."""
    import copy

    import peft

    from pytest_lora.models import build, registry

    def noise(dtype):
        torch.manual_seed(0)
        base = build.instantiate(registry.load_config_dict("llama-3.2-1b-tiny"), "cpu", dtype).eval()
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(base, copy.deepcopy(config))
        model.add_adapter("b", copy.deepcopy(config))
        model.eval()
        ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(1))
        alone = {}
        for name in ("default", "b"):
            model.set_adapter(name)
            alone[name] = serving.last_logits(model, ids)
        measured = serving.mixed_path_noise(model, ids, alone, ["default", "b"])
        model.set_adapter("b")
        by_hand = (serving.last_logits(model, ids, adapter_names=["b"] * 4).float() - alone["b"].float()).abs().max().item()
        return measured, by_hand

    measured, by_hand = noise(torch.bfloat16)
    assert measured >= by_hand > 0
    assert noise(torch.float32)[0] < 1e-5


def test_the_suite_fails_on_a_mixed_batch_that_routes_a_row_to_the_wrong_adapter(pytester, suite):
    pytester.makepyfile(planted_routing="""
        import peft
        import pytest

        real = peft.PeftModelForCausalLM.forward

        def misrouted(self, *args, adapter_names=None, **kwargs):
            if adapter_names is not None and len(set(adapter_names)) > 1:
                adapter_names = [adapter_names[1], *adapter_names[1:]]  # row 0 gets row 1's adapter
            return real(self, *args, adapter_names=adapter_names, **kwargs)

        @pytest.fixture(autouse=True)
        def planted(monkeypatch):
            monkeypatch.setattr(peft.PeftModelForCausalLM, "forward", misrouted)
        """)
    pytester.syspathinsert()
    suite((SUITES / "test_serving.py").read_text(), name="test_serving_copy.py")
    result = pytester.runpytest("-p", "planted_routing", *SERVING_RUN, "--lora-quant=bf16", "-k", "mixed")
    result.assert_outcomes(passed=1, failed=2)  # one adapter cannot be misrouted
    result.stdout.fnmatch_lines(["*rows [[]0[]] of the mixed batch are nearer another adapter's output than their own*"])


def test_a_mixed_batch_whose_noise_hides_misrouting_says_so(pytester, suite):
    """LLM.int8 moves a row by as much as its adapters lie apart: the record warns that the check
    is no finer than the routing (here the noise is planted)."""
    pytester.makepyfile(planted_noise="""
        import pytest
        from pytest_lora.measure import serving

        @pytest.fixture(autouse=True)
        def planted(monkeypatch):
            monkeypatch.setattr(serving, "batch_shape_noise", lambda *args: 50.0)
            monkeypatch.setattr(serving, "mixed_path_noise", lambda *args: 0.0)
        """)
    pytester.syspathinsert()
    suite((SUITES / "test_serving.py").read_text(), name="test_serving_copy.py")
    result = pytester.runpytest("-p", "planted_noise", *SERVING_RUN, "--lora-quant=bf16", "-k", "mixed and 4-adapters")
    result.assert_outcomes(passed=1)
    [record] = [r for r in json.loads((pytester.path / "results" / "latest.json").read_text())["records"] if "4-adapters" in r["test"]]
    assert record["metrics"]["batch_shape_noise"] == 50.0
    assert any("this mixed batch can't be checked finer" in warning for warning in record["warnings"])


# --------------------------------------------------------------------------- the adapter's file


def test_safetensors_layout_read_from_the_bytes(tmp_path):
    tensors = {"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "x.safetensors")
    layout = serving.safetensors_layout(tmp_path / "x.safetensors")
    assert layout.tensors == 2 and layout.elements == 22 and layout.data_bytes == 15 * 4 + 7 * 2
    assert layout.file_bytes == (tmp_path / "x.safetensors").stat().st_size == layout.header_bytes + layout.data_bytes
    assert layout.contiguous and layout.dtypes == {"F32", "BF16"}


def test_the_suite_fails_on_an_adapter_saved_in_half_precision(pytester, suite):
    pytester.makepyfile(planted_save="""
        import pytest
        from peft.utils import save_and_load
        import peft.peft_model

        real = save_and_load.get_peft_model_state_dict

        def halved(*args, **kwargs):
            return {key: value.half() for key, value in real(*args, **kwargs).items()}

        @pytest.fixture(autouse=True)
        def planted(monkeypatch):
            monkeypatch.setattr(peft.peft_model, "get_peft_model_state_dict", halved)
        """)
    pytester.syspathinsert()
    suite((SUITES / "test_serving.py").read_text(), name="test_serving_copy.py")
    result = pytester.runpytest("-p", "planted_save", *SERVING_RUN, "--lora-quant=bf16", "-k", "adapter_file")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the adapter was saved as [[]'F16'[]], not float32*"])


# --------------------------------------------------------------------------- the suite


def test_the_suite_records_every_metric_against_its_reference(pytester, suite):
    """One run on a full-precision and a 4-bit base: the file against the count, resident adapters
    against K x the adapter's bytes, the mixed batch within rounding, every latency variant."""
    pytester.makepyfile(watched_ids="""
        import json
        import pytest
        from pytest_lora.measure import serving

        SEEN = []
        real = serving.latency

        def watched(model, ids, *args, **kwargs):
            SEEN.append([ids.shape[0], ids.shape[1], int(ids.sum()), int((ids * ids).sum())])
            return real(model, ids, *args, **kwargs)

        @pytest.fixture(autouse=True)
        def watch(monkeypatch, request):
            monkeypatch.setattr(serving, "latency", watched)
            yield
            with open(request.node.name.replace("/", "_") + ".ids.json", "w") as out:
                json.dump(SEEN, out)
            SEEN.clear()
        """)
    pytester.syspathinsert()
    suite((SUITES / "test_serving.py").read_text(), name="test_serving_copy.py")
    result = pytester.runpytest("-p", "watched_ids", *SERVING_RUN, "--lora-quant=fp32,nf4")
    result.assert_outcomes(passed=2 * 5)
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    for record in records:
        metrics, test = record["metrics"], record["test"]
        if "test_serving_latency" in test:
            variants = ["base", "unmerged", "merged"] + (["dequantized_merged"] if record["quant"] == "nf4" else [])
            assert all(f"{v}_{p}_median_s" in metrics for v in variants for p in ("prefill", "decode_token"))
            seen = json.loads((pytester.path / (test.rsplit("::", 1)[1] + ".ids.json")).read_text())
            assert len(seen) == len(variants) and all(entry == seen[0] for entry in seen)  # the same ids, every variant
        elif "test_mixed_adapter_batch" in test:
            assert metrics["resident_adapter_bytes"] == metrics["analytic_resident_adapter_bytes"] == metrics["adapters"] * 4 * TINY_ADAPTER
        else:
            assert metrics["adapter_file_bytes"] == metrics["adapter_header_bytes"] + 4 * TINY_ADAPTER
            assert record["samples"]["adapter_swap_median_s"] and record["samples"]["adapter_load_median_s"]


# --------------------------------------------------------------------------- gate and report


def test_the_gate_knows_the_serving_metrics():
    for metric in ("unmerged_prefill_median_s", "merged_decode_token_median_s", "adapter_load_median_s", "adapter_swap_median_s",
                   "mixed_batch_prefill_median_s"):
        assert rules.kind_of(metric, "s") == "timing" and rules.bad_direction(metric) == +1
        assert rules.default_rule(metric, "s", "cuda").relative == 0.10
        assert rules.default_rule(metric, "s", "cpu").relative == 1.0
    assert rules.default_rule("unmerged_prefill_iqr_s", "s") is None  # a spread: shown, not gated
    assert rules.known_direction("unmerged_over_merged_decode_token_pct") == +1
    assert rules.default_rule("adapter_file_bytes", "bytes").exact
    assert rules.default_rule("optimizer_state_bytes", "bytes").text == kinds.MEMORY_DEFAULT


def test_the_headline_has_a_serving_table():
    metrics = {f"{v}_{p}_median_s": 0.001 * (i + 1) for i, v in enumerate(("base", "unmerged", "merged")) for p in ("prefill", "decode_token")}
    metrics["unmerged_over_merged_decode_token_pct"] = 50.0
    record = {"suite": "serving", "test": "suites/test_serving.py::test_serving_latency[x]", "model": "m", "quant": "nf4",
              "lora": {"r": 8, "alpha": 16, "targets": "default", "variant": "lora"}, "workload": {"prompt_len": 16, "new_tokens": 4, "batch": 2},
              "status": "ok", "metrics": metrics, "units": {}, "warnings": [], "samples": {}}
    section = headline.serving_section([record])
    assert section.rows == [["m", "nf4", "r8 a16 default", "1", "2", "3", "1", "2", "3", "+50%"]]
