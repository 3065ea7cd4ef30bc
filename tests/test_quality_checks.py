"""The quality suite's measurements against what they must be: the curve's points and target by
hand, the initial error against an independent dequantization and its closed forms, evaluation
that trains nothing, a base whose storage training leaves alone, the suite's records in the
shared bench run, bad values of its dimensions refused before anything runs, and a planted loss
of quality caught by the gate while an identical rerun passes."""

from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import peft
import pytest
import torch

from pytest_lora.measure import quality, tasks
from pytest_lora.models import build, registry
from pytest_lora.specs import QUANTIZATIONS

TINY = "llama-3.2-1b-tiny"


def test_evaluation_points_targets_and_time_to_target_by_hand():
    assert quality.eval_steps(60) == [0, 10, 20, 30, 40, 50, 60] and quality.eval_steps(60, 5) == [0, 15, 30, 45, 60]
    assert quality.eval_steps(2) == [0, 1, 2]  # fewer steps than points: each step once
    assert quality.target_loss(3.0, 1.0, 0.9) == pytest.approx(1.2)
    assert quality.target_loss(1.86, 2.15, 0.75) is None  # a diverged reference sets no target
    curve = tuple(quality.Point(step, step / 10, loss, 0.0) for step, loss in ((0, 3.0), (15, 1.5), (30, 1.19), (45, 1.1)))
    assert quality.time_to_target(curve, 1.2) == curve[2]
    assert quality.time_to_target(curve, 1.0) is None
    assert quality.summary([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama's float32 weights, a Markov task to learn, and q,v LoRA at r=4."""
    config = registry.load_config_dict(TINY)
    torch.manual_seed(0)
    state = {key: value.detach().clone() for key, value in build.instantiate(config, "cpu", torch.float32).state_dict().items()}
    task = tasks.MarkovTask("B", 256, seed=1)
    experiment = types.SimpleNamespace(forget_eval=tasks.MarkovTask("A", 256, seed=2).sample(4, 16, torch.Generator().manual_seed(1)),
                                       learn_eval=task.sample(4, 16, torch.Generator().manual_seed(2)), learn_batches=task.sampler(4, 16),
                                       exact_match=None)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return config, state, experiment, lora


def independent_error(model, state) -> float:
    """The adapted layers' quantization error, dequantized by bitsandbytes itself."""
    import bitsandbytes.functional as F

    error = norm = 0.0
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            weight = module.base_layer.weight
            stored = F.dequantize_4bit(weight.data, weight.quant_state).double()
            original = state[name.removeprefix("base_model.model.") + ".weight"].double()
            error += (original - stored).pow(2).sum().item()
            norm += original.pow(2).sum().item()
    return error / norm


def test_the_initial_error_is_zero_in_float32_and_the_quantization_error_in_nf4(tiny):
    config, state, _, lora = tiny
    torch.manual_seed(1)
    full = quality.adapted_base(config, state, QUANTIZATIONS["fp32"], lora, "default", "cpu")
    assert quality.init_weight_error(full, state, lora) == 0.0  # B = 0 and the weights are the model's own
    nf4 = quality.adapted_base(config, state, QUANTIZATIONS["nf4"], lora, "default", "cpu")
    error = quality.init_weight_error(nf4, state, lora)
    assert error == pytest.approx(independent_error(nf4, state), rel=1e-9) and 1e-4 < error < 0.05


def test_pissa_starts_at_the_model_in_float32_and_closer_to_it_than_the_default_in_nf4(tiny):
    """PiSSA moves the top singular directions into the adapter and leaves the residual in the
    base: in float32 base + adapter is the model up to rounding; in NF4 only the residual (a
    smaller matrix) is quantized, so the start is closer than peft's default's (QPiSSA's claim)."""
    config, state, _, lora = tiny
    full = quality.adapted_base(config, state, QUANTIZATIONS["fp32"], lora, "pissa", "cpu")
    assert quality.init_weight_error(full, state, lora) < 1e-10
    default = quality.init_weight_error(quality.adapted_base(config, state, QUANTIZATIONS["nf4"], lora, "default", "cpu"), state, lora)
    pissa = quality.init_weight_error(quality.adapted_base(config, state, QUANTIZATIONS["nf4"], lora, "pissa", "cpu"), state, lora)
    assert pissa < default


def test_evaluation_trains_nothing_and_the_curve_does_not_depend_on_its_points(tiny):
    config, state, experiment, lora = tiny

    def final_loss(points: int, evaluate=None):
        torch.manual_seed(3)
        model = quality.adapted_base(config, state, QUANTIZATIONS["nf4"], lora, "default", "cpu")
        stored = quality.stored_tensors(model)
        evaluate = evaluate or (lambda m: tasks.evaluate(m, experiment.learn_eval, None, with_exact=True))
        curve, untouched = quality.fine_tune(model, experiment.learn_batches, evaluate, 6, 1e-2, 0, "cpu", points)
        unchanged = all(torch.equal(a, b) for a, b in zip(stored.values(), quality.stored_tensors(model).values()))
        return curve, untouched, unchanged

    few, untouched, unchanged = final_loss(2)
    every, _, _ = final_loss(7)
    assert [p.step for p in few] == [0, 6] and [p.step for p in every] == list(range(7))
    assert untouched and unchanged and few[-1].loss == every[-1].loss  # bitwise: the evaluations changed nothing
    assert few[-1].loss != few[0].loss and few[-1].seconds > 0  # it trained

    def training_evaluation(model):  # a planted fault: an evaluation that takes a step of its own
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).add_(1e-3)
        return tasks.evaluate(model, experiment.learn_eval, None, with_exact=True)

    assert final_loss(3, training_evaluation)[1] is False


def test_the_suite_records_the_claims_of_its_configs(bench_run):
    """conftest's bench run (fp32, bf16, nf4; q,v r=16; two seeds) through the quality suite."""
    records = [r for r in bench_run.document["records"] if r["suite"] == "quality" and "NOTSET" not in r["test"]]  # no full fine-tuning
    base = {r["quant"]: r["metrics"] for r in records if "test_base_quality" in r["test"]}
    lora = {r["quant"]: r for r in records if "test_quality_lora" in r["test"]}
    assert set(base) == set(lora) == {"fp32", "bf16", "nf4"} and all(r["status"] == "ok" for r in records)
    assert base["fp32"]["base_loss_a_minus_full"] == 0.0 and base["nf4"]["base_loss_a_minus_full"] > 0
    for quant, record in lora.items():
        metrics, samples = record["metrics"], record["samples"]
        assert metrics["seeds"] == 2 and record["workload"]["init"] == "default" and record["workload"]["lr"] == 3e-2
        assert samples["curve_steps"] == quality.eval_steps(metrics["curve_steps"])
        assert samples["curve_loss"][-1] == pytest.approx(metrics["quality_loss"]) == pytest.approx(metrics["curve_loss"])
        assert samples["curve_loss"][0] == pytest.approx(metrics["quality_loss_before"]) and metrics["quality_loss"] < metrics["quality_loss_before"]
        assert metrics["quality_loss_before"] == pytest.approx(base[quant]["base_loss_b"])
        assert ("quality_minus_reference" in metrics) == (quant != "bf16")  # bf16 is the reference
        assert len(samples["quality_loss"]) == 2 and quality.summary(samples["quality_loss"]) == (metrics["quality_loss"], metrics["quality_loss_std"])
        if quant != "bf16":  # each seed's difference is its loss minus the reference's loss on that seed
            reference = lora["bf16"]["samples"]["quality_loss"]
            assert samples["quality_minus_reference"] == pytest.approx([a - b for a, b in zip(samples["quality_loss"], reference)])
    assert lora["fp32"]["metrics"]["init_weight_error"] == 0.0
    assert 0 < lora["bf16"]["metrics"]["init_weight_error"] < lora["nf4"]["metrics"]["init_weight_error"]
    assert lora["bf16"]["metrics"]["target_reached"] == 2  # the reference reaches 90% of its own improvement


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-inits=svd"], "--lora-inits: 'svd' is not a LoRA initialisation; allowed: default, gaussian, pissa, olora, loftq"),
        (["--lora-inits=loftq", "--lora-quant=bf16,int8"],
         "--lora-inits: 'loftq' needs a format LoftQ's quantizer fits, and the matrix has none (quant: bf16, int8); allowed: loftq with quant nf4 or nf4-dq"),
        (["--lora-learning-rates=1e-3,0"], "--lora-learning-rates: '0' is not a learning rate; allowed: a finite positive number, e.g. 1e-3"),
        (["--lora-full-learning-rates=-1"], "--lora-full-learning-rates: '-1' is not a learning rate*"),
        (["--lora-quality-target=1.5"], "--lora-quality-target: '1.5' is not a fraction of the reference's improvement; allowed: a number in (0, 1)*"),
        (["--lora-quality-steps=1"], "--lora-quality-steps: '1' is not a step count; allowed: an integer >= 2"),
        # the tiny Llama's k and v projections are 16 x 64 (one key-value head): PiSSA can take 16 directions from them
        (["-m", "lora_quality", "--lora-models=llama-3.2-1b-tiny", "--lora-inits=default,pissa", "--lora-ranks=32", "--lora-targets=all-linear"],
         "--lora-inits: init pissa at rank 32: model.layers.0.self_attn.k_proj of llama-3.2-1b-tiny has 16 on its smaller side, and this "
         "init takes rank directions from every adapted layer; allowed: a rank of at most 16 for targets all-linear, or init default or gaussian"),
    ],
)
def test_bad_values_of_the_quality_dimensions(pytester, args, message):
    result = pytester.runpytest("--lora-bench", "--lora-device=cpu", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_loftq_in_the_matrix_collects_every_suite_though_a_test_s_marker_keeps_bf16_alone(pytester):
    """The memory suite's 8-bit optimizer test narrows the matrix to bf16: LoftQ, which fits nf4,
    is simply not among that test's cases rather than an error for the whole session."""
    result = pytester.runpytest("--lora-bench", "--lora-device=cpu", "--lora-inits=default,loftq", "--lora-quant=bf16,nf4", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*test_step_memory_with_an_8bit_state?llama-3.2-1b-tiny-bf16-*"])
    result.stdout.fnmatch_lines(["*test_quality_lora?nf4-*-loftq-*"])


def test_loftq_needs_an_nf4_base_in_the_matrix():
    from pytest_lora import matrix
    from pytest_lora.specs import MatrixError

    layer = matrix.mapping_layer({"models": [TINY], "quant": ["bf16", "int8"], "ranks": [4], "inits": ["loftq"]}, "m.toml")
    with pytest.raises(MatrixError, match="loftq.*needs a format LoftQ's quantizer fits.*allowed: loftq with quant nf4 or nf4-dq"):
        matrix.build([layer])
    layer["quant"] = matrix.RawValue(("bf16", "nf4"), "m.toml")
    built = matrix.build([layer])
    assert [(f.init, f.takes(q)) for f in built.fine_tunes for q in built.quants] == [("loftq", False), ("loftq", True)]


def test_loftq_is_peft_s_own_on_the_cpu_and_starts_at_the_residual_s_best_rank_r_fit(tiny):
    """LoftQ (one iteration) quantizes ``W`` to ``Q`` with bitsandbytes' NF4 and starts the adapter
    at the best rank-r approximation of ``W - Q`` (Eckart-Young, by SVD here): the initial error is,
    in closed form, the residual's tail singular values, sum_{i>r} s_i^2 over ||W||^2 (up to the
    base storing ``Q`` as the loader stores any weight: through bfloat16, as LoftQ's saved model
    is loaded). peft's own adapter, not divided by the scaling, would start at ``lora_alpha = 2 r``
    as far from ``W`` as ``Q`` alone. On the CPU this is peft's code with its moves to CUDA redirected."""
    import bitsandbytes as bnb
    from pytest_lora.measure import merge

    config, state, _, lora = tiny
    loftq = quality.adapted_base(config, state, QUANTIZATIONS["nf4"], lora, "loftq", "cpu")
    tail = norm = 0.0
    for name, layer in merge.lora_layers(loftq).items():
        weight = state[merge.adapted_module_name(name) + ".weight"]
        stored = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4")._quantize("cpu")
        u, s, vh = torch.linalg.svd(weight.double() - bnb.functional.dequantize_4bit(stored.data, stored.quant_state).double())
        best = u[:, :lora.r] @ torch.diag(s[:lora.r]) @ vh[:lora.r]
        assert (merge.expected_delta(layer, lora).double() - best).norm() < 1e-4 * best.norm()
        tail += s[lora.r:].pow(2).sum().item()
        norm += weight.double().pow(2).sum().item()
    default = quality.init_weight_error(quality.adapted_base(config, state, QUANTIZATIONS["nf4"], lora, "default", "cpu"), state, lora)
    error = quality.init_weight_error(loftq, state, lora)
    assert error == pytest.approx(tail / norm, rel=1e-3) and error < 0.8 * default
    for layer in merge.lora_layers(loftq).values():  # undo the division: peft's adapter as it made it
        layer.lora_A["default"].weight.data *= math.sqrt(layer.scaling["default"])
        layer.lora_B["default"].weight.data *= math.sqrt(layer.scaling["default"])
    assert quality.init_weight_error(loftq, state, lora) == pytest.approx(default, rel=2e-2)


def test_loftq_computes_where_peft_puts_it_and_moves_nothing_else():
    """Under the redirect a move to CUDA lands on the CPU; other moves and calls are untouched;
    the redirect is entered only for LoftQ on a machine without CUDA."""
    tensor = torch.ones(2, dtype=torch.float16)
    with quality._CudaOnTheCpu():
        assert tensor.to("cuda").device.type == "cpu" and tensor.to(device=torch.device("cuda:0"), dtype=torch.float32).dtype == torch.float32
        assert tensor.to(torch.float32).dtype == torch.float32 and torch.add(tensor, 1).tolist() == [2.0, 2.0]
    assert isinstance(quality._loftq_compute_device("loftq"), quality._CudaOnTheCpu) != torch.cuda.is_available()
    assert not isinstance(quality._loftq_compute_device("pissa"), quality._CudaOnTheCpu)


# A planted loss of quality: every nf4 base is stored from weights with noise of their own spread added.
NOISY_NF4 = """
import torch
from pytest_lora.models import quantize

original = quantize.quantized_linear


def quantized_linear(module, quant, found):
    if quant.name == "nf4":
        with torch.no_grad():
            noise = torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(0))
            module.weight.add_(noise.to(module.weight.dtype) * module.weight.float().std().to(module.weight.dtype))
    return original(module, quant, found)


quantize.quantized_linear = quantized_linear
"""


@pytest.mark.slow
def test_a_planted_loss_of_quality_fails_the_gate_naming_the_format(bench_run, tmp_path):
    """nf4's configs of the quality suite of conftest's bench run again (its bf16 reference runs
    with them), with nf4's storage degraded: exit 1, the nf4 configs' losses named, and no other
    config's (an identical rerun passing is ``test_gate.test_an_identical_rerun_passes_the_default_gate``,
    which runs this suite too)."""
    from conftest import SHARED_RUNS, bench_subprocess

    (tmp_path / "plant.py").write_text(NOISY_NF4)
    done = bench_subprocess(tmp_path, "-p", "plant", *SHARED_RUNS["bench_run"].args(tmp_path), "-m", "lora_quality",
                            "-k", "nf4 and not nf4-dq", f"--lora-compare={bench_run.latest}")
    assert done.returncode == 1, done.stdout[-3000:]
    gate = json.loads((tmp_path / "results" / "latest.json").read_text())["run"]["gate"]
    flagged = {(r["metric"], "nf4" in r["config"]) for r in gate["regressions"]}
    assert {("quality_loss", True), ("base_loss_a", True)} <= flagged and all(in_nf4 for _, in_nf4 in flagged), flagged
    assert any("quality_loss" in line and "nf4" in line for line in done.stdout.splitlines())


def test_full_finetuning_trains_every_weight_and_gaussian_starts_where_the_default_does(tiny):
    """Full fine-tuning starts from the float32 weights (no initial error) and moves the held-out
    loss; peft's gaussian init, like its default, leaves B at zero: the start is the base."""
    config, state, experiment, lora = tiny
    run = quality.run_full(config, state, experiment, 3, 1e-2, 0, "cpu")
    assert [p.step for p in run.curve] == [0, 1, 2, 3] and run.evaluation_trains_nothing and run.init_weight_error == 0.0
    assert run.final.loss != run.curve[0].loss
    gaussian = quality.adapted_base(config, state, QUANTIZATIONS["fp32"], lora, "gaussian", "cpu")
    assert quality.init_weight_error(gaussian, state, lora) == 0.0
    assert quality.peft_init("gaussian") == {"init_lora_weights": "gaussian"} and quality.peft_init("default") == {"init_lora_weights": True}


SWEEPS = Path(__file__).parents[1] / "benchmarks" / "quality"


@pytest.mark.parametrize("name, dimension, size", [("formats", "quants", 10), ("ranks", "loras", 9), ("learning-rates", "fine_tunes", 5),
                                                   ("inits", "fine_tunes", 5)])
def test_the_sweeps_are_matrices_that_run_as_they_are(name, dimension, size):
    """Each claim's sweep file builds as it is, its pretrained model replaced by a tiny one so
    that the check needs no fetched model."""
    from pytest_lora import matrix

    found = matrix.read_file(SWEEPS / f"{name}.toml", "--lora-matrix")
    layer = {**found.layer, "models": matrix.RawValue((TINY,), "test")}
    built = matrix.build([matrix.default_layer("cpu"), matrix.default_layer("cpu", "quality"), layer])
    assert len(getattr(built, dimension)) == size


def test_a_lora_run_starts_where_its_init_puts_it_and_leaves_its_base_alone(tiny):
    """``quality.run`` on nf4 with PiSSA: its start is the residual's quantization error, the
    base's storage the same after training, and no evaluation trained."""
    config, state, experiment, lora = tiny
    run = quality.run(config, state, QUANTIZATIONS["nf4"], lora, "pissa", experiment, 2, 1e-2, 0, "cpu")
    default = quality.init_weight_error(quality.adapted_base(config, state, QUANTIZATIONS["nf4"], lora, "default", "cpu"), state, lora)
    assert [p.step for p in run.curve] == [0, 1, 2] and run.evaluation_trains_nothing and run.storage_unchanged
    assert 0 < run.init_weight_error < default and math.isfinite(run.init_loss_a)


def test_a_base_of_tensor_subclasses_is_checked_unchanged_by_their_plain_parts(tiny):
    """torchao's ``Int8Tensor`` has no ``torch.equal``: the check compares the plain tensors that
    hold its data, and still sees one int8 code changed."""
    config, state, experiment, lora = tiny
    run = quality.run(config, state, QUANTIZATIONS["torchao-int8"], lora, "default", experiment, 1, 1e-2, 0, "cpu")
    assert run.storage_unchanged and run.evaluation_trains_nothing
    model = quality.adapted_base(config, state, QUANTIZATIONS["torchao-int8"], lora, "default", "cpu")
    before = list(quality.stored_tensors(model).values())
    after = list(quality.stored_tensors(model).values())
    assert quality._same(before, after)
    subclass = next(tensor for tensor in after if type(tensor) is not torch.Tensor)
    subclass.qdata.view(-1)[0] += 1
    assert not quality._same(before, after)


def test_pissa_with_a_rank_wider_than_a_layer_says_which_layer(tiny):
    """The tiny Llama's v_proj is 16 x 64 (one key-value head): PiSSA at r=32 can't fill it."""
    config, state, _, lora = tiny
    wide = copy.deepcopy(lora)
    wide.r = 32
    with pytest.raises(ValueError, match=r"init 'pissa' needs a rank of at most.*v_proj is \(16, 64\), rank 32"):
        quality.adapted_base(config, state, QUANTIZATIONS["nf4"], wide, "pissa", "cpu")
