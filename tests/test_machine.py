"""The CPU side of timing (threads, other processes' load), the progress line, lazy imports and
the GPU driver check that keeps torch out of a CPU-only start-up."""

from __future__ import annotations

import inspect
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from pytest_lora import lazy
from pytest_lora.measure import cpu, gpu
from pytest_lora.progress import Progress, Waiting


def test_threads_are_fixed_while_timing_and_restored():
    before = torch.get_num_threads()
    with cpu.threads(1) as count:
        assert count == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu.threads(None) as count:
        assert count == before


def test_other_cores_are_the_machines_busy_time_less_our_own():
    """4 s of machine CPU time over 2 s of wall time, 1 s of it ours: 1.5 cores of others. Without
    pressure information, that is busy on 2 CPUs with 1 timing thread, not on 4."""
    machine, own, clock = iter([100.0, 104.0]), iter([10.0, 11.0]), iter([0.0, 2.0])
    with cpu.MachineLoad(lambda: next(machine), lambda: next(own), lambda: next(clock), stall=lambda: None) as load:
        pass
    assert load.other_cores == pytest.approx(1.5) and load.pressure is None
    assert load.busy(cpu_count=2, threads=1) and not load.busy(cpu_count=4, threads=1)
    assert load.describe(2, 1) == "other processes used 1.50 of 2 CPUs beside 1 timing thread; its times are not comparable"
    quiet = cpu.MachineLoad(lambda: 5.0, lambda: 1.0, iter([0.0, 1.0]).__next__, stall=lambda: None)
    with quiet:
        pass
    assert quiet.other_cores == 0.0 and not quiet.busy(2, 2)
    blind = cpu.MachineLoad(lambda: None, stall=lambda: None)
    with blind:
        pass
    assert blind.other_cores is None and blind.pressure is None and not blind.busy(2, 1)


def test_pressure_decides_where_the_kernel_reports_it():
    """0.6 s of stall over 2 s: 30% of the time a task waited for a CPU. Busy, whatever the cores
    used say; 0.02 s (1%) is not."""
    stall, clock = iter([50.0, 50.6]), iter([0.0, 2.0])
    with cpu.MachineLoad(lambda: 0.0, lambda: 0.0, lambda: next(clock), stall=lambda: next(stall)) as load:
        pass
    assert load.pressure == pytest.approx(0.3) and load.other_cores == 0.0 and load.busy(cpu_count=64, threads=1)
    assert load.describe(64, 2).startswith("a task waited for a CPU 30% of the time; other processes used 0.00 of 64 CPUs beside 2 timing threads")
    stall, clock = iter([50.0, 50.02]), iter([0.0, 2.0])
    with cpu.MachineLoad(lambda: 9.0, lambda: 0.0, lambda: next(clock), stall=lambda: next(stall)) as calm:
        pass
    assert calm.pressure == pytest.approx(0.01) and not calm.busy(cpu_count=2, threads=2)
    frozen = cpu.MachineLoad(lambda: 0.0, lambda: 0.0, lambda: 1.0, stall=lambda: 0.0)
    with frozen:  # no time passed: nothing to say
        pass
    assert frozen.pressure is None and frozen.other_cores is None


def test_stall_seconds_are_read_from_proc_pressure(tmp_path):
    pressure = tmp_path / "cpu"
    pressure.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=2500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert cpu.cpu_stall_seconds(pressure) == 2.5
    assert cpu.cpu_stall_seconds(tmp_path / "missing") is None


def test_busy_seconds_are_read_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n")
    assert cpu.busy_cpu_seconds(stat) == pytest.approx((100 + 5 + 50 + 3 + 2) / 100)
    assert cpu.busy_cpu_seconds(tmp_path / "missing") is None


class Reporter:
    def __init__(self, isatty=True):
        self.isatty, self.written, self.currentfspath = isatty, [], "suites/test_x.py"

    def write(self, text, flush=False):
        self.written.append(text)


def fake_config(reporter):
    plugins = {"terminalreporter": reporter, "capturemanager": None}
    return SimpleNamespace(pluginmanager=SimpleNamespace(get_plugin=plugins.get),
                           get_terminal_writer=lambda: SimpleNamespace(fullwidth=100))


def test_progress_shows_long_tasks_only_and_at_most_twice_a_second():
    reporter, now = Reporter(), [0.0]
    with Progress(fake_config(reporter), "test_forgetting.py::test_x", "step", 300, remaining=4, clock=lambda: now[0]) as progress:
        progress(10)  # at 0 s: too early
        now[0] = 2.5
        progress(100)
        now[0] = 2.7
        progress(110)  # 0.2 s later: skipped
        now[0] = 3.2
        progress(150)
    assert [line.strip() for line in reporter.written] == [
        "[lora] step 100/300 (2 s, about 5 s left; 4 more tests) test_forgetting.py::test_x",  # 2.5 s for 100: 5 s for 200 more
        "[lora] step 150/300 (3 s, about 3 s left; 4 more tests) test_forgetting.py::test_x",
    ]
    assert reporter.written[0].startswith("\n") and reporter.written[1].startswith("\r") and len(reporter.written[1]) == 100
    assert reporter.currentfspath is None  # pytest starts its next result on a new line


