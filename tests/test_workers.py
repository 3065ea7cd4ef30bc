"""One xdist worker per GPU, without a GPU: the worker-to-device mapping for the ways
``CUDA_VISIBLE_DEVICES`` is set, ``-n auto``'s worker count, and the pinning a worker does,
end to end through xdist with a list of device UUIDs that no CUDA ever reads on this machine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import SMALL, untimed
from pytest_lora.dist import workers


@pytest.mark.parametrize("environ, expected", [
    ({}, ["0", "1", "2", "3"]),  # unset: every device the driver counts
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, ["0", "1", "2", "3"]),
    ({"CUDA_VISIBLE_DEVICES": "3,1"}, ["3", "1"]),  # a subset, reordered
    ({"CUDA_VISIBLE_DEVICES": " 2 , 0 "}, ["2", "0"]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-8f2c1e4a-aaaa,GPU-1b3d5f7e-bbbb"}, ["GPU-8f2c1e4a-aaaa", "GPU-1b3d5f7e-bbbb"]),
    ({"CUDA_VISIBLE_DEVICES": "MIG-5d1f0e2a-cccc"}, ["MIG-5d1f0e2a-cccc"]),
    ({"CUDA_VISIBLE_DEVICES": "1,,2"}, ["1"]),  # CUDA reads up to the first empty entry
    ({"CUDA_VISIBLE_DEVICES": ""}, []),  # no GPU
])
def test_the_visible_devices_are_the_callers_list(environ, expected):
    assert workers.visible_devices(environ, lambda: 4) == expected


def test_each_worker_owns_an_entry_of_the_list_not_a_raw_device_number():
    devices = workers.visible_devices({"CUDA_VISIBLE_DEVICES": "3,1"}, lambda: 8)
    assert [workers.worker_device(f"gw{n}", devices) for n in range(4)] == ["3", "1", "3", "1"]  # more workers: round robin
    uuids = ["GPU-a", "GPU-b", "GPU-c"]
    assert [workers.worker_device(f"gw{n}", uuids) for n in range(3)] == uuids
    assert workers.worker_device("gw0", []) is None and workers.worker_device("master", uuids) is None


def test_a_worker_of_k_gpus_owns_k_consecutive_entries_and_a_remainder_is_idle():
    devices = ["3", "1", "GPU-c", "0", "2"]
    assert workers.gpu_groups(devices, 2) == [["3", "1"], ["GPU-c", "0"]]  # "2" is left over
    assert [workers.worker_device(f"gw{n}", devices, 2) for n in range(3)] == ["3,1", "GPU-c,0", "3,1"]
    assert workers.worker_device("gw0", devices, 5) == "3,1,GPU-c,0,2"
    assert workers.worker_device("gw0", devices, 6) is None  # fewer GPUs than one worker needs


def test_gpus_per_worker_is_a_whole_number_of_at_least_one():
    assert workers.gpus_per_worker(SimpleNamespace(value=None)) == 1
    assert workers.gpus_per_worker(SimpleNamespace(value="4")) == 4
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(pytest.UsageError, match=r"--lora-gpus-per-worker: .* is not a GPU count; allowed: an integer >= 1"):
            workers.gpus_per_worker(SimpleNamespace(value=bad, shown=repr(bad), describe=lambda: "--lora-gpus-per-worker"))


def test_a_worker_takes_its_share_of_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    import torch

    before = torch.get_num_threads()
    environ = {}
    assert workers.share_cpus({"workercount": 4}, environ, lambda: 16) == 4 and environ == {"OMP_NUM_THREADS": "4"}
    assert torch.get_num_threads() == 4  # torch was imported already: its pool is set too
    torch.set_num_threads(before)
    environ = {}
    assert workers.share_cpus({"workercount": 3}, environ, lambda: 2) == 1 and environ == {"OMP_NUM_THREADS": "1"}
    torch.set_num_threads(before)
    assert workers.share_cpus({"workercount": 2}, {"OMP_NUM_THREADS": "8"}, lambda: 16) is None  # the user's choice


def settings(bench=True, device="auto", per_worker=None):
    return {"bench": SimpleNamespace(value=bench), "device": SimpleNamespace(value=device),
            "gpus_per_worker": SimpleNamespace(value=per_worker)}


def test_n_auto_starts_one_worker_per_gpu_and_leaves_a_cpu_machine_to_xdist():
    assert workers.auto_workers(settings(), {}, lambda: 4) == 4
    assert workers.auto_workers(settings(), {"CUDA_VISIBLE_DEVICES": "2,3"}, lambda: 8) == 2
    assert workers.auto_workers(settings(per_worker="2"), {}, lambda: 8) == 4  # one worker per pair of GPUs
    assert workers.auto_workers(settings(per_worker="3"), {}, lambda: 2) is None  # not one group: xdist's count
    assert workers.auto_workers(settings(), {}, lambda: 0) is None  # no GPU: xdist's own count
    assert workers.auto_workers(settings(device="cpu"), {}, lambda: 4) is None
    assert workers.auto_workers(settings(bench=False), {}, lambda: 4) is None


def test_the_gpu_count_is_nvmls_and_zero_without_a_driver(monkeypatch):
    import pynvml

    calls = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 3)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    assert workers.nvml_device_count() == 3 and calls == ["init", "shutdown"]

    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert workers.nvml_device_count() == 0


def test_a_worker_pins_itself_to_its_device():
    environ = {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}
    assert workers.pin({workers.WORKER_DEVICE: "GPU-b"}, environ) == "GPU-b" and environ == {"CUDA_VISIBLE_DEVICES": "GPU-b"}
    assert workers.pin({}, environ) is None and environ == {"CUDA_VISIBLE_DEVICES": "GPU-b"}


SEES = """
import os
import pytest

