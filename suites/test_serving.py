"""Serving: what an adapter costs after training, unmerged, merged, and many at once.

What is measured, on a private copy of each base of the matrix, with the adapter at a 1% update
(B drawn at random, ||s B A|| = 1% of ||W||, as in the merge suite):

* latency of a forward pass over ``batch`` prompts of ``prompt_len`` tokens that fills the KV cache
  (prefill), and of each of ``new_tokens`` greedy tokens decoded with it (decode), for the base
  alone (the plain model, before peft wraps a layer), the base with the unmerged adapter, and the
  merged model: peft's
  ``merge_and_unload`` (on a quantized base it re-quantizes W + s B A), and on a quantized base also
  the base dequantized to its compute dtype with the adapter merged there (the merge suite's
  ``dequantize``; its ``original`` strategy builds the same modules in the same dtype with other
  values, so its latency is this one's). Every variant runs on the same token ids, with the same
  warm-up (``--lora-warmup``, not timed) and timed rounds (``--lora-rounds``); CUDA events on a
  GPU, the host's performance counter on the CPU; median and IQR. Overheads in % as peft defines
  them: unmerged against the base, and unmerged against the merged model;
* mixed-adapter batches (peft's ``adapter_names``) with 1, 4 and 16 adapters on the matrix's first
  LoRA spec: the prefill latency of the mixed batch beside the same batch through one adapter,
  and every row's logits against that row's adapter run alone (peft holds 4-bit mixed batches to
  3e-5 on a GPU): each row must be nearer its own adapter's output than any other adapter's or the
  base's, and equal to its own up to four roundings of the logits' dtype (the smallest distance
  between two of those outputs is recorded beside the error); the bytes of K resident adapters
  against K x the closed-form trainable parameters x 4 bytes (on a GPU, torch's allocated bytes);
* the adapter's safetensors file: its bytes against the closed-form trainable parameters x the
  saved dtype's size plus the header (read from the file's bytes); the time to load it into the
  model (``load_adapter``) and to switch the active adapter (``set_adapter``).

Against which reference. The closed-form parameter count of the params suite, single-adapter
outputs, and the same inputs through each variant. Latencies are recorded, never asserted.
"""

from __future__ import annotations

import copy
import statistics

import pytest

from pytest_lora.lazy import lazy_import

torch = lazy_import("torch")
peft = lazy_import("peft")
cpu = lazy_import("pytest_lora.measure.cpu")
merge = lazy_import("pytest_lora.measure.merge")
params = lazy_import("pytest_lora.measure.params")
serving = lazy_import("pytest_lora.measure.serving")
timing = lazy_import("pytest_lora.measure.timing")
adapters = lazy_import("pytest_lora.models.adapters")
build = lazy_import("pytest_lora.models.build")
texts = lazy_import("pytest_lora.measure.texts")

pytestmark = pytest.mark.lora_serving

RELATIVE_UPDATE = 0.01
ADAPTER_COUNTS = (1, 4, 16)


def record_latency(lora_bench, variant: str, measured) -> dict[str, float]:
    """``<variant>_prefill_median_s`` and ``<variant>_decode_token_median_s``, their IQR and samples."""
    medians = {}
    for phase, times in (("prefill", measured.prefill), ("decode_token", measured.decode)):
        stats = timing.TimingStats.of(times)
        name = f"{variant}_{phase}_median_s"
        lora_bench.record(name, stats.median, "s")
        lora_bench.record(f"{variant}_{phase}_iqr_s", stats.iqr, "s")
        lora_bench.samples(name, times)
        medians[phase] = stats.median
    return medians


def adapted(base, lora_config, request):
    """``base`` with the adapter at a 1% update, in eval mode."""
    model = peft.get_peft_model(base, lora_config)
    generator = torch.Generator().manual_seed(build.seed_for(request.node.nodeid))
    merge.set_relative_update(model, lora_config, RELATIVE_UPDATE, generator)
    return model.eval()


def prompts(model_spec, batch: int, prompt_len: int, device, seed: int):
    """Prompts of prose for a model that reads text (``texts.text_ids``), else random token ids."""
    text = texts.text_ids(model_spec, batch, prompt_len, seed)
    if text is not None:
        return text.to(device)
    return serving.prompt_ids(model_spec.config_dict()["vocab_size"], batch, prompt_len, device, seed)


