"""Merging: proof that merged weights compute what the adapter computed, and what quantization costs.

What is checked. Every config of the matrix gets an adapter whose update is not the identity: B
is drawn at random and scaled so that ||s B A|| = 1% of ||W|| in every adapted layer (the
relative update is recorded, so each error can be read against it). Merging happens on a private
copy of the base, never on the shared one.

Full-precision bases (fp32, bf16, fp16), asserted:

* peft's delta of every layer equals s B A computed in float64 from the adapter's tensors and the
  config (alpha / r, alpha / sqrt(r) for rsLoRA, transposed for fan_in_fan_out Conv1D layers);
* after ``merge_and_unload`` no LoRA layer is left, and each merged weight equals the formula
  (with DoRA's magnitude rescaling) within two roundings of the base dtype;
* ``merge_adapter`` then ``unmerge_adapter`` gives back the base weights within two roundings;
  the drift after 1, 10 and 100 cycles of the first four adapted layers is recorded (bf16 drift
  compounds);
* ``safe_merge`` refuses an adapter holding a NaN;
* in float32 the merged model's logits equal the unmerged adapter's (peft's own 1e-4);
  ``merge_max_abs_err``, ``merge_kl`` and ``merge_top1`` are recorded for every dtype.

Quantized bases (int8, nf4, fp4, nf4-dq): peft's delta is checked the same way, then three
merges are set against the unmerged QLoRA model's logits (max error, KL, top-1 agreement):
``requantize`` (peft's merge, re-quantizing W + s B A), ``dequantize`` (the base dequantized to the
compute dtype and merged there) and ``original`` (merged into the full-precision weights the base
was quantized from). Asserted: on 4-bit bases, every layer of the dequantized merge computes
what the QLoRA layer computes, up to compute-dtype rounding. Recorded: how much of the update
the re-quantization loses (``requant_err_over_update``).

Save and reload: adapter weights through safetensors (and ``PeftModel.from_pretrained``) bit for
bit; a merged model saved and reloaded computes the same logits. Several adapters:
``add_weighted_adapter`` with ``cat`` and ``linear`` against their closed forms.

Random deep models are chaotic (quantizing a random Llama-3-8B shape to nf4 changed its logits
by 94% on an H200), so the weight and layer checks are the proof and the logits are context.
``test_merge_on_a_trained_model`` repeats the comparison where logits mean something: on the
matrix's pretrained checkpoint, with an adapter fine-tuned on two-digit addition (once, on the
float32 weights, then put on each format's base), else on a small model trained on a synthetic
language and fine-tuned with LoRA on another on each format's base. The loss (and, on addition,
the exact match) of each merged model on the fine-tuning task's held-out blocks is recorded beside
the unmerged one's and the base's before fine-tuning.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest

from pytest_lora.specs import WorkloadSpec, full_precision

from pytest_lora.lazy import lazy_import

torch = lazy_import("torch")
peft = lazy_import("peft")
tasks = lazy_import("pytest_lora.measure.tasks")
merge = lazy_import("pytest_lora.measure.merge")
train = lazy_import("pytest_lora.measure.train")
texts = lazy_import("pytest_lora.measure.texts")
build = lazy_import("pytest_lora.models.build")
quantize = lazy_import("pytest_lora.models.quantize")
adapters = lazy_import("pytest_lora.models.adapters")
formats = lazy_import("pytest_lora.models.formats")

pytestmark = pytest.mark.lora_merge

RELATIVE_UPDATE = 0.01
DRIFT_CYCLES = (1, 10, 100)


@pytest.fixture
def adapted_copy(base_copy, lora_config, request):
    """A private copy of the shared base with this test's adapter at a 1% update."""
    config = lora_config
    model = peft.get_peft_model(base_copy, config)
    generator = torch.Generator().manual_seed(build.seed_for(request.node.nodeid))
    relative = merge.set_relative_update(model, config, RELATIVE_UPDATE, generator)
    model.eval()
    yield model, config, relative
    del model


