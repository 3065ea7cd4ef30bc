"""Every GPU code path, run on the CPU through the fakes of ``tests/fakes.py``: the timer, the
allocator statistics, NVML, the device name, out-of-memory errors, and ``make gpu-check`` end to
end, including the faults it must catch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fakes import FakeCudaRuntime, FakeGpuPlugin, FakeNvml, fake_gpu
from pytest_lora import gpucheck
from pytest_lora.measure import gpu as gpu_module
from pytest_lora.measure import memory, timing, train  # imported here, so that the inner runs see the patched modules

SUITES = Path(__file__).parents[1] / "suites"
MiB = 2**20


# --------------------------------------------------------------------------- the seam


def test_nvml_device_is_found_by_pci_bus_id_not_by_index():
    """cuda:0 is the device on PCI bus 0x40, which NVML numbers 1: its bytes, not device 0's."""
    gpu = fake_gpu()
    nvml = gpu._nvml
    assert nvml.devices[0].bus_id.endswith(":30:00.0") and nvml.devices[1].bus_id.endswith(":40:00.0")
    assert gpu.device_used() == nvml.context + 1 * 100 * MiB  # device 1's other processes, not device 0's 200 MiB


def test_nvml_device_falls_back_to_the_uuid_and_never_to_an_index():
    runtime = FakeCudaRuntime()
    gpu = fake_gpu(runtime)
    runtime.properties[0].pci_bus_id = 0x99  # a bus NVML does not know: only the UUID can find it
    assert gpu.device_used() == gpu._nvml.context + 100 * MiB
    runtime.properties[0].uuid = "unknown"
    assert gpu_module.nvml_handle(gpu._nvml, runtime.properties[0]) is None  # unknown, not another device's bytes


def test_no_nvml_means_unknown_device_bytes():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    assert fake_gpu(nvml=Broken()).device_used() is None
    assert fake_gpu(nvml=Broken()).driver() is None
    assert gpu_module.Gpu(FakeCudaRuntime(), None).device_used() is None
    assert fake_gpu().driver() == "580.95.05"


def test_statistics_are_read_on_the_models_device_after_a_synchronise():
    runtime = FakeCudaRuntime(current=1)
    gpu = fake_gpu(runtime)
    gpu.reset_peak()
    gpu.peak_allocated()
    gpu.allocated()
    asked = [call for call in runtime.calls if call[0] != "synchronize"]
    assert asked == [("reset_peak_memory_stats", 1), ("max_memory_allocated", 1), ("memory_allocated", 1)]
    for position, call in enumerate(runtime.calls):
        if call[0] != "synchronize":
            assert runtime.calls[position - 1] == ("synchronize", 1)