def test_serving_latency(base_copy, lora_config, model_spec, quant_spec, serve_spec, lora_device, lora_gpu, lora_session, lora_bench, request):
    """Prefill and per-token decode latency: base, unmerged adapter, merged models."""
    config = model_spec.config_dict()
    ids = prompts(model_spec, serve_spec.batch, serve_spec.prompt_len, lora_device, build.seed_for(request.node.nodeid))
    warmup, rounds = lora_session.steps("warmup"), lora_session.steps("rounds")

    def measure(variant, target):
        measured = serving.latency(target, ids, serve_spec.new_tokens, lambda: timing.StepTimer(lora_gpu), warmup, rounds)
        return record_latency(lora_bench, variant, measured)

    with cpu.recorded_conditions(lora_session.timing_threads(), lora_bench):
        base = measure("base", base_copy.eval())  # the plain model, as peft's benchmark has it: no LoRA layers
        model = adapted(base_copy, lora_config, request)
        unmerged = measure("unmerged", model)
        if quant_spec.is_quantized:
            dequantized = build.instantiate(config, lora_device, getattr(torch, quant_spec.dtype))
            measure("dequantized_merged", merge.merge_into(dequantized, model, lora_config, dequantize_base=True))
            del dequantized
        merged = measure("merged", model.merge_and_unload())
    for phase in ("prefill", "decode_token"):
        lora_bench.record(f"unmerged_over_base_{phase}_pct", serving.overhead_pct(unmerged[phase], base[phase]), "%")
        lora_bench.record(f"unmerged_over_merged_{phase}_pct", serving.overhead_pct(unmerged[phase], merged[phase]), "%")


@pytest.fixture
def serving_lora(lora_matrix, model_spec, quant_spec):
    """The matrix's first LoRA spec as a peft config, with random B (adapters that differ)."""
    config = adapters.lora_config_for(lora_matrix.loras[0], model_spec.config_dict(), quant_spec)
    config.init_lora_weights = False
    return lora_matrix.loras[0], config


@pytest.mark.parametrize("adapter_count", ADAPTER_COUNTS, ids=lambda k: f"{k}-adapters")
def test_mixed_adapter_batch(base_model, serving_lora, model_spec, serve_spec, adapter_count, lora_device, lora_gpu, lora_session, lora_bench, request):
    """A batch whose rows use different adapters equals each adapter run alone; its latency and
    the memory of the resident adapters."""
    spec, lora_config = serving_lora
    lora_bench.describe(lora=spec)
    config = model_spec.config_dict()
    names = [f"adapter{index}" for index in range(adapter_count)]
    assignment = serving.rows_per_adapter(adapter_count, serve_spec.batch)
    ids = prompts(model_spec, len(assignment), serve_spec.prompt_len, lora_device, build.seed_for(request.node.nodeid))
    torch.manual_seed(build.seed_for(request.node.nodeid))
    allocated_before = lora_gpu.allocated() if lora_gpu is not None else None
    with adapters.attached(base_model, copy.deepcopy(lora_config)) as model:
        for name in names[1:]:
            model.add_adapter(name, copy.deepcopy(lora_config))
        model.eval()  # the new adapters' dropout modules are made in training mode
        resident = lora_gpu.allocated() - allocated_before if lora_gpu is not None else serving.adapter_bytes(model, ["default", *names[1:]])
        names[0] = "default"
        routed = [names[index] for index in assignment]
        with model.disable_adapter():
            alone = {"base": serving.last_logits(model, ids)}
        for name in names:
            model.set_adapter(name)
            alone[name] = serving.last_logits(model, ids)
        mixed = serving.last_logits(model, ids, adapter_names=routed)
        shape_noise = serving.batch_shape_noise(model, ids, alone, routed)
        path_noise = serving.mixed_path_noise(model, ids, alone, names)
        noise = max(shape_noise, path_noise)  # the rounding a correct mixed batch may show
        warmup, rounds = lora_session.steps("warmup"), lora_session.steps("rounds")
        with cpu.recorded_conditions(lora_session.timing_threads(), lora_bench):
            model.set_adapter(names[0])
            single = serving.latency(model, ids, 0, lambda: timing.StepTimer(lora_gpu), warmup, rounds)
            together = serving.latency(model, ids, 0, lambda: timing.StepTimer(lora_gpu), warmup, rounds, adapter_names=routed)
    check = serving.check_mixed_batch(mixed, alone, routed, noise)
    per_adapter = 4 * params.adapter_weights(build.build_meta(config), lora_config)  # fp32, as peft keeps adapters
    lora_bench.record("adapters", adapter_count, "adapters")
    lora_bench.record("mixed_batch_rows", len(assignment), "rows")
    lora_bench.record("mixed_batch_max_abs_err", check.max_abs_err, "logit")
    lora_bench.record("adapter_separation", check.separation, "logit")
    lora_bench.record("batch_shape_noise", shape_noise, "logit")
    lora_bench.record("mixed_path_noise", path_noise, "logit")
    record_latency_pair(lora_bench, single.prefill, together.prefill)
    lora_bench.record("resident_adapter_bytes", resident, "bytes")
    lora_bench.record("analytic_resident_adapter_bytes", adapter_count * per_adapter, "bytes")
    if serving.NOISE_FACTOR * noise >= check.separation:  # LLM.int8 picks its outlier columns over the whole batch
        lora_bench.warn(f"the batch-shape or mixed-path noise ({noise:.3g} logits) is as large as the adapters lie apart ({check.separation:.3g}): "
                        "beyond routing every row nearer its own adapter, this mixed batch can't be checked finer")
    lora_bench.check(not check.wrong_rows, f"rows {check.wrong_rows[:5]} of the mixed batch are nearer another adapter's output than their own")
    lora_bench.check(not check.beyond_rounding, f"rows {check.beyond_rounding[:5]} of the mixed batch differ from their adapter "
                     f"alone by more than {serving.ROUNDING_ULPS} roundings of the logits and {serving.NOISE_FACTOR}x the noise of a "
                     f"batch shape or of peft's mixed path, {noise:.3g} (largest {check.max_abs_err:.3g})")
    if lora_gpu is None:  # tensors summed: exact; a GPU's allocator rounds each block up
        lora_bench.check(resident == adapter_count * per_adapter, f"{resident:,d} B resident for {adapter_count} adapters, "
                         f"{adapter_count * per_adapter:,d} B expected")