def token_ids(model_spec, device, request, lora_bench) -> torch.Tensor:
    """The inputs the merged and unmerged logits are compared on: 4 x 64 tokens of prose for a
    model that reads text (``texts.text_ids``), else 2 x 32 random token ids; ``text_inputs``
    (1 or 0) says which."""
    seed = build.seed_for(request.node.nodeid)
    text = texts.text_ids(model_spec, 4, 64, seed)
    lora_bench.record("text_inputs", int(text is not None), "flag")
    if text is not None:
        return text.to(device)
    vocab = model_spec.config_dict()["vocab_size"]
    return train.synthetic_batch(vocab, WorkloadSpec(seq_len=32, batch=2), device, seed)["input_ids"]


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    config = getattr(model, "config", None)
    with torch.no_grad():
        if getattr(config, "is_encoder_decoder", False):
            return model(input_ids=ids, decoder_input_ids=ids).logits.float()
        return model(input_ids=ids).logits.float()


def check_delta_is_the_formula(layers, config, lora_bench) -> None:
    """peft's ``get_delta_weight`` against s B A in float64: a wrong scale or a transposition fails."""
    for name, layer in layers.items():
        delta = layer.get_delta_weight("default").double().cpu()
        expected = merge.expected_delta(layer, config).cpu()
        if lora_bench.check(delta.shape == expected.shape, f"{name}: delta {tuple(delta.shape)}, formula {tuple(expected.shape)}"):
            within = ((delta - expected).abs() <= merge.delta_error_bound(layer, config).cpu() + 1e-30).all()
            lora_bench.check(within, f"{name}: peft's delta is not s B A")


def record_agreement(lora_bench, reference: torch.Tensor, logits: torch.Tensor, suffix: str = "") -> dict[str, float]:
    agreement = merge.logits_agreement(reference, logits)
    lora_bench.record(f"merge_max_abs_err{suffix}", agreement["max_abs_err"], "logit")
    lora_bench.record(f"merge_kl{suffix}", agreement["kl"], "nats")
    lora_bench.record(f"merge_top1{suffix}", agreement["top1"], "fraction")
    return agreement


def checked_adapter(adapted_copy, lora_bench):
    """The adapted copy's LoRA layers, once their update is recorded and peft's delta checked."""
    model, config, relative = adapted_copy
    lora_bench.record("relative_update", relative, "||sBA||/||W||")
    layers = merge.lora_layers(model)
    check_delta_is_the_formula(layers, config, lora_bench)
    return model, config, layers


@pytest.mark.lora_matrix(quantized=False)
def test_merge_full_precision(adapted_copy, base_model, model_spec, quant_spec, lora_device, lora_bench, request):
    """Checked layer by layer against the shared base's weights (the copy's originals, bit for bit),
    so that the check holds one layer's float64 terms at a time beside the base and its copy: for
    the 8B shape in bf16 that is under 1 GB, where holding every layer's would need 80 GB more."""
    model, config, layers = checked_adapter(adapted_copy, lora_bench)
    before = {name: base_model.get_submodule(merge.adapted_module_name(name)).weight for name in layers}  # no copies
    dtype = next(iter(before.values())).dtype
    model.merge_adapter()
    model.unmerge_adapter()
    for name, layer in layers.items():
        restored, delta = layer.get_base_layer().weight, merge.expected_delta(layer, config).to(before[name].device)
        tolerance = merge.rounding_tolerance(dtype, before[name].double(), delta) + 2 * merge.delta_error_bound(layer, config).to(delta.device)
        lora_bench.check(((restored.double() - before[name].double()).abs() <= tolerance).all(), f"{name}: unmerge did not restore the base")
        del restored, delta, tolerance
    for k, value in merge.cycle_drift(layers, before, DRIFT_CYCLES).items():
        lora_bench.record(f"merge_drift_k{k}", value, "max|W-W0|/max|W0|")
    with torch.no_grad():
        for name, layer in layers.items():  # the cycles drift: start the merge from the original weights
            layer.get_base_layer().weight.copy_(before[name])

    name, first = next(iter(layers.items()))
    kept = first.lora_B["default"].weight[0, 0].item()
    first.lora_B["default"].weight.data[0, 0] = float("nan")
    try:
        first.merge(safe_merge=True)
        refused = "merged"
    except ValueError as error:
        refused = str(error)
    lora_bench.check("NaNs detected" in refused, f"{name}: safe_merge merged an adapter with a NaN ({refused})")
    first.lora_B["default"].weight.data[0, 0] = kept

    ids = token_ids(model_spec, lora_device, request, lora_bench)
    unmerged = logits_of(model, ids)
    lora_bench.record("reference_logit_std", merge.logit_spread(unmerged), "logit")  # the scale its KL is read against
    merged = model.merge_and_unload()
    check_fully_merged(merged, lora_bench)
    for name, layer in layers.items():  # the LoRA layers still hold A, B and DoRA's magnitude
        check_merged_weight(merged.get_submodule(merge.adapted_module_name(name)).weight, layer, config, before[name], name, lora_bench)
    agreement = record_agreement(lora_bench, unmerged, logits_of(merged, ids))
    if dtype == torch.float32:
        lora_bench.check(agreement["max_abs_err"] <= 1e-4 * (1 + unmerged.abs().max().item()), "merged float32 logits differ")


