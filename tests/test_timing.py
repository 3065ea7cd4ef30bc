"""Step timing: the timer against a known sleep, the statistics against a hand computation, the
FLOP count against a hand count and torch's own FLOP counter, pytest-benchmark's JSON loading in
``pytest-benchmark compare``, and the timing options."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pytest_lora.models.resolve import resolve_model
from pytest_lora.specs import QUANTIZATIONS, WorkloadSpec
from pytest_lora.measure import flops, timing
from pytest_lora.measure.train import TrainStep, compiled, synthetic_batch
from pytest_lora.models import adapters, build, registry

SUITE = Path(__file__).parents[1] / "suites" / "test_step_time.py"
TINY_STEP = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=nf4", "--lora-ranks=4", "--lora-targets=q_proj,v_proj", "--lora-rounds=3", "--lora-warmup=1")


def test_the_cpu_timer_measures_a_known_sleep():
    timer = timing.StepTimer(None)
    for _ in range(3):
        timer.time(lambda: time.sleep(0.02))
    assert len(timer.times) == 3
    assert all(0.02 <= t < 0.02 + 0.5 for t in timer.times)  # a sleep lasts at least what it asks


def test_statistics_are_pytest_benchmarks_quartiles():
    odd = timing.TimingStats.of([4.0, 1.0, 100.0, 3.0, 2.0])
    assert (odd.median, odd.min, odd.rounds) == (3.0, 1.0, 5)
    assert odd.iqr == pytest.approx((0.75 * 4 + 0.25 * 100) - (0.25 * 1 + 0.75 * 2))  # Wikipedia's method 3
    even = timing.TimingStats.of([1.0, 2.0, 3.0, 4.0])
    assert (even.median, even.iqr) == (2.5, 2.0)  # method 2: medians of the halves, 3.5 - 1.5


# --------------------------------------------------------------------------- FLOPs


def test_flops_by_hand_for_the_tiny_llama():
    """llama-3.1-8b-tiny: width 64, MLP 128, two layers, four heads of 16 and one key/value head, vocabulary 256."""
    config = registry.load_config_dict("llama-3.1-8b-tiny")
    per_layer = 64 * 64 + 64 * 16 + 64 * 16 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate, up, down
    frozen = 2 * per_layer + 64 * 256  # and the untied lm_head
    adapter = 2 * 8 * ((64 + 64) + (64 + 16))  # r = 8 on q and v, two layers
    attention = 12 * 2 * (4 * 16) * 32  # 12 L H Q T with T = 32
    workload = WorkloadSpec(seq_len=32, batch=3)
    expected = (4 * frozen + 6 * adapter + attention) * 3 * 32
    assert flops.lora_step_flops(config, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), workload) == expected


def test_encoder_decoder_attention_counts_cross_attention():
    config = registry.load_config_dict("flan-t5-base")
    assert flops.attention_layers(config) == 12 + 2 * 12
    assert flops.attention_width(config) == 12 * 64


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_matmul_flops_agree_with_torchs_flop_counter(targets):
    """torch counts the matrix multiplies of a real step. The two differ by what autograd skips and
    the convention keeps: the input gradient of the first block's projections, which read the
    frozen embeddings (base weights and LoRA A alike). Attention on the CPU goes through a kernel
    torch's counter doesn't see, so it is compared without the attention term."""
    spec = resolve_model("llama-3.1-8b-tiny", "test")
    config = spec.config_dict()
    workload = WorkloadSpec(seq_len=32, batch=2)
    lora = peft.LoraConfig(r=8, target_modules=targets, lora_dropout=0.0)
    base = build.build_base(spec, QUANTIZATIONS["fp32"], "cpu")
    with adapters.attached(base, lora) as model, FlopCounterMode(display=False) as counter:
        step = TrainStep(model)
        step.forward(synthetic_batch(256, workload, "cpu", 0))
        step.backward()
        step.close()
    attention = 12 * 2 * 64 * 32 * workload.tokens
    first_block = 64 * 64 + 64 * 16 + 64 * 16  # q, k, v read the embeddings
    first_block_lora = 8 * 64 * (2 if isinstance(targets, list) else 3)  # the A matrices that read them
    skipped = 2 * (first_block + first_block_lora) * workload.tokens
    # The hand count (test_flops_by_hand_for_the_tiny_llama) is the reference. torch's counter is a
    # second opinion whose small ops change between releases: torch 2.11 counts 512 FLOPs more here
    # than 2.13 (22,381,056 against 22,380,544): 2e-5 of the step.
    assert counter.get_total_flops() == pytest.approx(flops.lora_step_flops(config, lora, workload) - attention - skipped, rel=1e-4)


# --------------------------------------------------------------------------- the suite end to end


@pytest.fixture
def step_time_suite(suite):
    return suite(SUITE.read_text(), name="test_step_time_copy.py")


def test_benchmark_json_loads_in_pytest_benchmark_compare(pytester, step_time_suite, tmp_path):
    """With ``--dist loadgroup`` and no workers, as a project's addopts may give it (ours does):
    pytest-benchmark would take that for xdist and disable its timings, with a warning per test."""
    output = tmp_path / "bench.json"
    result = pytester.runpytest(*TINY_STEP, "-k", "not harness and not build", f"--benchmark-json={output}", "--dist", "loadgroup")
    result.assert_outcomes(passed=1, deselected=2)
    assert "Benchmarks are automatically disabled" not in result.stdout.str() + result.stderr.str()
    document = json.loads(output.read_text())
    (bench,) = document["benchmarks"]
    assert bench["stats"]["rounds"] == 3
    extra = bench["extra_info"]
    assert set(extra) >= {"step_time_median_s", "step_time_iqr_s", "tokens_per_s", "mfu", "flops_per_step"}
    assert extra["mfu"] is None and extra["tokens_per_s"] == pytest.approx(2 * 64 / extra["step_time_median_s"])
    command = Path(sys.executable).with_name("pytest-benchmark")  # the console script users run
    compared = subprocess.run([str(command), "compare", str(output)], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stderr
    assert "test_step_time" in compared.stdout

    record = next(r for r in json.loads((pytester.path / "results" / "latest.json").read_text())["records"] if "test_step_time" in r["test"])
    assert record["metrics"]["step_time_rounds"] == 3
    assert record["metrics"]["step_time_median_s"] == pytest.approx(bench["stats"]["median"], rel=0.05)


def test_steps_are_timed_without_pytest_benchmark(pytester, step_time_suite):
    """--benchmark-disable (and xdist) switch pytest-benchmark off; the suite still times its rounds."""
    pytester.runpytest(*TINY_STEP, "--benchmark-disable").assert_outcomes(passed=3)
    records = {r["test"].split("::")[1].split("[")[0]: r for r in json.loads((pytester.path / "results" / "latest.json").read_text())["records"]}
    assert records["test_step_time"]["metrics"]["step_time_rounds"] == 3
    assert records["test_base_build_time"]["metrics"]["builds"] == 1
    assert records["test_base_build_time"]["metrics"]["build_time_s"] > 0
    assert records["test_harness_overhead"]["metrics"]["bare_step_time_median_s"] > 0


@pytest.mark.parametrize(
    "option, message",
    [
        ("--lora-rounds=0", "--lora-rounds: '0' is not a step count; allowed: an integer >= 1"),
        ("--lora-warmup=-1", "--lora-warmup: '-1' is not a step count; allowed: an integer >= 0"),
        ("--lora-threads=0", "--lora-threads: '0' is not a thread count; allowed: an integer >= 1"),
        ("--lora-peak=fast", "--lora-peak: 'fast' is not a peak; allowed: auto, measure or TFLOP/s as a finite positive number"),
    ],
)
def test_bad_timing_options(pytester, option, message):
    result = pytester.runpytest("--lora-bench", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_compile_is_a_workload_dimension():
    layer = torch.nn.Linear(4, 4)
    with compiled(layer, False) as same:
        assert same is layer
    with compiled(layer, True) as wrapped:
        assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
        assert wrapped._orig_mod is layer
    assert WorkloadSpec(128, 2, compile=True).id == "b2xs128-compile"


def test_tokens_per_second_and_mfu_from_the_median():
    stats = timing.TimingStats.of([0.5, 0.25, 0.75])
    metrics = timing.timing_metrics(stats, tokens=4096, flops=2 * 10**14, peak=989.4e12)
    assert metrics["step_time_median_s"] == (0.5, "s")
    assert metrics["tokens_per_s"] == (8192.0, "tokens/s")
    assert metrics["mfu"][0] == pytest.approx(2e14 / 0.5 / 989.4e12)  # 0.404
    assert timing.timing_metrics(stats, 4096, 2 * 10**14, None)["mfu"][0] is None  # no peak on the CPU: empty, not zero


@pytest.mark.slow
def test_a_compiled_training_step_runs_on_a_4bit_base(monkeypatch):
    """torch.compile over bitsandbytes' 4-bit layers: graph breaks are allowed, a crash is not, and
    the compiled step trains the adapter and leaves the shared base as it was (passes on torch 2.11
    and 2.13).

    What can break on our side is dynamo's capture of the peft and bitsandbytes modules and
    AOTAutograd's backward through them, so the step compiles with the ``aot_eager`` backend:
    both run, and only inductor's C++ code generation is left out (torch's own, 30 s warm and
    90 s cold on a 2-core CPU, and not the Triton code a GPU run generates)."""
    compile_, graphs = torch.compile, []

    def aot_eager(model):
        def backend(graph, example_inputs):
            graphs.append(graph)
            return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)
        return compile_(model, backend=backend)

    monkeypatch.setattr(torch, "compile", aot_eager)
    base = build.build_base(resolve_model("llama-3.2-1b-tiny", "test"), QUANTIZATIONS["nf4"], "cpu")
    state = adapters.BaseState.of(base)
    with adapters.attached(base, peft.LoraConfig(r=4, target_modules="all-linear")) as model, compiled(model, True) as step_model:
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        step = TrainStep(step_model)
        for seed in range(2):
            step.run(synthetic_batch(256, WorkloadSpec(32, 2), "cpu", seed))
        assert torch.isfinite(step.optimizer.param_groups[0]["params"][0]).all()
        changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        step.close()
    assert len(changed) == len(before)  # every adapter tensor trained (B from zero, then A)
    assert graphs  # the step ran compiled graphs, not only eager code
    assert state.differences(base) == []


THREAD_WATCHER = """
import pytest
import torch