def record_latency_pair(lora_bench, single: list[float], mixed: list[float]) -> None:
    lora_bench.record("single_adapter_prefill_median_s", statistics.median(single), "s")
    lora_bench.samples("single_adapter_prefill_median_s", single)
    lora_bench.record("mixed_batch_prefill_median_s", statistics.median(mixed), "s")
    lora_bench.samples("mixed_batch_prefill_median_s", mixed)
    lora_bench.record("mixed_over_single_prefill_pct", serving.overhead_pct(statistics.median(mixed), statistics.median(single)), "%")


SWAPS = 10


def test_adapter_file(lora_model, lora_config, model_spec, lora_gpu, lora_session, lora_bench, tmp_path):
    """The saved adapter's bytes against the parameter count; load and swap times."""
    lora_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    layout = serving.safetensors_layout(path)
    meta = build.build_meta(model_spec.config_dict())
    trainable = params.closed_form(meta, lora_config).trainable
    saved_dtype = next(iter(layout.dtypes)) if len(layout.dtypes) == 1 else None
    lora_bench.record("adapter_file_bytes", layout.file_bytes, "bytes")
    lora_bench.record("adapter_header_bytes", layout.header_bytes, "bytes")
    lora_bench.record("adapter_file_tensors", layout.tensors, "tensors")
    warmup, rounds = lora_session.steps("warmup"), lora_session.steps("rounds")
    loads, swaps = timing.StepTimer(lora_gpu), timing.StepTimer(lora_gpu)
    with cpu.recorded_conditions(lora_session.timing_threads(), lora_bench):
        for index in range(warmup + rounds):
            loads.time(lambda: lora_model.load_adapter(tmp_path, adapter_name=f"loaded{index}"))
            lora_model.delete_adapter(f"loaded{index}")
        lora_model.load_adapter(tmp_path, adapter_name="loaded")
        for index in range(warmup + SWAPS):
            swaps.time(lambda: lora_model.set_adapter("loaded" if index % 2 == 0 else "default"))
        lora_model.set_adapter("default")
    for name, times in (("adapter_load_median_s", loads.times[warmup:]), ("adapter_swap_median_s", swaps.times[warmup:])):
        lora_bench.record(name, statistics.median(times), "s")
        lora_bench.samples(name, times)
    lora_bench.check(layout.contiguous, "the tensors' byte ranges do not tile the file's data section")
    lora_bench.check(layout.dtypes == {"F32"}, f"the adapter was saved as {sorted(layout.dtypes)}, not float32 as it was trained")
    lora_bench.check(layout.elements == trainable, f"{layout.elements:,d} weights saved, {trainable:,d} trainable")
    lora_bench.check(layout.tensors == params.trainable_tensor_count(meta, lora_config),
                     f"{layout.tensors} tensors saved, {params.trainable_tensor_count(meta, lora_config)} trainable")
    size = serving.SAFETENSORS_DTYPE_BYTES.get(saved_dtype, 0)
    expected = layout.header_bytes + trainable * size
    lora_bench.check(layout.file_bytes == expected, f"{layout.file_bytes:,d} B on disk, {expected:,d} B expected "
                     f"(header {layout.header_bytes:,d} B + {trainable:,d} x {size} B)")
