"""The fixtures a test asks for: a device, a base model, a LoRA config, a LoRA model, a recorder.

``model_spec``, ``quant_spec``, ``lora_spec`` and ``workload_spec`` are parameters that the plugin
fills from the matrix (``pytest_generate_tests``); a test that asks for ``lora_model`` runs once
per model x quantization x LoRA spec. Building a base is the expensive part, so ``base_model`` is
session-scoped: pytest orders the tests so that each (model, quantization) base is built once and
every LoRA spec reuses it. ``lora_model`` adds the adapter for one test and takes it off again,
so the shared base leaves each test as it entered.

torch, transformers and peft are imported inside the fixtures, never when the plugin loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from . import bench
from .markers import suite_of
from .keys import RECORDER_KEY, SESSION_KEY
from .matrix import Matrix
from .results.recorder import Recorder
from .session import LoraSession
from .specs import without_group



@pytest.fixture(scope="session")
def lora_session(pytestconfig: pytest.Config) -> LoraSession:
    """The plugin's session state (options, matrix, results store)."""
    return pytestconfig.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def lora_device(lora_session: LoraSession) -> str:
    """``"cuda"`` or ``"cpu"``, from ``--lora-device`` (auto: cuda when available)."""
    return lora_session.device


@pytest.fixture(scope="session")
def lora_gpu(lora_session: LoraSession) -> Any:
    """The GPU the bench measures on (``pytest_lora.measure.gpu.Gpu``: events, allocator
    statistics, NVML), or ``None`` on the CPU, where GPU-only measurements skip."""
    return lora_session.gpu


@pytest.fixture(scope="session")
def lora_matrix(lora_session: LoraSession) -> Matrix:
    """The session's configuration matrix."""
    return lora_session.matrix


@pytest.fixture(scope="session")
def quant_format(quant_spec, lora_device: str) -> Any:
    """The format object of this test's quantization (``models.formats.Format``): what the suites
    ask about quantized layers. A format that cannot run here (its backend not installed, no
    kernel for the device) skips the test with the reason."""
    from .models import formats

    missing = formats.unavailable(quant_spec, lora_device)
    if missing is not None:
        pytest.skip(missing)
    return formats.of(quant_spec)


@pytest.fixture(scope="session")
def base_model(model_spec, quant_spec, quant_format, lora_device: str, lora_session: LoraSession) -> Iterator[Any]:
    """The base model of one (model, quantization): built once per session and device, then shared.

    Random weights of the real architecture, built in the target dtype on the device and quantized
    in place; or a local checkpoint through ``from_pretrained``. Tests must not change it (use
    ``lora_model``, which restores it).
    """
    from .models import build

    gpu = lora_session.gpu
    build.free_memory(gpu)  # the previous base's last reference is gone by now
    if gpu is not None:  # what is left before each build shows a base that was not released
        if not lora_session.allocated_before_build:
            gpu.warm_up()  # cuBLAS's per-thread workspaces belong in the first "before" too
        lora_session.allocated_before_build.append(gpu.allocated())
    clock = gpu.clock if gpu is not None else time.perf_counter
    started = clock()
    with lora_session.waiting(f"building the base {model_spec.id} {quant_spec.id} on {lora_device}"):
        model = build.build_base(model_spec, quant_spec, lora_device, lora_session.capacities())
    if gpu is not None:
        gpu.synchronize()
    lora_session.run.note_build((model_spec.id, quant_spec.id, lora_device), clock() - started)
    yield model
    del model
    build.free_memory(gpu)


@pytest.fixture
def lora_config(lora_spec, model_spec, request: pytest.FixtureRequest) -> Any:
    """The ``peft.LoraConfig`` of this test's LoRA spec, with the task type of the model's head
    (and, on a format whose layers ``all-linear`` misses, the layers it names)."""
    from .models import adapters

    quant = request.getfixturevalue("quant_spec") if "quant_spec" in request.fixturenames else None
    return adapters.lora_config_for(lora_spec, model_spec.config_dict(), quant)