from pytest_lora.measure import train


@pytest.fixture(autouse=True)
def threads_seen(monkeypatch, pytestconfig):
    run = train.TrainStep.run

    def watched(self, batch):
        with open(pytestconfig.rootpath / "threads.txt", "a") as log:
            log.write(f"{torch.get_num_threads()}\\n")
        return run(self, batch)

    monkeypatch.setattr(train.TrainStep, "run", watched)
"""


@pytest.mark.parametrize("option, expected", [((), 1), (("--lora-threads=3",), 3)], ids=["default", "option"])
def test_steps_are_timed_with_the_fixed_thread_count(pytester, step_time_suite, option, expected):
    """Every timed (and warm-up) step runs with the count, the machine record says it, and torch's
    own count is back afterwards."""
    (pytester.path / "suites" / "conftest.py").write_text(THREAD_WATCHER)
    before = torch.get_num_threads()
    pytester.runpytest(*TINY_STEP, *option, "-k", "not harness and not build").assert_outcomes(passed=1, deselected=2)
    assert set((pytester.path / "threads.txt").read_text().split()) == {str(expected)}
    latest = json.loads((pytester.path / "results" / "latest.json").read_text())
    assert latest["machine"]["cpu_threads"] == expected and torch.get_num_threads() == before
    (record,) = latest["records"]
    assert set(record["metrics"]) >= {"cpu_pressure", "other_cpu_load"}


def test_under_the_bench_pytest_benchmark_prints_no_table_of_its_own_and_no_line_is_wider_than_120(pytester, step_time_suite):
    """The bench's step-time table shows the timings; pytest-benchmark's (218 columns a row) comes
    back with any of its table options. The header's lines, ours and pytest-benchmark's, fit 120."""
    args = (*TINY_STEP, "-k", "not harness and not build")
    quiet = pytester.runpytest(*args)
    quiet.assert_outcomes(passed=1, deselected=2)
    assert "Name (time in" not in quiet.stdout.str()
    header = quiet.outlines[:quiet.outlines.index(next(line for line in quiet.outlines if line.startswith("collected")))]
    assert header and max(len(line) for line in header) <= 120, header
    assert any(line.startswith("benchmark: ") for line in header) and any(line.startswith("lora: ") for line in header)
    table = pytester.runpytest(*args, "--benchmark-columns=min,max")
    assert "Name (time in" in table.stdout.str()