@pytest.mark.parametrize("n", range(8))
def test_sees(n, worker_id, lora_bench):
    lora_bench.describe(model=worker_id)
    lora_bench.record("device_entry", len(os.environ["CUDA_VISIBLE_DEVICES"]), "characters")
    with open(f"{os.environ['SEEN_DIR']}/{worker_id}", "a") as seen:
        seen.write(os.environ["CUDA_VISIBLE_DEVICES"] + "\\n")
"""


def seen_by_workers(pytester, monkeypatch, visible: str, *args: str) -> dict[str, set[str]]:
    """The ``CUDA_VISIBLE_DEVICES`` each of two workers saw in its tests, the caller's being ``visible``
    (no CUDA reads it here: the torch build is the CPU one). ``--dist load`` spreads one module's
    tests over both workers (the bench's own scheduling would keep them on one)."""
    pytester.makepyfile(test_sees=SEES)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("SEEN_DIR", str(pytester.path))
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "load", "--lora-bench", *args, "test_sees.py", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()[-2000:]
    return {worker: set((pytester.path / worker).read_text().split()) for worker in ("gw0", "gw1")}


def test_under_xdist_each_worker_sees_only_its_own_gpu(pytester, monkeypatch):
    seen = seen_by_workers(pytester, monkeypatch, "GPU-8f2c1e4a,GPU-1b3d5f7e")
    assert seen == {"gw0": {"GPU-8f2c1e4a"}, "gw1": {"GPU-1b3d5f7e"}}


def test_a_worker_of_two_gpus_sees_its_pair(pytester, monkeypatch):
    seen = seen_by_workers(pytester, monkeypatch, "GPU-a,GPU-b,GPU-c,GPU-d,GPU-e", "--lora-gpus-per-worker=2")
    assert seen == {"gw0": {"GPU-a,GPU-b"}, "gw1": {"GPU-c,GPU-d"}}


def test_with_the_cpu_device_workers_are_not_pinned(pytester, monkeypatch):
    seen = seen_by_workers(pytester, monkeypatch, "GPU-8f2c1e4a,GPU-1b3d5f7e", "--lora-device=cpu")
    assert seen == {"gw0": {"GPU-8f2c1e4a,GPU-1b3d5f7e"}, "gw1": {"GPU-8f2c1e4a,GPU-1b3d5f7e"}}


@pytest.mark.slow
def test_two_workers_write_the_records_of_a_serial_run_and_build_each_base_once(pytester, small_serial_run):
    """The controller writes what its workers sent: the serial run's records, and the run's status."""
    import json

    parallel = pytester.runpytest_subprocess("-n", "2", "--lora-bench", *SMALL, "--lora-results=parallel")
    assert parallel.ret == 0, parallel.stdout.str()[-3000:]
    one, two = small_serial_run, json.loads((pytester.path / "parallel" / "latest.json").read_text())
    assert len(one["records"]) > 30 and untimed(one) == untimed(two)  # same test ids, statuses and numbers
    assert one["run"]["status"] == two["run"]["status"] == "passed"
    assert not any("@" in record["test"] for record in two["records"])  # loadgroup's suffix stays out of the records
    builds = [r["metrics"]["builds"] for r in two["records"] if "test_base_build_time" in r["test"]]
    assert builds == [1, 1, 1, 1]  # each base built once by the worker that timed it ...
    assert sorted(build["count"] for build in two["run"]["builds"]) == [1, 1, 1, 1]  # ... and by no other worker
