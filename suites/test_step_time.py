"""Training step time, tokens per second and MFU.

What is measured. One full training step (forward, backward, optimizer step, zero_grad) per config
of the matrix and optimizer (AdamW, bitsandbytes' 8-bit, paged 8-bit and paged AdamW; a paged one
on the CPU is its non-paged fallback, and its record says so), on ``batch`` x ``seq_len`` synthetic tokens, with gradient checkpointing and
``torch.compile`` as the workload says. The step runs through pytest-benchmark's ``benchmark``
fixture in pedantic mode, so ``--benchmark-json``, ``--benchmark-compare`` and
``--benchmark-compare-fail`` work as usual, and into the results store. Warm-up steps
(``--lora-warmup``) are not timed; each timed step (``--lora-rounds``) is measured with CUDA
events on a GPU, waiting for the end event so that pytest-benchmark's host clock reads the same
time, and with ``time.perf_counter`` on the CPU. Reported: median, IQR, min and rounds.

Derived. ``tokens_per_s`` = batch x seq_len / median. ``mfu`` = model FLOPs per step / median /
the device's dense bf16 peak, where the FLOPs are PaLM's appendix-B count adapted to LoRA (4N for
the frozen weights, 6N for the adapter, 12 L H Q T for attention; ``pytest_lora.measure.flops``).
MFU is empty on the CPU.

The machine. torch computes with a fixed number of threads while steps are timed
(``--lora-threads``; 1 on the CPU, where more make medians bimodal as soon as another process
wants a core). Each record says how contended the CPUs were during its timed steps
(``cpu_pressure``: the share of the time some task waited for a CPU, from ``/proc/pressure/cpu``;
``other_cpu_load``: the cores other processes used, from ``/proc/stat``), and carries a warning
when the timing competed for a CPU; the results' machine section has the CPU count, the thread count and the load average
at the start of the run.

The harness itself. The base build (``test_base_build_time``: each (model, quantization) base
is built once, in its dtype on the device, quantized in place) and the harness's overhead
against a bare loop of the same step timed with CUDA events in the same run
(``test_harness_overhead``).

Reference (H200, plain transformers + peft + bitsandbytes, LoRA r=16 on all linear layers, sdpa):
Llama-3-8B shape, bf16, batch 2 x 2048: 463 ms per step, 8,840 tokens/s, MFU about 0.36 of the
measured 784 TFLOP/s (4N per token); nf4 467 ms; nf4 with gradient checkpointing 664 ms. Building
the 8B shape in nf4 there: 0.08 s in bf16 plus 0.15 s quantizing in place.
"""

from __future__ import annotations

import pytest

from pytest_lora.lazy import lazy_import

torch = lazy_import("torch")
peft = lazy_import("peft")
cpu = lazy_import("pytest_lora.measure.cpu")
flops = lazy_import("pytest_lora.measure.flops")
timing = lazy_import("pytest_lora.measure.timing")
train = lazy_import("pytest_lora.measure.train")
adapters = lazy_import("pytest_lora.models.adapters")
build = lazy_import("pytest_lora.models.build")


pytestmark = pytest.mark.lora_step_time


def record(lora_bench, benchmark, metrics: dict[str, tuple[float | None, str]], samples: dict[str, list[float]] | None = None) -> None:
    """The metrics into the results and pytest-benchmark's ``extra_info``; the per-step samples
    behind them into the results, where the regression gate tests changes on them."""
    for name, (value, unit) in metrics.items():
        lora_bench.record(name, value, unit)
    for name, values in (samples or {}).items():
        if metrics[name][0] is not None:
            lora_bench.samples(name, values)
    benchmark.extra_info.update({name: value for name, (value, _) in metrics.items()})


def timed_steps(benchmark, timer: timing.StepTimer, step, warmup: int, rounds: int, progress=lambda done: None) -> list[float]:
    """``warmup`` untimed and ``rounds`` timed calls of ``step``, through pytest-benchmark when it is on."""

    def run():
        timer.time(step)
        progress(len(timer.times))  # after the step's clock stopped

    if benchmark.enabled:
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    else:  # --benchmark-disable, or xdist (pytest-benchmark switches itself off there)
        for _ in range(warmup + rounds):
            run()
    return timer.times[warmup:]