def check_fully_merged(merged, lora_bench) -> None:
    """``merge_and_unload`` leaves no LoRA layer and no LoRA parameter behind."""
    lora_bench.check(not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules()), "a LoRA layer survived merge_and_unload")
    lora_bench.check(not any("lora_" in n for n, _ in merged.named_parameters()), "a LoRA parameter survived merge_and_unload")


def check_merged_weight(weight, layer, config, original, name, lora_bench) -> None:
    """One merged weight against W + s B A (DoRA rescaled) in float64, within two roundings of its dtype."""
    target = merge.expected_merged(layer, config, original).to(weight.device)
    tolerance = (4 if config.use_dora else 1) * merge.rounding_tolerance(weight.dtype, original.double(), target - original.double())
    tolerance += merge.delta_error_bound(layer, config).to(tolerance.device)
    lora_bench.check(((weight.double() - target).abs() <= tolerance).all(), f"{name}: merged weight is not W + s B A")


@pytest.mark.lora_matrix(quantized=True)
def test_merge_quantized(adapted_copy, model_spec, quant_spec, quant_format, lora_device, lora_bench, request):
    model, config, layers = checked_adapter(adapted_copy, lora_bench)
    ids = token_ids(model_spec, lora_device, request, lora_bench)
    reference = logits_of(model, ids)
    # KL grows with the square of the logits' spread: a random T5's output layer (std 1.0) gives
    # logits 47x a random Llama's, and 100x its KL for the same relative rounding
    lora_bench.record("reference_logit_std", merge.logit_spread(reference), "logit")
    compute_dtype = getattr(torch, quant_spec.dtype)

    dequantize = merge.merge_into(build.instantiate(model_spec.config_dict(), lora_device, compute_dtype), model, config, dequantize_base=True)
    if quant_format.computes_in_dtype(quant_spec):  # LLM.int8 also quantizes activations
        check_layers_compute_alike(layers, dequantize, compute_dtype, lora_bench)
    record_agreement(lora_bench, reference, logits_of(dequantize, ids), "_dequantize")
    del dequantize

    original = merge.merge_into(build.full_precision_of(model_spec, quant_spec, lora_device), model, config, dequantize_base=False)
    record_agreement(lora_bench, reference, logits_of(original, ids), "_original")
    del original

    bases = {name: merge.dequantized(layer.get_base_layer()) for name, layer in layers.items()}
    expected = {name: merge.expected_merged(layer, config, bases[name]) for name, layer in layers.items()}
    quantized = [name for name, layer in layers.items() if formats.layer_format(layer.get_base_layer()) is quant_format]
    merged = model.merge_and_unload()
    check_fully_merged(merged, lora_bench)
    if quant_format.merge_requantizes:  # peft writes W + s B A back in the format, not in the compute dtype
        left = [name for name in quantized if formats.layer_format(merged.get_submodule(merge.adapted_module_name(name))) is not quant_format]
        lora_bench.check(not left, f"peft's merge left {left[:3]} not stored as {quant_spec.name}")
    lora_bench.record("requant_err_over_update", merge.requantization_error(merged, expected, bases), "||error||/||update||")
    record_agreement(lora_bench, reference, logits_of(merged, ids), "_requantize")


def check_layers_compute_alike(layers, dequantized_model, dtype, lora_bench) -> None:
    """Each QLoRA layer (quantized base + adapter) against the same layer of the dequantized merge."""
    with torch.no_grad():
        _check_layers_compute_alike(layers, dequantized_model, dtype, lora_bench)


def _check_layers_compute_alike(layers, dequantized_model, dtype, lora_bench) -> None:
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        merged_layer = dequantized_model.get_submodule(merge.adapted_module_name(name))
        fan_in = merged_layer.in_features if hasattr(merged_layer, "in_features") else merged_layer.nx
        x = torch.randn(4, fan_in, generator=generator).to(merged_layer.weight.device, dtype)
        expected, actual = layer(x).double(), merged_layer(x).double()
        weight = merged_layer.weight.double()
        weight = weight if weight.shape[1] == fan_in else weight.T
        bound = 4 * torch.finfo(dtype).eps * (x.double().abs() @ weight.abs().T) + 1e-6
        lora_bench.check(((actual - expected).abs() <= bound).all(), f"{name}: dequantize-then-merge differs beyond {dtype} rounding")