def test_the_fake_allocator_counts_live_storages_and_runs_out():
    runtime = FakeCudaRuntime(capacity=8 * MiB)
    gpu = fake_gpu(runtime)
    with runtime.device:
        x = torch.ones(MiB // 4)  # 1 MiB of float32
        view = x[10:]
        assert gpu.allocated() == MiB
        del x
        assert gpu.allocated() == MiB  # the view keeps the storage
        del view
        assert gpu.allocated() == 0 and gpu.peak_allocated() == MiB
        with pytest.raises(torch.OutOfMemoryError):
            torch.ones(3 * MiB)
        assert gpu.reserved() >= gpu.allocated()


@pytest.mark.parametrize(
    "error, oom",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (torch.AcceleratorError("CUDA error: out of memory") if hasattr(torch, "AcceleratorError") else RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUDA driver error: CUDA_ERROR_OUT_OF_MEMORY"), True),
        (ValueError("wrong shape"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (None, False),
    ],
)
def test_out_of_memory_in_every_form(error, oom):
    assert gpu_module.is_out_of_memory(error) is oom


def test_out_of_memory_raised_from_another_error():
    try:
        try:
            raise RuntimeError("CUDA error: out of memory")
        except RuntimeError as inner:
            raise ValueError("building the base failed") from inner
    except ValueError as outer:
        assert gpu_module.is_out_of_memory(outer)


# --------------------------------------------------------------------------- timing


def test_the_cuda_timer_waits_for_its_end_event_and_agrees_with_the_host_clock():
    runtime = FakeCudaRuntime(kernel_s=1e-3)
    timer = timing.StepTimer(fake_gpu(runtime))
    with runtime.device:
        a = torch.ones(8, 8)
        timer.time(lambda: [a @ a for _ in range(5)])
    assert timer.times == [pytest.approx(5e-3)]  # five kernels of 1 ms
    assert timer.host_times == [pytest.approx(5e-3)]


def test_an_event_read_before_its_end_completes_is_an_error():
    """CUDA's contract, kept by the fake: a timer that does not wait gets no time."""
    gpu = fake_gpu()
    start, end = gpu.event(), gpu.event()
    start.record()
    end.record()
    with pytest.raises(RuntimeError, match="device not ready"):
        start.elapsed_time(end)
    gpu.synchronize()
    assert start.elapsed_time(end) == 0.0


def test_measured_peak_on_a_small_product():
    runtime = FakeCudaRuntime(kernel_s=1e-3)
    with runtime.device:
        peak = timing.measured_peak(fake_gpu(runtime), size=16, rounds=3)
    assert peak == pytest.approx(2 * 16**3 / 1e-3)  # one matrix product, one kernel of 1 ms


@pytest.mark.parametrize("choice, measured, source", [
    ("500", False, "--lora-peak"), ("auto", False, "data sheet, dense bf16: H200"),
    ("measure", True, "measured: bf16 8192^3 matrix product"), ("AUTO", True, "measured: bf16 8192^3 matrix product"),
])
def test_the_peak_is_the_options_number_the_data_sheet_or_measured(monkeypatch, choice, measured, source):
    """``--lora-peak``: a number in TFLOP/s; ``auto``: a known GPU's data sheet, else measured (a
    GPU the table lacks: the last case's); ``measure``: measured even where the table knows it."""
    asked = []
    monkeypatch.setattr(timing, "measured_peak", lambda gpu: asked.append(gpu.name) or 123e12)
    name = "NVIDIA H200" if choice != "AUTO" else "NVIDIA Future GPU"
    gpu = type("Gpu", (), {"name": name})()
    peak, where = timing.resolve_peak(gpu, choice, "--lora-peak")
    expected = 123e12 if measured else 500e12 if choice == "500" else timing.table_peak(name)
    assert (peak, where, asked) == (expected, source, [name] if measured else [])


@pytest.mark.parametrize(
    "name, model, peak",
    [
        ("NVIDIA H200", "H200", 989.4e12),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5e12),
        ("NVIDIA H100 80GB HBM3", "H100", 989.4e12),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0e12),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5e12),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0e12),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe", 312.0e12),
        ("NVIDIA L4", "L4", 121.0e12),
        ("NVIDIA L40", "L40", 181.05e12),
        ("NVIDIA L40S", "L40S", 362.05e12),
        ("NVIDIA A10", "A10", 125.0e12),
        ("NVIDIA A10G", "A10G", None),
        ("Some Future GPU", "Some Future GPU", None),
    ],
)
def test_peak_table_matches_whole_model_names(name, model, peak):
    assert timing.gpu_model(name) == model
    assert timing.table_peak(name) == peak


# --------------------------------------------------------------------------- make gpu-check, end to end

TINY_RUNS = (
    {"name": "tiny-1b", "models": ["llama-3.2-1b-tiny"], "quant": ["bf16", "nf4"], "batch": [2], "grad_ckpt": [False], "seq_len": [64],
     "optimizers": ["adamw"]},
    {"name": "tiny-8b", "models": ["llama-3.1-8b-tiny"], "quant": ["nf4"], "batch": [2], "grad_ckpt": [False, True], "seq_len": [64],
     "optimizers": ["adamw"]},
)