def timed_on_this_machine(lora_session, lora_bench, benchmark, timer, step, warmup: int, rounds: int) -> list[float]:
    """``timed_steps`` with torch's thread count fixed (``--lora-threads``), recording how busy the
    machine was meanwhile (``cpu_pressure``, ``other_cpu_load``) and warning when it competed for a CPU."""
    with lora_session.progress("training steps", warmup + rounds) as progress:
        with cpu.recorded_conditions(lora_session.timing_threads(), lora_bench):
            return timed_steps(benchmark, timer, step, warmup, rounds, progress)


def test_step_time(lora_model, lora_config, lora_batch, model_spec, workload_spec, optimizer_spec, lora_gpu, lora_session, lora_bench, benchmark):
    """Median time of a full training step, tokens/s and MFU."""
    config, batch = model_spec.config_dict(), lora_batch
    warmup, rounds = lora_session.steps("warmup"), lora_session.steps("rounds")
    timer = timing.StepTimer(lora_gpu)
    benchmark.group = model_spec.id
    with train.compiled(lora_model, workload_spec.compile) as model, train.checkpointing(lora_model, workload_spec.grad_ckpt):
        step = train.TrainStep(model, optimizer=optimizer_spec)
        try:
            times = timed_on_this_machine(lora_session, lora_bench, benchmark, timer, lambda: step.run(batch), warmup, rounds)
        finally:
            step.close()
    if step.built.fell_back:
        lora_bench.warn(step.built.fell_back)
    step_flops = flops.lora_step_flops(config, lora_config, workload_spec)
    metrics = timing.timing_metrics(timing.TimingStats.of(times), workload_spec.tokens, step_flops, lora_session.peak_flops())
    if lora_gpu is not None:  # the events against the host clock read after waiting for them
        host = timing.TimingStats.of(timer.host_times[warmup:]).median
        metrics["host_step_time_median_s"] = (host, "s")
        metrics["event_over_host"] = (metrics["step_time_median_s"][0] / host, "CUDA event / host clock")
    record(lora_bench, benchmark, metrics, timing.per_step_samples(times, workload_spec.tokens, step_flops, lora_session.peak_flops()))


def test_base_build_time(base_build, lora_bench):
    """Seconds to get the base ready on the device (built in its dtype, quantized in place)."""
    lora_bench.record("build_time_s", base_build.seconds, "s")
    lora_bench.record("builds", base_build.count, "builds")


def bare_steps(model, batch, timer: timing.StepTimer, warmup: int, rounds: int) -> None:
    """The same step written out by hand, without the harness, timed by the same timer."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    model.train()

    def step():
        model(**batch, **kwargs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    for _ in range(rounds):
        timer.time(step)


def test_harness_overhead(base_model, model_spec, quant_spec, lora_matrix, lora_device, lora_gpu, lora_session, lora_bench, benchmark, request):
    """The harness's step time beside a bare loop of the same step, in the same run (first LoRA
    spec and workload of the matrix; bare rounds before and after the harness's)."""
    lora_spec, workload = lora_matrix.loras[0], lora_matrix.workloads[0]
    config = model_spec.config_dict()
    batch = train.synthetic_batch(config["vocab_size"], workload, lora_device, build.seed_for(request.node.nodeid))
    warmup, rounds = lora_session.steps("warmup"), lora_session.steps("rounds")
    lora_bench.describe(lora=lora_spec, workload=workload)
    bare = timing.StepTimer(lora_gpu)
    lora_config = adapters.lora_config_for(lora_spec, config, quant_spec)
    with adapters.attached(base_model, lora_config) as model, train.checkpointing(model, workload.grad_ckpt):
        with cpu.threads(lora_session.timing_threads()):
            bare_steps(model, batch, bare, warmup, rounds)
        step = train.TrainStep(model)
        try:
            harness = timed_on_this_machine(lora_session, lora_bench, benchmark, timing.StepTimer(lora_gpu), lambda: step.run(batch), warmup, rounds)
        finally:
            step.close()
        with cpu.threads(lora_session.timing_threads()):
            bare_steps(model, batch, bare, warmup, rounds)
    bare_median, harness_median = timing.TimingStats.of(bare.times).median, timing.TimingStats.of(harness).median
    metrics = {
        "bare_step_time_median_s": (bare_median, "s"),
        "step_time_median_s": (harness_median, "s"),
        "harness_overhead_pct": (100.0 * (harness_median - bare_median) / bare_median, "%"),
    }
    record(lora_bench, benchmark, metrics, {"step_time_median_s": harness, "bare_step_time_median_s": bare.times})