def test_progress_is_silent_off_a_terminal_and_says_when_it_is_the_last_test():
    reporter, now = Reporter(isatty=False), [10.0]
    with Progress(fake_config(reporter), "t", "step", 2, remaining=0, clock=lambda: now[0]) as progress:
        now[0] = 20.0
        progress(2)
        assert progress.text(2, 20.0) == "[lora] step 2/2 (10 s; last test) t"
    assert reporter.written == [] and reporter.currentfspath == "suites/test_x.py"


def test_a_long_silent_call_shows_which_config_is_waiting_and_a_short_one_shows_nothing():
    reporter = Reporter()
    progress = Progress(fake_config(reporter), "test_memory.py::test_x[llama-3.1-8b-nf4]", "building the base llama-3.1-8b nf4 on cuda", 1, remaining=7)
    with Waiting(progress, delay=0.05):
        time.sleep(0.5)  # the build
    (line,) = reporter.written
    text = "[lora] building the base llama-3.1-8b nf4 on cuda (0 s; 7 more tests) test_memory.py::test_x[llama-3.1-8b-nf4]"
    assert line == "\n" + text[:99].ljust(99)  # one line, cut to the terminal
    assert reporter.currentfspath is None
    quiet = Reporter()
    with Waiting(Progress(fake_config(quiet), "t", "building", 1, remaining=0), delay=0.5):
        pass
    time.sleep(0.6)
    assert quiet.written == [] and quiet.currentfspath == "suites/test_x.py"


def test_a_lazy_module_loads_on_its_first_public_attribute(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    module = lazy.lazy_import("colorsys")
    assert "colorsys" not in sys.modules and repr(module) == "<lazily imported module 'colorsys'>"
    with pytest.raises(AttributeError):
        module.__test__  # noqa: B018  (what pytest's collection asks of every name)
    inspect.isclass(module)  # what collection asks of every name of a module, besides __test__
    assert "colorsys" not in sys.modules  # neither question imported it
    assert module.rgb_to_hsv(1, 0, 0) == (0.0, 1.0, 1)
    module.ANSWER = 42
    assert sys.modules["colorsys"].ANSWER == 42
    with pytest.raises(ModuleNotFoundError):
        lazy.lazy_import("no_such_module_anywhere")


def test_no_gpu_driver_means_no_torch_import_to_ask(monkeypatch):
    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(sys, "platform", "linux")
    assert not gpu.gpu_driver_present(missing)
    assert gpu.gpu_driver_present(lambda name: name == "libcuda.so.1" or missing(name))
    monkeypatch.setattr(gpu, "gpu_driver_present", lambda: False)
    assert gpu.cuda_gpu() is None


def test_on_a_platform_without_a_known_driver_torch_is_asked(monkeypatch):
    monkeypatch.setattr(sys, "platform", "sunos5")
    assert gpu.gpu_driver_present(lambda name: pytest.fail("nothing to load"))


def test_with_a_driver_torch_is_asked(monkeypatch):
    monkeypatch.setattr(gpu, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.cuda_gpu() is None


def test_a_process_spinning_beside_the_timing_is_seen_as_another_core():
    """The reading against a second measurement: a child process that spins for its whole life
    uses one core, so other processes used at least most of one while it ran (more if the machine
    has other work: only a lower bound can hold on a shared runner), and the no-PSI rule calls
    that busy."""
    import subprocess

    spin = "import time\nend = time.perf_counter() + 1.0\nwhile time.perf_counter() < end: pass\n"
    with cpu.MachineLoad() as load, cpu.MachineLoad(stall=lambda: None) as without_psi:
        subprocess.run([sys.executable, "-c", spin], check=True)
    assert load.other_cores is not None and load.other_cores >= 0.6, load.other_cores
    # The rule where the kernel has no pressure information, on this real reading: a spinning
    # process beside one timing thread on 2 cores is busy (more than the half core left free).
    assert without_psi.pressure is None and without_psi.busy(cpu_count=2, threads=1), without_psi.other_cores


def test_recorded_conditions_record_the_load_and_warn_when_the_timing_competed(monkeypatch):
    """A timed block records how busy the machine was, and a busy one is marked ``busy`` (the field the
    gate reads) and says how busy in a warning; a quiet one neither."""
    from pytest_lora.results.recorder import BUSY_WARNING, Recorder, timed_while_busy

    for busy in (True, False):
        monkeypatch.setattr(cpu.MachineLoad, "busy", lambda self, cpu_count, threads, busy=busy: busy)
        recorder = Recorder("step_time", "t", {})
        with cpu.recorded_conditions(1, recorder):
            pass
        assert {"cpu_pressure", "other_cpu_load"} <= set(recorder.metrics)
        record = recorder.to_record()
        assert record.get("busy", False) is busy and timed_while_busy(record) == busy
        assert all(w.startswith(BUSY_WARNING) for w in recorder.warnings) and len(recorder.warnings) == busy


def test_a_record_written_before_the_busy_field_is_read_by_its_warning():
    """Baselines written before records carried ``busy`` say it only in the warning's words; the
    field, where present, decides (a warning that merely quotes the words does not)."""
    from pytest_lora.results.recorder import timed_while_busy

    old = {"warnings": ["machine busy while timing: other processes used 1.50 of 2 CPUs beside 1 timing thread"]}
    assert timed_while_busy(old) and not timed_while_busy({"warnings": []}) and not timed_while_busy({})
    assert timed_while_busy({"busy": True, "warnings": []}) and not timed_while_busy({**old, "busy": False})