def gpu_check(pytester, monkeypatch, runs=TINY_RUNS, plant=None):
    """gpu-check's runs and verdict on tiny shapes, on the fake GPU; ``plant`` breaks something first."""
    directory = pytester.path / "suites"
    directory.mkdir(exist_ok=True)
    for name in ("test_memory.py", "test_step_time.py"):
        (directory / name).write_text((SUITES / name).read_text())
    if plant:
        plant(monkeypatch)
    records = []
    for run in runs:
        where = pytester.path / "results" / run["name"]
        args = gpucheck.pytest_args(run, where, suites=str(directory))
        pytester.runpytest(*args, "--lora-rounds=3", "--lora-warmup=1", "-k", "not published", plugins=[FakeGpuPlugin()])
        records += json.loads((where / "latest.json").read_text())["records"]
    return gpucheck.verdict(records)


def failed(checks):
    return sorted({c.name for c in checks if c.ok is False})


@pytest.mark.slow
def test_gpu_check_passes_on_a_healthy_fake_gpu(pytester, monkeypatch):
    checks = gpu_check(pytester, monkeypatch)
    # The checkpointed step too: its peak is the larger of the head's and a rebuilt layer's, not
    # their sum (0.83x here while it summed them; 1.11x now, where the fake GPU's dropout keeps the
    # CPU's fp32 noise and the model counts a GPU's 1-byte mask).
    assert failed(checks) == []
    names = {c.name for c in checks}
    assert {"base ready", "harness overhead", "peak vs analytic step", "CUDA events vs host clock", "released after the config",
            "no growth between bases", "NVML >= reserved >= allocated", "phase peaks cover their phase"} <= names
    assert sum(c.name == "peak vs analytic step" for c in checks) == 4
    text = gpucheck.render(checks)
    assert text.splitlines()[-1].startswith("gpu-check: ") and text.splitlines()[-1].endswith(" passed, 0 failed")


def plant_leak(monkeypatch):
    """Every step keeps 128 MiB alive."""
    kept = []
    original = train.TrainStep.optimizer_step

    def leaky(self):
        original(self)
        kept.append(torch.empty(128 * MiB, dtype=torch.uint8))

    monkeypatch.setattr(train.TrainStep, "optimizer_step", leaky)


def plant_impatient_timer(monkeypatch):
    """The timer reads its events without waiting for the end one."""

    def time_without_waiting(self, step):
        start, end = self.gpu.event(), self.gpu.event()
        start.record()
        step()
        end.record()
        self.times.append(start.elapsed_time(end) / 1000.0)

    monkeypatch.setattr(timing.StepTimer, "time", time_without_waiting)


def plant_peak_before_reset(monkeypatch):
    """Each phase's peak is read before its reset: the previous phase's peak."""

    def stale(gpu, run):
        peak = gpu.peak_allocated()
        gpu.reset_peak()
        run()
        return peak

    monkeypatch.setattr(memory, "phase_peak", stale)


@pytest.mark.parametrize(
    "plant, fails",
    [
        (plant_leak, {"released after the config", "peak vs analytic step", "test passed"}),
        (plant_impatient_timer, {"test passed", "CUDA events vs host clock", "harness overhead"}),
        (plant_peak_before_reset, {"phase peaks cover their phase"}),
    ],
    ids=["leak", "timer-not-waiting", "peak-read-before-reset"],
)
def test_gpu_check_fails_on_a_planted_fault(pytester, monkeypatch, plant, fails):
    checks = gpu_check(pytester, monkeypatch, runs=({**TINY_RUNS[0], "quant": ["bf16"]},), plant=plant)  # one base: none of the faults is a format's
    assert fails <= set(failed(checks)), gpucheck.render(checks)



# --------------------------------------------------------------------------- on a GPU host