@pytest.mark.usefixtures("quant_format")  # a format that cannot run here skips
def test_merge_on_a_trained_model(merge_task, quant_spec, lora_device, lora_bench):
    """A model whose logits mean something, LoRA-fine-tuned on a task it did not know, then merged.

    On the matrix's pretrained checkpoint: an adapter that learnt two-digit addition, compared on
    held-out problems (loss and exact match of each merge beside the unmerged adapter's). Else
    the synthetic task model, fine-tuned on its second language on each format's base.
    """
    task = merge_task
    config = adapters.lora_config_for(task.lora, task.config, quant_spec)
    lora_bench.describe(model=task.name, lora=config)
    model = task.adapted(task.base(quant_spec), config)
    lora_bench.record("adapter_trained_on_this_base", float(task.trained_on_each_base), "bool")
    layers = merge.lora_layers(model)
    relative = max((merge.expected_delta(l, config).norm() / merge.dequantized(l.get_base_layer()).double().norm().cpu()).item() for l in layers.values())
    lora_bench.record("relative_update", relative, "||sBA||/||W||")
    lora_bench.record("base_loss_b", task.base_loss, "nats")
    if task.base_exact is not None:
        lora_bench.record("base_exact_b", task.base_exact, "fraction")
    ids = task.eval_ids
    model.eval()
    reference = logits_of(model, ids)
    record_task(lora_bench, task, reference, "unmerged")

    candidates = {}
    if quant_spec.is_quantized:
        candidates["_original"] = merge.merge_into(task.base(full_precision(quant_spec)), model, config, dequantize_base=False)
        blank = build.instantiate(task.config, lora_device, getattr(torch, quant_spec.dtype))
        candidates["_dequantize"] = merge.merge_into(blank, model, config, dequantize_base=True)
        suffix = "_requantize"
    else:
        suffix = ""
    candidates[suffix] = model.merge_and_unload()
    for name, candidate in candidates.items():
        logits = logits_of(candidate, ids)
        record_agreement(lora_bench, reference, logits, name)
        record_task(lora_bench, task, logits, f"merged{name}")


def record_task(lora_bench, task, logits: torch.Tensor, prefix: str) -> None:
    """The fine-tuning task read from ``logits``: its loss, and its exact match where it has answers."""
    name, _, suffix = prefix.partition("_")
    lora_bench.record(f"{name}_loss_b{'_' + suffix if suffix else ''}", tasks.causal_loss(logits, task.eval_ids).item(), "nats")
    if task.exact_match is not None:
        lora_bench.record(f"{name}_exact_b{'_' + suffix if suffix else ''}", task.exact_match(logits, task.eval_ids), "fraction")


def first_lora(lora_matrix, model_spec, quant_spec):
    """This test's adapter: the matrix's first LoRA spec (one per base is enough here)."""
    spec = lora_matrix.loras[0]
    return spec, adapters.lora_config_for(spec, model_spec.config_dict(), quant_spec)


def test_save_and_reload(base_model, base_copy, model_spec, quant_spec, quant_format, lora_matrix, lora_device, lora_bench, request):
    """Adapter weights survive safetensors bit for bit; a merged model saved and reloaded computes
    the same (on formats that transformers reloads as it saved them: ``Format.reloads_merged``).

    The files go to a directory removed when the test ends, not to pytest's ``tmp_path``, which
    keeps three runs: 16 GB per merged 8B bf16 base would fill a GPU host's disk."""
    with tempfile.TemporaryDirectory(prefix="pytest-lora-save-") as directory:
        save_and_reload(base_model, base_copy, model_spec, quant_spec, quant_format, lora_matrix, lora_device, lora_bench, Path(directory), request)