@dataclass(frozen=True)
class BaseBuild:
    """How this test's base was built: seconds, how many times this session built it, and the
    GPU bytes allocated before its build and before the session's first (``None`` on the CPU)."""

    seconds: float
    count: int
    allocated_before: int | None
    allocated_before_first: int | None


@pytest.fixture
def base_build(base_model, model_spec, quant_spec, lora_device: str, lora_session: LoraSession) -> BaseBuild:
    """What the session noted when it built this test's base (``BaseBuild``)."""
    key = (model_spec.id, quant_spec.id, lora_device)
    before = lora_session.allocated_before_build
    return BaseBuild(lora_session.run.build_seconds[key], lora_session.run.builds[key],
                     before[-1] if before else None, before[0] if before else None)


@pytest.fixture
def lora_batch(model_spec, workload_spec, lora_device: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A training batch of this test's workload on the device: synthetic token ids over the
    model's vocabulary, seeded by the test's id (the same batch in every run and worker)."""
    from .measure import train
    from .models import build

    vocab = model_spec.config_dict()["vocab_size"]
    return train.synthetic_batch(vocab, workload_spec, lora_device, build.seed_for(request.node.nodeid))


@pytest.fixture
def base_copy(base_model: Any, lora_gpu: Any) -> Iterator[Any]:
    """A private copy of this test's base, to change at will (merge into it, add adapters): it
    shares nothing with the shared base (``quantize.private_copy``), and its memory is returned
    when the test ends."""
    from .models import build, quantize

    copy = quantize.private_copy(base_model)
    yield copy
    del copy
    if lora_gpu is not None:  # before the next config (a full collection is slow)
        build.free_memory(lora_gpu)


@pytest.fixture
def lora_model(base_model: Any, lora_config: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The shared base with this test's LoRA adapter (a ``peft.PeftModel``), removed after the test."""
    from .models import adapters, build

    import torch

    torch.manual_seed(build.seed_for(request.node.nodeid))
    with adapters.attached(base_model, lora_config) as peft_model:
        yield peft_model


@pytest.fixture
def lora_bench(request: pytest.FixtureRequest) -> Recorder:
    """The recorder: ``lora_bench.record(metric, value, unit)`` into the run's results."""
    recorder = request.node.stash.get(RECORDER_KEY, None)
    if recorder is None:  # a test called through request.getfixturevalue
        recorder = request.node.stash[RECORDER_KEY] = new_recorder(request.node)
    return recorder


def new_recorder(item: pytest.Item) -> Recorder:
    """A recorder for ``item``: its suite (marker or module name) and its matrix case."""
    suite = suite_of(item)
    if suite is None:
        suite = item.path.stem.removeprefix("test_") if item.path else item.name
    params = getattr(getattr(item, "callspec", None), "params", {})
    # a dimension the matrix leaves empty for this test (no quantized base for a quantized-only
    # test) is pytest's NOTSET: the test is skipped as an empty parameter set, with no case
    params = {name: value for name, value in params.items() if hasattr(value, "as_record") or hasattr(value, "id")}
    case: dict[str, Any] = {}
    if "model_spec" in params:
        case["model"] = params["model_spec"].id
    if "quant_spec" in params:
        case["quant"] = params["quant_spec"].id
    if "lora_spec" in params:
        case["lora"] = params["lora_spec"].as_record()
    if "workload_spec" in params:
        case["workload"] = params["workload_spec"].as_record()
        if "optimizer_spec" in params:  # the training step's optimizer is part of its workload
            case["workload"]["optimizer"] = params["optimizer_spec"].id
    if "serve_spec" in params:
        case["workload"] = params["serve_spec"].as_record()
    return Recorder(suite, record_test_id(item), case)


def record_test_id(item: pytest.Item) -> str:
    """The test's id in the records: ``suites/<file>::<name>`` for a built-in suite wherever the
    package is installed (a checkout, a wheel in site-packages), so that their runs compare."""
    suites = bench.builtin_suites()
    path = getattr(item, "path", None)
    nodeid = without_group(item.nodeid)
    if path is not None and path.is_relative_to(suites) and "::" in nodeid:
        return f"suites/{path.relative_to(suites).as_posix()}::{nodeid.split('::', 1)[1]}"
    return nodeid