def test_the_plugins_tests_expect_the_cpu_even_on_a_gpu_host(pytester, suite, monkeypatch):
    """The default GPU discovery finds a GPU here (as on a GPU host); inner runs still use the CPU."""
    monkeypatch.setattr(gpu_module, "cuda_gpu", lambda: fake_gpu())
    suite()
    pytester.runpytest("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=none", "--lora-ranks=4", "--lora-targets=q_proj").assert_outcomes(passed=1)
    assert json.loads((pytester.path / "results" / "latest.json").read_text())["machine"]["device"] == "cpu"


def test_a_fake_gpu_is_recorded_as_the_machine(pytester, suite):
    suite()
    plugin = FakeGpuPlugin()
    pytester.runpytest("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=none", "--lora-ranks=4", "--lora-targets=q_proj",
                       "--lora-peak=auto", plugins=[plugin]).assert_outcomes(passed=1)
    machine = json.loads((pytester.path / "results" / "latest.json").read_text())["machine"]
    assert (machine["device"], machine["gpu_name"], machine["driver"]) == ("cuda", "NVIDIA H200", "580.95.05")


PEAK_SUITE = """
import pytest

pytestmark = pytest.mark.lora_step_time


def test_peak(lora_session, lora_bench):
    lora_bench.record("peak_flops", lora_session.peak_flops(), "FLOP/s")
"""


@pytest.mark.parametrize(
    "option, tflops, source",
    [("--lora-peak=auto", 989.4, "data sheet, dense bf16: H200"), ("--lora-peak=500", 500.0, "--lora-peak")],
)
def test_the_mfu_peak_and_where_it_came_from_are_recorded(pytester, suite, option, tflops, source):
    suite(PEAK_SUITE)
    pytester.runpytest("--lora-bench", option, plugins=[FakeGpuPlugin()]).assert_outcomes(passed=1)
    document = json.loads((pytester.path / "results" / "latest.json").read_text())
    assert document["records"][0]["metrics"]["peak_flops"] == pytest.approx(tflops * 1e12)
    assert document["machine"]["mfu_peak_tflops"] == pytest.approx(tflops)
    assert document["machine"]["mfu_peak_source"].startswith(source)


H200_BYTES = 139 * 2**30  # what the lent H200 offers to a process (shared/device)


def test_the_default_gpu_matrix_fits_one_h200():
    """Every step of the embedded [cuda] matrix, by the analytic model (within 1.5-12% of H200
    peaks, test_memory_accounting), with a fifth to spare; and the merge suite's largest
    full-precision check, which holds the base, its private copy and one layer's float64 terms."""
    import peft

    from pytest_lora.matrix import default_layer, build as build_matrix
    from pytest_lora.models import registry

    matrix = build_matrix([default_layer("cuda")])
    for model in matrix.models:
        config = registry.load_config_dict(model.name)
        for quant in matrix.quants:
            for spec in matrix.loras:
                for workload in matrix.workloads:
                    estimate = memory.analytic_step(config, quant, peft.LoraConfig(**spec.peft_kwargs()), workload)
                    assert estimate.total <= 0.8 * H200_BYTES, (model.id, quant.id, workload.id, estimate.total / 2**30)
            weights = memory.analytic_weight_bytes(config, quant)
            assert 2 * weights + 8 * config["intermediate_size"] * config["hidden_size"] * 4 <= 0.8 * H200_BYTES


def test_no_growth_between_bases_under_the_memory_suite_alone(pytester, suite):
    """With -m memory alone the first base is built before any matrix product has run; cuBLAS's
    workspaces, made by the first step, must already be in that first "before" (the fake makes
    two of 32 MiB, as sm90 does), so growth and leaks are exactly zero."""
    suite((SUITES / "test_memory.py").read_text(), name="test_memory_copy.py")
    (pytester.path / "small.toml").write_text('dropout = [0.0]\nseq_len = [64]\nbatch = [2]\ngrad_ckpt = [false]\noptimizers = ["adamw"]\n')
    args = ("--lora-bench", "--lora-matrix=small.toml", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=bf16,nf4", "--lora-ranks=4",
            "--lora-targets=q_proj", "-k", "step_peak_memory")
    pytester.runpytest(*args, plugins=[FakeGpuPlugin()]).assert_outcomes(passed=2)
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    assert [(r["metrics"]["growth_between_bases_bytes"], r["metrics"]["leaked_bytes"]) for r in records] == [(0, 0), (0, 0)]