def save_and_reload(base_model, base_copy, model_spec, quant_spec, quant_format, lora_matrix, lora_device, lora_bench, tmp_path, request):
    from safetensors.torch import load_file

    spec, config = first_lora(lora_matrix, model_spec, quant_spec)
    lora_bench.describe(lora=spec)
    model = peft.get_peft_model(base_copy, config)
    merge.set_relative_update(model, config, RELATIVE_UPDATE, torch.Generator().manual_seed(build.seed_for(request.node.nodeid)))
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    ours = peft.get_peft_model_state_dict(model)
    lora_bench.check(saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k].cpu()) for k in saved), "adapter weights changed in safetensors")
    reloaded = peft.PeftModel.from_pretrained(quantize.private_copy(base_model), tmp_path / "adapter")
    again = peft.get_peft_model_state_dict(reloaded)
    lora_bench.check(all(torch.equal(again[k], ours[k]) for k in ours), "adapter weights changed through PeftModel.from_pretrained")
    del reloaded
    if not quant_format.reloads_merged:
        return

    ids = token_ids(model_spec, lora_device, request, lora_bench)
    merged = model.merge_and_unload()
    merged.eval()
    expected = logits_of(merged, ids)
    merged.save_pretrained(tmp_path / "merged")
    loaded = build.model_class(model_spec.config_dict()).from_pretrained(tmp_path / "merged", dtype=merged.dtype, device_map={"": lora_device})
    formats.of(quant_spec).after_build(loaded)
    loaded.eval()
    ours, theirs = merged.state_dict(), loaded.state_dict()
    lora_bench.check(ours.keys() == theirs.keys(), f"save_pretrained / from_pretrained changed the keys: {sorted(ours.keys() ^ theirs.keys())[:3]}")
    for key, value in ours.items():  # transformers may load _keep_in_fp32_modules (T5's wo) in float32
        lora_bench.check(key in theirs and torch.equal(theirs[key].to(value.dtype), value), f"{key} changed through save_pretrained / from_pretrained")
    difference = (logits_of(loaded, ids) - expected).abs().max().item()
    lora_bench.record("reload_max_abs_err", difference, "logit")
    if all(key in theirs and theirs[key].dtype == value.dtype for key, value in ours.items()):
        lora_bench.check(difference == 0.0, f"the reloaded merged model's logits differ by {difference}")


@pytest.mark.lora_matrix(quantized=False)
def test_weighted_adapters(base_copy, model_spec, quant_spec, lora_matrix, lora_bench, request):
    """``add_weighted_adapter`` against its closed forms: ``cat`` gives sum w_i s_i B_i A_i exactly;
    ``linear`` combines A and B separately, (sum sqrt(w_i s_i) B_i)(sum sqrt(w_i s_i) A_i), cross
    terms included, which is not the weighted sum of the updates (recorded)."""
    spec, config = first_lora(lora_matrix, model_spec, quant_spec)
    lora_bench.describe(lora=spec)
    model = peft.get_peft_model(base_copy, config)
    model.add_adapter("second", config)
    generator = torch.Generator().manual_seed(build.seed_for(request.node.nodeid))
    for adapter in ("default", "second"):
        model.set_adapter(adapter)
        merge.set_relative_update(model, config, RELATIVE_UPDATE, generator)
    weights = (0.7, 0.4)
    model.add_weighted_adapter(["default", "second"], list(weights), "cat", combination_type="cat")
    model.add_weighted_adapter(["default", "second"], list(weights), "linear", combination_type="linear")
    s = merge.scaling(config)
    worst_cross = 0.0
    for name, layer in merge.lora_layers(model).items():
        a = [layer.lora_A[n].weight.double() for n in ("default", "second")]
        b = [layer.lora_B[n].weight.double() for n in ("default", "second")]
        weighted_sum = sum(w * s * bi @ ai for w, ai, bi in zip(weights, a, b))
        roots = [math.sqrt(w * s) for w in weights]
        linear = sum(r * bi for r, bi in zip(roots, b)) @ sum(r * ai for r, ai in zip(roots, a))
        for adapter, expected in (("cat", weighted_sum), ("linear", linear)):
            delta = layer.get_delta_weight(adapter).double()
            delta = delta.T if config.fan_in_fan_out else delta
            eps = torch.finfo(layer.lora_A[adapter].weight.dtype).eps  # the combined adapter is stored in its own dtype
            lora_bench.check((delta - expected).norm() <= 8 * eps * expected.norm(), f"{name}: {adapter} is not its closed form")
        worst_cross = max(worst_cross, ((linear - weighted_sum).norm() / weighted_sum.norm()).item())
    lora_bench.record("linear_vs_weighted_sum", worst_cross, "||linear - sum w dW|| / ||sum w dW||")