PRESSURE_ARGS = ("--lora-bench", "--lora-models=llama-3.2-1b-tiny", "--lora-quant=bf16", "--lora-ranks=4", "--lora-targets=q_proj",
                 "--lora-optimizers=adamw,paged_adamw8bit", "-k", "under_pressure")


def pressure_run(pytester, suite, extra=()):
    """A step of 8 x 1024 tokens: its logits alone (8 MiB) outgrow the allocator's 2 MiB rounding."""
    suite((SUITES / "test_memory.py").read_text(), name="test_memory_copy.py")
    (pytester.path / "small.toml").write_text('dropout = [0.0]\nseq_len = [1024]\nbatch = [8]\ngrad_ckpt = [false]\n')
    plugin = FakeGpuPlugin(fake_gpu(FakeCudaRuntime(capacity=256 * MiB)))
    result = pytester.runpytest(*PRESSURE_ARGS, "--lora-matrix=small.toml", *extra, plugins=[plugin])
    result.assert_outcomes(passed=1, skipped=1)  # AdamW is not paged
    record = next(r for r in json.loads((pytester.path / "results" / "latest.json").read_text())["records"] if r["status"] == "ok")
    return record["metrics"], plugin.runtime, record["warnings"]


def test_a_paged_optimizer_under_pressure_on_a_fake_gpu(pytester, suite):
    """The device is filled to the non-paged step's need (no tensor of the tiny adapter is large
    enough to be paged): both steps fit, and the ballast is gone afterwards."""
    metrics, runtime, warnings = pressure_run(pytester, suite)
    assert metrics["analytic_paged_state_bytes"] == 0
    assert metrics["non_paged_under_pressure_oom"] == metrics["paged_under_pressure_oom"] == 0
    assert metrics["pressure_headroom_bytes"] > 0 and runtime.stats[0].allocated < 128 * MiB  # the ballast is gone
    assert metrics["pressure_conclusive"] == 0 and warnings == ["inconclusive: both steps fit at this headroom (0 bytes of state to page)"]


@pytest.mark.parametrize("non_paged, paged, conclusive, wrong", [
    (True, False, True, False), (False, False, False, False), (True, True, False, False), (False, True, False, True)])
def test_the_pressure_run_is_conclusive_only_when_paging_saved_the_step(non_paged, paged, conclusive, wrong):
    def phase(oom: bool) -> memory.PhaseMemory:
        return memory.PhaseMemory(base_allocated=0, oom="CUDA out of memory" if oom else None)

    found = memory.Pressure(phase(False), 0, phase(non_paged), phase(paged)).verdict()
    assert found[0] is conclusive and (found[1] is not None) is wrong


def test_too_little_headroom_is_recorded_as_out_of_memory(pytester, suite, monkeypatch):
    """Half of a (planted) large paged state taken from the headroom: the steps run out of memory,
    and the test records that instead of failing."""
    pytester.makepyfile(planted_state="""
        import pytest
        from pytest_lora.measure import optimizers

        @pytest.fixture(autouse=True)
        def large_state(monkeypatch):
            monkeypatch.setattr(optimizers, "analytic_paged_bytes", lambda *args: 2**40)
        """)
    pytester.syspathinsert()
    metrics, _, warnings = pressure_run(pytester, suite, ("-p", "planted_state"))
    assert metrics["pressure_headroom_bytes"] < 0
    assert metrics["non_paged_under_pressure_oom"] == metrics["paged_under_pressure_oom"] == 1
    assert metrics["pressure_conclusive"] == 0 and warnings[0].startswith("inconclusive: both steps ran out of memory at this headroom")
